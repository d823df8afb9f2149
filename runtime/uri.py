"""How a command's argument that may be a URI is read: the one reading, for models (a served model is
``triton://HOST:PORT/MODEL``), data sets and outputs alike; and how any URI, a video source's too, is shown in
records and messages (``without_password``). Opening a video source's URL is a source's business (runtime/sources)."""

from __future__ import annotations

import os
import re

TRITON_SCHEME = "triton"  # the one kind of model URI: triton://HOST:PORT/MODEL (runtime/backends/triton.py)
# "scheme://": two letters or more, so that a Windows drive (C://m.onnx) stays a path. A served model's "triton:/"
# with one slash too: pathlib.Path folds the double slash of a URL that went through a Path-typed option.
MODEL_URI = re.compile(rf"(?i:({TRITON_SCHEME}):/|([a-z][a-z0-9+.-]+)://)")


def model_uri_scheme(spec) -> str | None:
    """The scheme of a model argument that is a URI, in lower case ("triton", "http"), or None for a path: the one
    reading of MODEL_URI that every command shares, for its data sets and outputs too."""
    match = MODEL_URI.match(str(spec))
    if match is None or (match[2] and _in_a_folder_named_as_its_scheme(spec)):
        return None
    return (match[1] or match[2]).lower()


def uri_refusal(spec, command: str, needed: str) -> str | None:
    """Why ``spec`` is not the local file or folder ``command`` needs (``needed``: "a local model file", "a local
    data set (file or folder)", "a local output file"), when it is a URI, as typed; None for a path. Read as a Path
    a URI had its "//" folded and became a missing file ("http:/host/d.npz: no such file or folder") or, for an
    output, folders named "http:" and "host". To a command that reads or writes files, triton:/m.onnx in a folder
    named "triton:" is that file, whatever a command that serves models would read it as."""
    scheme = model_uri_scheme(spec)
    if scheme is None or _in_a_folder_named_as_its_scheme(spec):
        return None
    kind = "a served model" if scheme == TRITON_SCHEME else "a URI"
    return f"{without_password(spec)}: {command} needs {needed}, not {kind} ({scheme}://)"


# A query parameter that holds a credential: IP cameras' ?user=admin&pwd=…, cloud relays' ?token=… or ?access_token=…,
# SRT's ?passphrase=… (its encryption password, a libsrt option to FFmpeg),
# signed URLs' sig= (Azure) and X-Amz-Signature=: one of these names, or one ending in it after "-", "_" or ".", or
# as a camelCase word (?apiKey=, ?accessToken=, as web APIs spell them); the case of that boundary is what keeps
# ?monkey= apart from ?monKey=.
_SECRET_PARAMETER = re.compile(r"(?i)([?&;](?:[^?&;=#]*(?:[-_.]|(?-i:(?<=[a-z0-9])(?=[A-Z]))))?"
                               r"(?:password|passwd|passphrase|pass|pwd|token|auth|key|secret|signature|sig)=)[^&;#]+")


# A host as FFmpeg reads one, with its port if any: a name or an IPv6 address in brackets. Not an empty one, nor an empty
# port: rtsp:///admin:pw@cam (a slash too many) and admin:/pw@cam name no host or port, and never connect.
_HOST_PORT = re.compile(r"(\[[^\]]+\]|[^:@\[\]]+)(:[0-9]+)?")


def without_password(uri: str) -> str:
    """``uri`` as it may be shown and recorded: a password in it (rtsp://admin:secret@cam/stream, as IP cameras are
    addressed) and a credential in its query (?token=…, ?password=…) as ``***``, the user kept to tell accounts apart;
    a user part without a password (https://TOKEN@relay/stream, rtsp://APIKEY@cam/live) is the token itself to relays
    and cameras that take one, and no name tells it from a user's, so it is all ``***``. Records, console lines and
    errors go to logs, tickets and other people; only the connection itself is given them."""
    scheme, separator, rest = str(uri).partition("://")
    if folded := not separator and re.match(rf"(?i){TRITON_SCHEME}:/", str(uri)):  # a served model's, as MODEL_URI reads
        scheme, separator, rest = folded[0][:-2], ":/", str(uri)[len(folded[0]):]
    if not separator:
        return str(uri)
    authority = re.match(r"[^/?#]*", rest)[0]  # as FFmpeg reads it: up to the first "/", "?" or "#"
    # A password holding an unescaped "/", "?" or "#" (admin:pa/ss@cam) runs on past that to a later "@": when what
    # FFmpeg reads is no host[:port] (that URL never connects), or when its path holds an "@" too (admin:p@ss/word@cam,
    # read as host "ss"), all up to the last "@" is masked. An "@" is allowed in a path and a query, so elsewhere that
    # would mask a working stream's host; that it may in these two cases is the safe side to err on.
    tail = rest[len(authority):]
    read_user, read_at, _ = authority.rpartition("@")  # the user part FFmpeg reads, if any
    if ("@" in re.match(r"[^?#]*", tail)[0] if "@" in authority else "@" in tail and not _HOST_PORT.fullmatch(authority)):
        last = rest.rindex("@")
        authority = rest[:last] + re.match(r"@[^/?#]*", rest[last:])[0]
    userinfo, at, host = authority.rpartition("@")  # a password may hold "@" unescaped: the host follows the last
    # The user is kept, to tell accounts apart; a lone user part is masked whole but for the slashes of rtsp:///TOKEN@…,
    # which name no host and are shown as typed. Whether there is a password is FFmpeg's reading where it reads a user
    # part: in T0KEN@cam:554/live@main the ":" is the port's, not one after a user.
    has_password = ":" in (read_user if read_at else userinfo)
    shown = f"{re.match(r'[^:]*:' if has_password else '/*', userinfo)[0]}***@{host}" if at else authority
    return f"{scheme}{separator}{shown}" + _SECRET_PARAMETER.sub(r"\1***", rest[len(authority):])


def _in_a_folder_named_as_its_scheme(spec) -> bool:
    """runs://m.onnx is runs:/m.onnx to the file system: with a folder named "runs:" here it is a path, to read or
    to write (os.path: Path.is_dir raises for a name too long)."""
    return os.path.isdir(str(spec).split("/", 1)[0])
