"""The triton:// client (runtime/backends/triton.py) when the server is not there, goes silent, or is killed
in the middle of a run: one-line errors, bounded waits, a record for every frame and a non-zero exit."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from medmamba_edge.runtime.backends import BackendError, open_backend
from medmamba_edge.runtime.backends import is_triton_url
from medmamba_edge.runtime.backends.triton import ServerModel, parse_url
from tests.exported_models import official_onnx
from tests.shared_data import require_shared
from tests.triton_server import ROOT, free_ports, require_serve_python, running_server

FRAMES = 240
RUN_DEADLINE_S = 120


@pytest.mark.parametrize("spec, expected", [
    ("triton://gpu-box:8000/medmamba", ServerModel("gpu-box", 8000, "medmamba")),
    ("triton:/127.0.0.1:9000/m", ServerModel("127.0.0.1", 9000, "m")),  # as a Path-typed option folds it
    ("TRITON://[::1]:8000/m/3?timeout=2.5", ServerModel("::1", 8000, "m", "3", 2.5)),
    ("triton://host/m", ServerModel("host", 8000, "m")),
    ("triton://host:8000/med%20mamba", ServerModel("host", 8000, "med mamba")),  # once quoted twice: med%2520mamba
])
def test_server_addresses_parse(spec, expected):
    assert is_triton_url(spec) and parse_url(spec) == expected
    assert parse_url(expected.url).url == expected.url  # the address without its client options
    assert parse_url(expected.url) == ServerModel(expected.host, expected.port, expected.model, expected.version)


@pytest.mark.parametrize("spec", ["C://models/m.onnx", "runs:/m.onnx", "m.onnx", "/data/http://m.onnx"])
def test_file_paths_are_no_urls(spec):
    """A Windows drive, a folder named "runs:", a "://" past the start: paths, neither served nor refused."""
    assert not is_triton_url(spec)


def test_a_served_model_named_like_a_checkpoint_is_no_checkpoint():
    """triton://HOST:PORT/model.pt was opened as a checkpoint file ("no such checkpoint file")."""
    from medmamba_edge.runtime.backends import is_checkpoint_name

    assert not is_checkpoint_name("triton://127.0.0.1:1/model.pt") and is_checkpoint_name("runs/model.PTH.TAR")


def test_a_file_in_a_folder_named_as_a_scheme_is_a_file(tmp_path, monkeypatch):
    """runs://m.onnx is runs:/m.onnx to the file system: with a folder runs: there, a path (a missing file in it is
    said to be missing, further on), where a scheme without such a folder is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs:").mkdir()
    (tmp_path / "runs:" / "m.onnx").write_bytes(b"")
    assert not is_triton_url("runs://m.onnx") and not is_triton_url("runs://other.onnx")
    with pytest.raises(BackendError, match="unknown model URI scheme 'jobs'"):
        is_triton_url("jobs://m.onnx")


@pytest.mark.parametrize("spec, message", [
    ("triton://host:8000", "not a server address"),
    ("triton://host:8000/m/latest", "the model version must be a number"),
    ("triton://host:8000/m/\u00b2", "the model version must be a number"),  # "²".isdigit() held
    ("triton://host:8000/m?timeout=0", "timeout must be a number of seconds above 0 and at most 86400"),
    ("triton://host:8000/m?timeout=1e10", "timeout must be a number of seconds above 0 and at most 86400"),
    ("triton://host:0/m", "port 0 is no server's port"),  # was taken as 8000
    ("triton://host:8000/m?retries=3", "unknown option retries"),
    ("triton://host:99999/m", "not a server address"),
    ("triton://host:8000/m#frag", "a server address has no #fragment part"),
    ("triton://me@host:8000/m", "a server address has no user@ part"),
    # Connecting raised UnicodeError, a traceback, from encoding the name for the resolver.
    ("triton://gpu..lab:8000/m", r"^triton://gpu\.\.lab:8000/m: the host name 'gpu\.\.lab' is no name a resolver "
                                 r"takes \(an empty label, one past 63 characters, or a character IDNA forbids\); "),
    (f"triton://{'g' * 64}.lab:8000/m", "is no name a resolver takes"),
])
def test_bad_server_addresses_are_one_line(spec, message):
    with pytest.raises(BackendError, match=message):
        parse_url(spec)


@pytest.mark.parametrize("spec, shown", [
    ("triton://me:s3cret@host:8000/m", "triton://me:***@host:8000/m"),
    ("triton:/me:s3cret@host:8000/m", "triton:/me:***@host:8000/m"),  # read as a served model: as a Path folds it
    ("triton://T0KEN@host:8000/m", "triton://***@host:8000/m"),
])
def test_a_refused_user_part_is_named_without_its_secret(spec, shown):
    """parse_url reads triton:/ with one slash as a served model, but without_password read only '://': the refusal
    of its user@ part showed the password."""
    with pytest.raises(BackendError) as refused:
        parse_url(spec)
    assert str(refused.value).startswith(f"{shown}: a server address has no user@ part;")


def test_options_for_local_backends_are_refused_for_a_server():
    with pytest.raises(BackendError, match="threads cannot be set for a served model"):
        open_backend("triton://127.0.0.1:1/m", threads=2)


def test_no_server_is_one_line_at_once():
    (port,) = free_ports(1)
    started = time.monotonic()
    with pytest.raises(BackendError, match=rf"triton://127\.0\.0\.1:{port}/m: server unreachable \(connection refused"):
        open_backend(f"triton://127.0.0.1:{port}/m")
    assert time.monotonic() - started < 5


def test_a_server_that_never_answers_costs_the_timeout_not_a_hang():
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"server unreachable \(no answer within 1 s\)"):
            open_backend(f"triton://127.0.0.1:{port}/m?timeout=1")
        assert time.monotonic() - started < 5
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "run", f"triton://127.0.0.1:{port}/m?timeout=1",
                                 str(ROOT / "medmamba_edge" / "assets" / "samples")], capture_output=True, text=True,
                                cwd=ROOT, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: triton://127.0.0.1:{port}/m: server unreachable "
                                                      f"(no answer within 1 s)")


class FakeServer(ThreadingHTTPServer):
    """Answers every GET with what ``answer(handler)`` writes: a server that is not quite Triton."""

    daemon_threads = True

    def __init__(self, answer, read_body=True):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept alive, as Triton's

            def do_GET(self):
                answer(self)

            def do_POST(self):
                if read_body:
                    self.rfile.read(int(self.headers["Content-Length"]))
                answer(self)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"triton://127.0.0.1:{self.server_address[1]}/m"


def trickle(handler):  # a body announced at 1 GB, sent a kilobyte at a time: every read within any timeout
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 ** 6))
    handler.end_headers()
    try:
        for _ in range(100):
            handler.wfile.write(b" " * 1000)
            handler.wfile.flush()
            time.sleep(0.2)
    except OSError:
        pass


def stream(handler):  # what a camera's MJPEG port sends: no length, no end
    handler.send_response(200)
    handler.end_headers()
    try:
        while True:
            handler.wfile.write(b"\0" * (1 << 20))
    except OSError:
        pass


def json_list(handler):
    handler.send_response(200)
    handler.send_header("Content-Length", "5")
    handler.end_headers()
    handler.wfile.write(b"[1,2]")


@pytest.mark.parametrize("answer, message", [
    (trickle, r"server unreachable \(no answer within 1 s\)"),
    (stream, r"the server's answer runs past 67,108,864 bytes; is this a Triton"),
    (json_list, r"cannot read the model's configuration: the answer is not a JSON object"),
])
def test_a_server_that_is_not_quite_triton_is_one_line_within_the_timeout(answer, message):
    server = FakeServer(answer)
    try:
        started = time.monotonic()
        with pytest.raises(BackendError, match=message):
            open_backend(f"{server.url}?timeout=1")
        assert time.monotonic() - started < 5  # the trickle once held a run for good; the stream grew its memory
    finally:
        server.shutdown()


def model_server(max_batch_size=4, infer_s=0.0, read_body=True, stall_mid_answer=False, infer_answer=None,
                 config_changes=None, server_changes=None):
    """A fake Triton serving a 2-class model of 32×32 inputs, whose every answer is one image's logits [1, 2]
    (``infer_s`` seconds after the request; ``read_body=False``: without reading the request's batch;
    ``stall_mid_answer``: an answer's headers and first bytes, then 5 s of nothing; ``infer_answer``: (HTTP
    status, body[, headers]) in place of the logits; ``config_changes``, ``server_changes``: keys set in the
    model's configuration and in the server's metadata)."""
    from medmamba_edge.runtime.metadata import METADATA_KEY, ModelMetadata

    metadata = ModelMetadata(input_size=(32, 32), class_names=("a", "b"), batch=None).to_json()

    def answer(handler):
        if handler.command == "POST":
            time.sleep(infer_s)
            body = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}
        elif handler.path.endswith("/config"):
            body = {"max_batch_size": max_batch_size, "input": [{"name": "input", "data_type": "TYPE_FP32",
                                                                 "dims": [3, 32, 32]}],
                    "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [2]}],
                    "parameters": {METADATA_KEY: {"string_value": metadata}}, **(config_changes or {})}
        else:
            body = {"name": "triton", "version": "2", **(server_changes or {})}
        data = json.dumps(body).encode()
        status, headers = 200, {}
        if infer_answer and handler.command == "POST":
            status, data, *extra = infer_answer
            headers = extra[0] if extra else {}
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if stall_mid_answer and handler.command == "POST":
            handler.wfile.write(data[:20])
            handler.wfile.flush()
            time.sleep(5)
        handler.wfile.write(data)

    return FakeServer(answer, read_body)


def test_a_run_of_many_requests_starts_no_thread_per_request(monkeypatch):
    """Each request's deadline was a threading.Timer: a 1000-image run started 1000 threads."""
    server = model_server(max_batch_size=1)
    try:
        backend = open_backend(f"{server.url}?timeout=5")
        caller, started = threading.current_thread(), []
        real_start = threading.Thread.start

        def counting_start(thread):  # the client's threads only: the fake server's own are no concern here
            if threading.current_thread() is caller:
                started.append(thread)
            return real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        assert backend.run(np.zeros((50, 3, 32, 32), np.float32)).tolist() == [[1.0, 2.0]] * 50  # 50 requests
        monkeypatch.undo()
        assert started == []
        backend.close()
    finally:
        server.shutdown()


def test_an_empty_batch_gives_no_rows():
    """Was numpy's 'need at least one array to concatenate', naming no model."""
    server = model_server()
    try:
        with open_backend(server.url) as backend:
            assert backend.run(np.empty((0, 3, 32, 32), np.float32)).shape == (0, 2)
    finally:
        server.shutdown()


def test_a_server_that_never_reads_the_batch_costs_the_timeout_not_a_hang():
    """The deadline covers sending too: a batch larger than the sockets' buffers to a server that takes the
    connection and reads nothing (then answers 3 s later) is cut at the timeout, as an answer that never comes."""
    server = model_server(infer_s=3.0, read_body=False)
    try:
        backend = open_backend(f"{server.url}?timeout=1")
        started = time.monotonic()
        with pytest.raises(BackendError, match=rf"^{server.url}: server unreachable \(no answer within 1 s\)$"):
            backend.run(np.zeros((4, 3, 1024, 1024), np.float32))  # 48 MiB
        assert time.monotonic() - started < 2
    finally:
        server.shutdown()


def test_a_served_model_config_of_other_types_is_one_line():
    server = model_server(max_batch_size="abc")  # a traceback (ValueError from int("abc")) before
    try:
        with pytest.raises(BackendError, match=r"/m: the served model's configuration is not one Triton writes "
                                               r"\(ValueError: invalid literal for int\(\)"):
            open_backend(server.url)
    finally:
        server.shutdown()


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's recursion limit


@pytest.mark.parametrize("infer_answer, message", [
    ((200, b'{"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1' + b"0" * 400 + b', 2]}]}'),
     r"unreadable answer \(OverflowError: int too large to convert to float\)"),
    ((200, DEEP_JSON), r"unreadable answer \(RecursionError: maximum recursion depth exceeded"),
    ((500, DEEP_JSON), r"the server refused the batch \(HTTP 500: \[\[\["),
    ((500, b'{"error": null}'), r"the server refused the batch \(HTTP 500: no message\)$"),  # was 'HTTP 500: None'
])
def test_an_answer_json_cannot_hold_is_one_line_in_every_command(infer_answer, message):
    """An integer no float holds and arrays nested past the parser's limit raised past the client's reading of
    the answer: `compare` ended in a traceback, `run` and `benchmark` named the error without the server."""
    server = model_server(infer_answer=infer_answer)
    try:
        with pytest.raises(BackendError, match=rf"^{server.url}: {message}"):
            open_backend(server.url).run(np.zeros((1, 3, 32, 32), np.float32))
        samples = ROOT / "medmamba_edge" / "assets" / "samples" / "busi"
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "compare", server.url, server.url,
                                 "--data", str(samples)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        server.shutdown()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.match(rf"error: {server.url}: {message}", result.stderr.strip().splitlines()[-1])


def binary_answer(size: int) -> tuple:
    """An inference answer with the binary tensor extension: logits [1, 2] after a header declaring ``size`` bytes."""
    header = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2],
                                      "parameters": {"binary_data_size": size}}]}).encode()
    return 200, header + np.float32([1, 2]).tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def refusal(infer_answer) -> tuple[str, str]:
    """The fake server's URL and the error a batch of one image gets when the server answers ``infer_answer``."""
    server = model_server(infer_answer=infer_answer)
    try:
        with pytest.raises(BackendError) as refused:
            open_backend(server.url).run(np.zeros((1, 3, 32, 32), np.float32))
    finally:
        server.shutdown()
    return server.url, str(refused.value)


@pytest.mark.parametrize("output", [
    {"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": ["A" * 5000, 2.0]},  # numpy quotes the string
    {"name": "logits", "datatype": "X" * 5000, "shape": [1, 2], "data": [1.0, 2.0]},
])
def test_an_unreadable_answer_quoting_the_server_is_clipped(output):
    """The server's text inside the reading's own error was each record's reason whole: 5 KB for each image."""
    _, error = refusal((200, json.dumps({"outputs": [output]}).encode()))
    said = error.split("unreadable answer (ValueError: ", 1)[1]
    assert said.endswith("…)") and len(said) == 301


def test_logits_past_float32_are_infinite_without_a_warning(tmp_path):
    """1e300 in an FP32 answer's JSON data printed numpy's two-line 'RuntimeWarning: overflow encountered in cast'
    on stderr before the record said the logits are not finite."""
    answer = {"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 2], "data": [1e300, 2.0]}]}
    server = model_server(max_batch_size=1, infer_answer=(200, json.dumps(answer).encode()))
    try:
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "run", server.url,
                                 str(ROOT / "medmamba_edge" / "assets" / "samples" / "busi"), "--jsonl",
                                 str(tmp_path / "r.jsonl")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        server.shutdown()
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "skipped" and "non-finite model output" in r["reason"] for r in records), records[0]
    assert "Warning" not in result.stderr


def test_binary_data_without_the_header_length_is_refused():
    """Without Inference-Header-Content-Length the tail was read from byte 0: an answer declaring 8 bytes of logits
    and sending none gave its JSON header's first bytes as logits (3.03e+32, 7.78e+31), classified."""
    status, body, headers = binary_answer(8)
    url, error = refusal((status, body[:int(headers["Inference-Header-Content-Length"])]))
    assert error == (f"{url}: unreadable answer (ValueError: output 'logits' has binary data but the answer no "
                     f"Inference-Header-Content-Length)")


def test_a_negative_binary_data_size_is_refused():
    """-4 bytes was read as numpy's 'all the rest' (count -1): the tail was taken whatever size the header said."""
    url, error = refusal(binary_answer(-4))
    assert error == (f"{url}: unreadable answer (ValueError: output 'logits' has binary_data_size -4, not a number "
                     f"of bytes)")


# nginx's own error page (a TLS proxy in front of the server, as docs/serving.md suggests, with the server down)
NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx/1.18.0 (Ubuntu)</center>\r\n</body>\r\n</html>\r\n")


def test_a_proxys_error_page_is_said_by_its_title():
    """The page's first line is '<html>', which was all the message said of it: 'HTTP 502: <html>'."""
    server = model_server(infer_answer=(502, NGINX_502))
    try:
        with pytest.raises(BackendError, match=rf"^{server.url}: the server refused the batch "
                                               rf"\(HTTP 502: 502 Bad Gateway\)$"):
            open_backend(server.url).run(np.zeros((1, 3, 32, 32), np.float32))
    finally:
        server.shutdown()


@pytest.mark.parametrize("answer", [
    {"detail": "Model medmamba is not loaded"},  # FastAPI
    {"code": 503, "type": "ServiceUnavailableException", "message": "Model medmamba is not loaded"},  # TorchServe
    {"error": {"code": 503, "message": "Model medmamba is not loaded", "status": "UNAVAILABLE"}},  # nested
    {"error": None, "message": "Model medmamba is not loaded"},
    {"error": True, "message": "Model medmamba is not loaded"},  # was 'True'
    {"error": {"code": 503, "detail": {"reason": "x"}, "message": "Model medmamba is not loaded"}},  # was a repr
])
def test_a_json_error_says_its_message_under_the_keys_servers_use(answer):
    """Only "error" was read, as a string: each of these said 'HTTP 503: no message' (the nested one its dict)."""
    url, error = refusal((503, json.dumps(answer).encode()))
    assert error == f"{url}: the server refused the batch (HTTP 503: Model medmamba is not loaded)"


@pytest.mark.parametrize("answer", [{"detail": [{"msg": "field required"}]}, {"error": {"error": {"message": "x"}}},
                                    {"error": 503}])
def test_a_json_error_without_a_string_message_is_said_as_none_not_as_a_python_repr(answer):
    """A list, a number or an object two levels down was said as Python's repr of it: "[{'msg': 'field required'}]"."""
    _, error = refusal((503, json.dumps(answer).encode()))
    assert error.endswith("(HTTP 503: no message)")


def test_a_long_nested_json_error_message_is_clipped():
    """Said as the nested dict was before: "{'message': 'xxx…"."""
    _, error = refusal((503, json.dumps({"error": {"message": "x" * 5000}}).encode()))
    assert error.split("(HTTP 503: ", 1)[1] == "x" * 299 + "…)"


# A proxy's error page: one line of 56 KB
ERROR_PAGE = "<html><head><style>" + "body{margin:0}" * 4000 + "</style></head><body>Unavailable</body></html>"


def test_a_long_error_page_is_clipped_in_every_record(tmp_path):
    """A proxy's 503 page in one line of 56 KB was each skipped record's reason whole: 9 images gave 500 KB of
    JSONL and as much on the console."""
    server = model_server(infer_answer=(503, ERROR_PAGE.encode()))
    try:
        result = subprocess.run([sys.executable, "-m", "medmamba_edge.cli", "run", server.url,
                                 str(ROOT / "medmamba_edge" / "assets" / "samples"), "--jsonl", str(tmp_path / "r.jsonl")],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
    finally:
        server.shutdown()
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert result.returncode == 1 and len(records) == 9 and {r["status"] for r in records} == {"skipped"}
    said = records[0]["reason"].split("(HTTP 503: ", 1)[1]
    assert said.startswith("<html><head><style>body{margin:0}") and said.endswith("…))") and len(said) == 302
    assert max(len(line) for line in result.stdout.splitlines() + result.stderr.splitlines()) < 600


@pytest.mark.parametrize("server_changes, config_changes", [
    ({"name": ERROR_PAGE}, None), ({"version": ERROR_PAGE}, None), (None, {"backend": ERROR_PAGE}),
])
def test_a_long_server_or_backend_name_is_clipped_in_the_description(server_changes, config_changes):
    """The server's name and version and the model's backend were the description whole: the line `run` and
    `benchmark` print about the model was 56 KB."""
    server = model_server(server_changes=server_changes, config_changes=config_changes)
    try:
        description = open_backend(server.url).describe()
    finally:
        server.shutdown()
    assert "<html><head><style>body{margin:0}" in description and "…" in description and len(description) < 400


def _metadata_with(**changes) -> dict:
    from medmamba_edge.runtime.metadata import METADATA_KEY, ModelMetadata

    metadata = json.loads(ModelMetadata(input_size=(32, 32), class_names=("a", "b"), batch=None).to_json())
    return {"parameters": {METADATA_KEY: {"string_value": json.dumps({**metadata, **changes})}}}


@pytest.mark.parametrize("config_changes, message", [
    ({"input": [{"name": "input", "data_type": ERROR_PAGE, "dims": [3, 32, 32]}]}, "the served input has type "),
    (_metadata_with(schema_version=ERROR_PAGE), "metadata schema_version must be an integer, got '"),
    (_metadata_with(**{ERROR_PAGE: 1}), "unknown metadata fields ['"),
    (_metadata_with(mean=ERROR_PAGE), "mean and std must be finite numbers, got '"),
])
def test_a_configuration_quoting_a_long_text_is_clipped_in_the_error(config_changes, message):
    """The served configuration's values and field names were quoted whole in the error opening the model: one
    line of 56 KB."""
    server = model_server(config_changes=config_changes)
    try:
        with pytest.raises(BackendError) as refused:
            open_backend(server.url)
    finally:
        server.shutdown()
    said = str(refused.value).split(f"{server.url}: {message}", 1)[1]
    assert said.startswith("<html><head><style>body{margin:0}") and "…" in said and len(said) < 400


def test_closing_the_backend_during_a_run_ends_it_at_once_and_sends_nothing_more():
    """close() from another thread between two chunks: the next chunk went out on a socket of http.client's own,
    outside the timeout, and the deadline timer raised in its thread."""
    server, raised = model_server(max_batch_size=1, infer_s=0.3), []
    previous_hook, threading.excepthook = threading.excepthook, raised.append
    try:
        backend = open_backend(f"{server.url}?timeout=5")
        threading.Timer(0.45, backend.close).start()  # during the second of five one-image requests
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"/m: the model was closed"):
            backend.run(np.zeros((5, 3, 32, 32), np.float32))
        assert time.monotonic() - started < 1.0 and not raised
    finally:
        threading.excepthook = previous_hook
        server.shutdown()


@pytest.mark.parametrize("slow", [dict(infer_s=5.0), dict(stall_mid_answer=True)], ids=["before", "mid-answer"])
def test_closing_the_backend_while_a_request_waits_for_its_answer_ends_it_at_once(slow):
    """close() from another thread while a request waited for a slow server (5 s here, 30 s by default) left the
    run waiting for that answer, or for the timeout; in the middle of an answer's body it cut the body short
    without an error from http.client: 'unreadable answer (JSONDecodeError ...)', as if the server sent garbage."""
    server = model_server(max_batch_size=1, **slow)
    try:
        backend = open_backend(f"{server.url}?timeout=30")
        threading.Timer(0.3, backend.close).start()
        started = time.monotonic()
        with pytest.raises(BackendError, match=rf"^{server.url}: the model was closed$"):
            backend.run(np.zeros((1, 3, 32, 32), np.float32))
        assert time.monotonic() - started < 1.5
    finally:
        server.shutdown()


def test_closing_the_backend_while_runs_send_ends_each_as_closed():
    """close() from another thread set the connection's socket to None under a request about to send its batch:
    an AttributeError traceback ('NoneType' object has no attribute 'settimeout') in 45 of 150 tries."""
    server = model_server(max_batch_size=1)
    try:
        for delay in np.linspace(0, 0.02, 15):
            backend, outcome = open_backend(server.url), []

            def run():
                try:
                    while True:
                        backend.run(np.zeros((1, 3, 32, 32), np.float32))
                except Exception as exc:  # what a run ends in: only BackendError is expected
                    outcome.append(exc)

            worker = threading.Thread(target=run)
            worker.start()
            time.sleep(delay)
            backend.close()
            worker.join(10)
            assert [type(e) for e in outcome] == [BackendError] and str(outcome[0]).endswith("the model was closed"), outcome
    finally:
        server.shutdown()


def test_closing_the_backend_while_a_run_connects_sends_nothing(monkeypatch):
    """close() while another thread's connection was being made missed that socket: the request went out."""
    import http.client

    server = model_server()
    try:
        backend = open_backend(server.url)
        real_connect = http.client.socket.create_connection

        def slow_connect(*args, **kwargs):  # a distant server, or a SYN sent again
            time.sleep(0.5)
            return real_connect(*args, **kwargs)

        monkeypatch.setattr(http.client.socket, "create_connection", slow_connect)
        outcome = []

        def run():
            try:
                outcome.append(backend.run(np.zeros((1, 3, 32, 32), np.float32)))
            except BackendError as exc:
                outcome.append(str(exc))

        worker = threading.Thread(target=run)  # a thread of its own: a connection of its own, made now
        worker.start()
        time.sleep(0.2)
        backend.close()
        worker.join()
        assert outcome == [f"{server.url}: the model was closed"]
    finally:
        server.shutdown()


def test_threads_that_end_take_their_connections_with_them():
    """One connection per thread that runs the backend; kept for good, a thread per request ran out of files."""
    import gc
    import os

    server = model_server()
    try:
        backend = open_backend(server.url)
        batch = np.zeros((1, 3, 32, 32), np.float32)
        backend.run(batch)
        gc.collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(20):
            worker = threading.Thread(target=backend.run, args=(batch,))
            worker.start()
            worker.join()
        gc.collect()
        assert len(os.listdir("/proc/self/fd")) <= before + 1
        assert backend.run(batch).tolist() == [[1.0, 2.0]]
        backend.close()
    finally:
        server.shutdown()


def test_a_server_killed_mid_run_ends_the_run_with_every_frame_accounted_for(tmp_path_factory, tmp_path):
    require_serve_python()
    model = official_onnx(tmp_path_factory)
    busi = require_shared("data", "busi")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted(busi.glob("*/*.png"))[:FRAMES]):
        (folder / f"{i:04d}.png").symlink_to(path)
    records = tmp_path / "records.jsonl"
    with running_server(model, tmp_path_factory.mktemp("serve-killed")) as server:
        client = subprocess.Popen([sys.executable, "-m", "medmamba_edge.cli", "run", server.url, str(folder),
                                   "--jsonl", str(records), "--console", "frame"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
        try:
            seen = 0
            for line in client.stdout:  # a line per frame: kill the server once some are classified
                seen += "capture→result" in line
                if seen >= 10:
                    break
            assert seen >= 10, "the run ended before the server was killed"
            server.kill()
            _, errors = client.communicate(timeout=RUN_DEADLINE_S)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert client.returncode == 1
    written = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["seq"] for r in written] == list(range(FRAMES))
    assert [Path(r["source"]).name for r in written] == sorted(p.name for p in folder.iterdir())
    statuses = [r["status"] for r in written]
    classified = statuses.index("skipped")
    assert classified >= 10 and set(statuses[:classified]) <= {"ok", "abstain"}
    assert set(statuses[classified:]) == {"skipped"}
    assert all(f"{server.url}: server unreachable" in r["reason"] for r in written[classified:])
    (error,) = [line for line in errors.splitlines() if line.startswith("error:")]
    assert "batches failed in the model" in error and "server unreachable" in error
