"""A model served by NVIDIA Triton Inference Server, as a Backend: ``triton://HOST:PORT/MODEL``.

``medmamba-edge run triton://gpu-server:8000/medmamba study/`` sends the same preprocessed batches the local
backends get to a server (``medmamba-edge serve``, or a stock Triton with a repository from
``medmamba-edge export-triton``) over the KServe v2 HTTP/REST protocol with Triton's binary tensor
extension (raw float32 bytes after a JSON header, not a JSON list of numbers). The model's ``ModelMetadata``
comes from the served model's configuration (its ``parameters["medmamba_edge"]``, which both writers set),
so preprocessing and class names are the exported model's own, checked against the served input and
output shapes as a local model is.

Standard library and numpy only (no tritonclient, no gRPC): the client stays as light as the runtime.

A server that goes away never hangs a run: connecting waits at most ``CONNECT_TIMEOUT_S``, an answer at
most ``timeout`` seconds (``?timeout=S`` in the URL). A failed request raises ``BackendError``, which the
run loop turns into a ``skipped`` record for each frame of that batch and a non-zero exit. After a
connection failure the server is tried again only after a back-off (0.5 s doubling to 8 s, as live
sources reconnect); batches in between fail at once with the same reason, so a folder run against a dead
server ends promptly with every frame accounted for, and a live source resumes when the server is back.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np

from medmamba_edge.errors import clipped, first_line, plural

from ..backoff import backoff_s
from ..metadata import METADATA_KEY, MetadataError, ModelMetadata, check_against_graph
from ..triton_defaults import DEFAULT_PORT
from ..uri import TRITON_SCHEME, without_password
from . import Backend, BackendError, run_in_fixed_batches

CONNECT_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 86400.0
# The most an answer may hold: a batch's logits are kilobytes, a configuration tens of them. A port that streams
# (a camera's MJPEG) or a broken server would otherwise grow the client's memory for as long as it sends.
MAX_ANSWER_BYTES = 64 << 20
NOT_TRITON = "is this a Triton (KServe v2) HTTP port?"  # what answers of another kind of server ask
# KServe v2 datatypes a MedMamba input or output can have, and Triton's config spelling of them.
DATATYPES = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}
CONFIG_DATATYPES = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16"}
HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary tensor extension's split of JSON and raw bytes
# What reading a server's JSON of any shape can raise: fields of other types than Triton's, an integer no float
# holds (json gives 1e999-digit ones as int), arrays nested past the parser's recursion limit.
UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError)


@dataclass(frozen=True)
class ServerModel:
    """Where a served model is: ``triton://HOST[:PORT]/MODEL[/VERSION][?timeout=SECONDS]``."""

    host: str
    port: int
    model: str
    version: str = ""  # "": the server's choice (its version policy)
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{TRITON_SCHEME}://{host}:{self.port}/{quote(self.model, safe='')}"
                + (f"/{self.version}" if self.version else ""))

    def model_path(self, tail: str = "") -> str:
        """The KServe v2 path of the model (and of one of its endpoints)."""
        path = f"/v2/models/{quote(self.model, safe='')}"
        if self.version:
            path += f"/versions/{quote(self.version, safe='')}"
        return path + tail


def model_name_problem(name: str) -> str | None:
    """What a model name may not be, in words, or None: Triton's letters, digits, '.', '_' and '-', without a leading
    '.' (export-triton's temporary folders are named '.NAME.…')."""
    if name.startswith(".") or not re.fullmatch(r"[A-Za-z0-9._-]+", name):  # ASCII: "modèle".isalnum() is true
        return f"--name {name!r}: a model name is letters, digits, '.', '_' and '-' (not leading '.')"
    return None


def parse_url(spec) -> ServerModel:
    text = re.sub(rf"^{TRITON_SCHEME}:/+", f"{TRITON_SCHEME}://", str(spec).strip(), flags=re.IGNORECASE)
    shown = without_password(spec)  # errors go to logs and tickets, a password typed in the address never
    usage = f"expected {TRITON_SCHEME}://HOST:PORT/MODEL[/VERSION][?timeout=SECONDS]"
    try:
        parts = urlsplit(text)
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError as exc:
        raise BackendError(f"{shown}: not a server address ({exc}); {usage}") from None
    # The name as the server knows it: `med%20mamba` is `med mamba`, quoted once again on the way out.
    names = [unquote(p) for p in parts.path.split("/") if p]
    if not parts.hostname or not 1 <= len(names) <= 2:
        raise BackendError(f"{shown}: not a server address; {usage}")
    try:  # as connecting encodes it for the resolver, which raised UnicodeError past the client's handling
        parts.hostname.encode("idna")
    except UnicodeError:
        raise BackendError(f"{shown}: the host name {parts.hostname!r} is no name a resolver takes (an empty label, "
                           f"one past 63 characters, or a character IDNA forbids); {usage}") from None
    if port == 0:  # urlsplit's range is 0-65535; no server listens on 0
        raise BackendError(f"{shown}: port 0 is no server's port; {usage}")
    if parts.fragment or parts.username is not None:
        raise BackendError(f"{shown}: a server address has no {'#fragment' if parts.fragment else 'user@'} part; "
                           f"{usage}")
    if len(names) == 2 and not re.fullmatch(r"[0-9]+", names[1]):  # not isdigit(): "²" and "١" are digits to it
        raise BackendError(f"{shown}: the model version must be a number, got {names[1]!r}; {usage}")
    query = parse_qs(parts.query)
    unknown = sorted(set(query) - {"timeout"})
    if unknown:
        raise BackendError(f"{shown}: unknown option {', '.join(unknown)}; {usage}")
    timeout = DEFAULT_TIMEOUT_S
    if "timeout" in query:
        try:
            timeout = float(query["timeout"][-1])
        except ValueError:
            timeout = -1.0
        if not 0 < timeout <= MAX_TIMEOUT_S:
            raise BackendError(f"{shown}: timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g} "
                               f"(a day), got {query['timeout'][-1]!r}")
    return ServerModel(parts.hostname, port, names[0], names[1] if len(names) == 2 else "", timeout)


def connection_error(exc: OSError, timeout: float, connected: bool = True) -> str:
    """A failed connection in words, for a record's reason; ``connected``: whether the wait that ran out was for
    an answer (``timeout``) or for the connection itself (CONNECT_TIMEOUT_S)."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: is the server running?"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g} s" if connected else \
            f"no connection within {CONNECT_TIMEOUT_S:g} s (server overloaded, or a firewall dropping it)"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                        http.client.IncompleteRead)):
        return "the server closed the connection"
    if isinstance(exc, socket.gaierror):
        return f"the host name does not resolve ({exc.strerror or exc})"
    return exc.strerror or first_line(exc) or type(exc).__name__


def encode_infer_request(input_name: str, output_name: str, batch: np.ndarray) -> tuple[bytes, memoryview]:
    """KServe v2 inference request with the binary tensor extension: (JSON header, raw little-endian input)."""
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(batch.shape), "datatype": _datatype(batch.dtype),
                    "parameters": {"binary_data_size": batch.nbytes}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }, separators=(",", ":")).encode()
    return header, memoryview(np.ascontiguousarray(batch)).cast("B")


def decode_infer_response(body: bytes, header_length: int | None, output_name: str) -> np.ndarray:
    """The named output of a KServe v2 response: raw bytes after the JSON header, or JSON ``data`` when the
    server answered without the binary extension."""
    header = json.loads(body[:header_length] if header_length is not None else body)
    if not isinstance(header, dict):
        raise ValueError(f"the answer's JSON is a {type(header).__name__}, not an object")
    offset = header_length or 0
    for output in header.get("outputs", []):
        size = output.get("parameters", {}).get("binary_data_size")
        # A negative count is numpy's "all the rest", and a negative offset step rereads the header as data.
        if size is not None and (type(size) is not int or size < 0):
            raise ValueError(f"output {output.get('name')!r} has binary_data_size {size!r}, not a number of bytes")
        if output.get("name") == output_name:
            dtype = DATATYPES.get(output.get("datatype"))
            if dtype is None:
                raise ValueError(f"output {output_name} has datatype {output.get('datatype')}, expected FP32 or FP16")
            if size is None:
                with np.errstate(over="ignore"):  # inf, which the run loop records as non-finite output
                    values = np.asarray(output["data"], dtype=dtype)
            elif header_length is None:  # the tail would be read from byte 0: the JSON's own bytes
                raise ValueError(f"output {output_name!r} has binary data but the answer no {HEADER_LENGTH}")
            else:
                values = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            return values.reshape(output["shape"]).astype(np.float32)
        offset += size or 0
    raise ValueError(f"the answer has no output {output_name!r}")


def _datatype(dtype: np.dtype) -> str:
    return next(name for name, known in DATATYPES.items() if known == dtype.newbyteorder("<"))


class TritonBackend(Backend):
    def __init__(self, spec: str):
        self.server = parse_url(spec)
        self.path = self.server.url  # what records and reports name the model by
        self._local = threading.local()
        # Weakly: a connection lives as long as its thread's local storage, and goes (its socket closed) with a
        # thread that ends; close() closes those still alive.
        self._connections: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._failures, self._retry_at, self._down_reason = 0, 0.0, ""
        self._closed = False

        config = self._get_json(self.server.model_path("/config"), "read the model's configuration")
        server = self._get_json("/v2", "read the server's metadata")
        try:
            self._configure(server, config)
        except UNREADABLE as exc:
            raise BackendError(f"{self.path}: the served model's configuration is not one Triton writes "
                               f"({_misreading(exc)})") from None

    def _configure(self, server: dict, config: dict) -> None:
        """The served model's names, types, batching and metadata, from the server's and the model's JSON."""
        self.server_description = _quoted(f"{server.get('name', 'KServe v2 server')} {server.get('version', '')}")
        self.backend_name = _quoted(str(config.get("backend") or config.get("platform") or "unknown"))
        self.metadata = self._metadata(config)
        inputs, outputs = config.get("input") or [], config.get("output") or []
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.path}: the served model has {plural(len(inputs), 'input')} and "
                               f"{plural(len(outputs), 'output')}; "
                               f"a MedMamba model has one of each")
        self.input_name, self.output_name = inputs[0]["name"], outputs[0]["name"]
        self.input_dtype = DATATYPES.get(CONFIG_DATATYPES.get(inputs[0].get("data_type", ""), ""))
        if self.input_dtype is None:
            raise BackendError(f"{self.path}: the served input has type {_quoted(str(inputs[0].get('data_type')))}; "
                               f"expected TYPE_FP32 or TYPE_FP16")
        # max_batch_size > 0: Triton batches, the dims leave the batch out. 0: the dims are the whole shape.
        self.max_batch = int(config.get("max_batch_size", 0))
        input_dims = [int(d) for d in inputs[0].get("dims", [])]
        output_dims = [int(d) for d in outputs[0].get("dims", [])]
        if self.max_batch > 0:
            input_dims, output_dims = [-1, *input_dims], [-1, *output_dims]
        check_against_graph(self.metadata, input_dims, output_dims, self.path)
        self.fixed_batch = input_dims[0] if self.max_batch == 0 and input_dims and input_dims[0] > 0 else None

    def _metadata(self, config: dict) -> ModelMetadata:
        parameter = (config.get("parameters") or {}).get(METADATA_KEY) or {}
        if "string_value" not in parameter:
            raise BackendError(f"{self.path}: the served model carries no medmamba-edge metadata (config parameter "
                               f"{METADATA_KEY!r}); serve it with `medmamba-edge serve` or a repository from "
                               f"`medmamba-edge export-triton`")
        try:
            return ModelMetadata.from_json(parameter["string_value"], self.path)
        except MetadataError as exc:  # it quotes the server's values and field names
            raise BackendError(f"{self.path}: {_quoted(str(exc).removeprefix(f'{self.path}: '))}") from None

    def describe(self) -> str:
        batching = f"max batch {self.max_batch}" if self.max_batch else f"batch {self.fixed_batch or 'any'}"
        return (f"{self.server_description} at {self.server.host}:{self.server.port}, model {self.server.model} "
                f"({self.backend_name} backend, {batching}, {self.metadata.scan_form} scan)")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise BackendError(f"{self.path}: the model was closed")
        batch = batch.astype(self.input_dtype, copy=False)
        if self.fixed_batch or not self.max_batch:
            return run_in_fixed_batches(self._infer, batch, self.fixed_batch)
        return np.concatenate([self._infer(batch[start:start + self.max_batch])
                               for start in range(0, len(batch), self.max_batch)])

    def close(self) -> None:
        self._closed = True
        with self._lock:
            connections, self._connections = list(self._connections), weakref.WeakSet()
        for connection in connections:
            sock = connection.sock  # once: the thread running a request may drop it meanwhile
            if sock is not None:
                try:  # wakes a request waiting for its answer in another thread (closing alone would not)
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # not connected, or closed meanwhile
                    pass
            try:
                connection.close()
            except AttributeError:  # its request's thread closed its answer meanwhile (see _request)
                pass

    # ------------------------------------------------------------------------------------------ requests

    def _infer(self, chunk: np.ndarray) -> np.ndarray:
        header, data = encode_infer_request(self.input_name, self.output_name, chunk)
        status, headers, body = self._request("POST", self.server.model_path("/infer"), [header, data],
                                              {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))})
        if status != 200:
            raise BackendError(f"{self.path}: the server refused the batch (HTTP {status}: {_error_text(body)})")
        length = headers.get(HEADER_LENGTH)
        try:
            logits = decode_infer_response(body, int(length) if length is not None else None, self.output_name)
        except UNREADABLE as exc:  # whatever JSON the server sent instead
            raise BackendError(f"{self.path}: unreadable answer ({_misreading(exc)})") from None
        if logits.shape != (len(chunk), self.metadata.num_classes):
            raise BackendError(f"{self.path}: the answer has shape {logits.shape}, expected "
                               f"{(len(chunk), self.metadata.num_classes)}")
        return logits

    def _get_json(self, path: str, what: str) -> dict:
        status, _, body = self._request("GET", path)
        if status != 200:
            raise BackendError(f"{self.path}: cannot {what} (HTTP {status}: {_error_text(body)})")
        try:
            answer = json.loads(body)
        except UNREADABLE:
            answer = None
        if not isinstance(answer, dict):
            raise BackendError(f"{self.path}: cannot {what}: the answer is not a JSON object; {NOT_TRITON}")
        return answer

    def _request(self, method: str, path: str, body: list | None = None,
                 headers: dict | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
        with self._lock:
            if self._failures and time.monotonic() < self._retry_at:
                raise BackendError(f"{self.path}: server unreachable ({self._down_reason}); retrying in "
                                   f"{self._retry_at - time.monotonic():.1f} s")
        # One retry, on a fresh connection, for a kept-alive connection the server closed while idle.
        for attempt in (0, 1):
            # close() from another thread between two chunks of a run closes this thread's connection too: no
            # request after it (http.client would open a socket of its own, outside the timeouts and close()).
            if self._closed:
                raise BackendError(f"{self.path}: the model was closed")
            connection, reused = self._connection()
            connected = reused
            try:
                if not reused:
                    connection.connect()  # waits at most CONNECT_TIMEOUT_S
                    connected = True
                    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = connection.sock  # once: close() from another thread sets connection.sock to None
                if self._closed or sock is None:  # close() came while connecting: it missed this socket
                    self._drop(connection)
                    raise BackendError(f"{self.path}: the model was closed")
                connection.auto_open = 0  # never a socket of http.client's own
                # The whole answer within the timeout, not each read: a server sending a byte at a time (or
                # headers a line at a time) would pass every read's. Each send and read waits at most what is
                # left until the deadline (the socket's own timeout, set before each; no thread per request).
                deadline = time.monotonic() + self.server.timeout
                connection.deadline = deadline
                connection.putrequest(method, path, skip_accept_encoding=True)
                for key, value in {**(headers or {}),
                                   "Content-Length": str(sum(len(part) for part in body or []))}.items():
                    connection.putheader(key, value)
                _wait_at_most(sock, deadline)
                connection.endheaders()
                for part in body or []:
                    _wait_at_most(sock, deadline)
                    connection.send(part)
                response = connection.getresponse()
                data = _read_answer(response)
                if self._closed:  # close() shut the socket mid-answer: what was read is cut short
                    raise ConnectionAbortedError("closed")
            except (OSError, http.client.HTTPException) as exc:
                self._drop(connection)
                if self._closed:  # its socket closed under the request by close(): not the server's doing
                    raise BackendError(f"{self.path}: the model was closed") from None
                stale = reused and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))
                if attempt == 0 and stale:
                    continue
                if isinstance(exc, OSError):  # a timeout once connected: no (whole) answer within the timeout
                    reason = connection_error(exc, self.server.timeout, connected)
                elif isinstance(exc, http.client.BadStatusLine):  # e.g. gRPC's HTTP/2 frames: a server, not ours
                    self._mark_down("no HTTP/1.1 answer")
                    raise BackendError(f"{self.path}: the server's answer is no HTTP/1.1 (gRPC answers HTTP/2, on "
                                       f"the port after Triton's HTTP one); {NOT_TRITON}") from None
                else:
                    reason = f"broken HTTP answer ({type(exc).__name__})"
                self._mark_down(reason)
                raise BackendError(f"{self.path}: server unreachable ({reason})") from None
            except AttributeError:
                # http.client's connection and response are not for two threads: close() from another one closing
                # them as the answer's last read closes them too ends one in 'NoneType' object has no attribute
                # 'close'. Anything else is a bug, and shown as one.
                if not self._closed:
                    raise
                self._drop(connection)
                raise BackendError(f"{self.path}: the model was closed") from None
            except AnswerTooLarge as exc:
                self._drop(connection)
                self._mark_down(str(exc))
                raise BackendError(f"{self.path}: {exc}") from None
            if response.will_close:
                self._drop(connection)
            with self._lock:
                self._failures = 0
            return response.status, response.headers, data
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's kept-alive connection (concurrent callers each get their own), and whether it is reused."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return connection, True
        connection = _Connection(self.server.host, self.server.port, timeout=CONNECT_TIMEOUT_S)
        self._local.connection = connection
        with self._lock:
            self._connections.add(connection)
        return connection, False

    def _drop(self, connection: http.client.HTTPConnection) -> None:
        connection.close()
        self._local.connection = None
        with self._lock:
            self._connections.discard(connection)

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            self._retry_at = time.monotonic() + backoff_s(self._failures)
            self._down_reason = reason


class AnswerTooLarge(Exception):
    """An answer no model server gives: refused before it is read (announced) or once past the limit (sent)."""


def _wait_at_most(sock: socket.socket, deadline: float) -> None:
    """The socket's timeout: what is left until ``deadline``; TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline")
    sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """The socket's reader for one answer, each read waiting at most what is left until the request's deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__()
        self._sock, self._raw, self._deadline = sock, sock.makefile("rb", buffering=0), deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:
        _wait_at_most(self._sock, self._deadline)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()  # the socket's file reference: a connection closed meanwhile closes its socket now
        super().close()


class _DeadlineSocket:
    """What http.client.HTTPResponse reads an answer through (it asks only for ``makefile("rb")``)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str, *args, **kwargs):
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))


class _Connection(http.client.HTTPConnection):
    """An HTTP connection whose answers are read by ``deadline`` (time.monotonic()), set before each request."""

    deadline = float("inf")

    def response_class(self, sock, *args, **kwargs):  # HTTPConnection.getresponse's self.response_class(sock, ...)
        return http.client.HTTPResponse(_DeadlineSocket(sock, self.deadline), *args, **kwargs)


def _read_answer(response: http.client.HTTPResponse) -> bytes:
    """The answer's body, refused past MAX_ANSWER_BYTES (announced or sent)."""
    if response.length is not None and response.length > MAX_ANSWER_BYTES:
        raise AnswerTooLarge(f"the server announces an answer of {response.length:,} bytes, over the "
                             f"{MAX_ANSWER_BYTES:,} any answer of a model server holds; {NOT_TRITON}")
    data = response.read(MAX_ANSWER_BYTES + 1)
    if len(data) > MAX_ANSWER_BYTES:
        raise AnswerTooLarge(f"the server's answer runs past {MAX_ANSWER_BYTES:,} bytes; {NOT_TRITON}")
    return data


def _quoted(text: str) -> str:
    """The server's text in a message (a name, an error, a value), cut to one line and clipped: a proxy's error page
    can be one line of 56 KB, which the message would repeat in every record and console line it reaches."""
    return clipped(first_line(Exception(text)))


def _misreading(exc: Exception) -> str:
    """What reading a server's JSON raised, for a message: it can quote the server (numpy's "could not convert
    string to float: '…'"), so quoted as the server's own error message is."""
    return f"{type(exc).__name__}: {_quoted(str(exc))}"


# Where a JSON error answer holds its message: KServe v2 (Triton) "error", FastAPI "detail", TorchServe and many
# gateways "message"; some nest it, {"error": {"message": ...}} (Google's APIs, OpenAI's).
ERROR_KEYS = ("error", "detail", "message")


def _json_message(answer: dict) -> str:
    """The message a JSON error answer holds under one of ERROR_KEYS, one level down at most; "" if none does. A
    string only: {"error": true, "message": ...} says its message, and a list, number or deeper object is no
    message, not Python's repr of it ('True', "[{'msg': ...}]")."""
    for key in ERROR_KEYS:
        value = answer.get(key)
        if isinstance(value, dict):
            value = next((value[inner] for inner in ERROR_KEYS if _is_message(value.get(inner))), None)
        if _is_message(value):
            return value
    return ""


def _is_message(value: object) -> bool:
    return isinstance(value, str) and value != ""  # null or "": no message, not "None"


def _error_text(body: bytes) -> str:
    """The server's own error message (a JSON answer's under ERROR_KEYS; a proxy's HTML page says it in its title),
    cut to one line and clipped: every record of the batch carries it."""
    try:
        text = _json_message(json.loads(body))
    except UNREADABLE:
        text = body.decode("utf-8", "replace")
        # A proxy's error page (nginx's, Apache's) begins with '<html>' or a doctype on a line of its own: its
        # title says what went wrong.
        title = re.search(r"<title[^>]*>([^<]*)</title>", text, re.IGNORECASE)
        text = title.group(1) if title and title.group(1).strip() else text
    return _quoted(text) or "no message"
