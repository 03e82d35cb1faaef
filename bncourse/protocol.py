"""The wire format between the grader and the sandboxed notebook process.

A message is a JSON header plus binary blobs, framed by lengths. Values are
encoded as JSON with tags: numpy arrays and torch tensors travel as ``.npy``
blobs (read back with ``allow_pickle=False``), dicts as key/value pairs (keys
need not be strings), bytes as blobs; anything else becomes an :class:`Opaque`
(its type name and a short repr). Nothing read from the sandbox is ever
unpickled: the grader only decodes JSON and ``.npy``. (The grader's own
requests to the sandbox carry cloudpickled course code as bytes; the sandbox
trusts the grader, never the reverse.)
"""

from __future__ import annotations

import io
import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_MESSAGE = 64 * 2**20  # bytes; a larger message from the sandbox is a protocol violation
_LENGTHS = struct.Struct("!II")


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed message, or hung up."""


@dataclass(frozen=True)
class Opaque:
    """A value of a type the protocol does not carry (a learner's object, a module...)."""

    type: str
    repr: str

    def __repr__(self) -> str:
        return f"<{self.type} {self.repr}>"


def _encode(obj: Any, blobs: list[bytes], depth: int = 0) -> Any:
    if depth > 64:
        return {"__opaque__": type(obj).__name__, "repr": "(nested too deeply)"}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (bytes, bytearray)):
        blobs.append(bytes(obj))
        return {"__bytes__": len(blobs) - 1}
    if isinstance(obj, np.ndarray) or type(obj).__name__ == "Tensor" and hasattr(obj, "detach"):
        tag = "__array__" if isinstance(obj, np.ndarray) else "__tensor__"
        array = obj if isinstance(obj, np.ndarray) else obj.detach().cpu().numpy()
        if array.dtype.hasobject:
            return {"__opaque__": "object array", "repr": repr(array)[:200]}
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        blobs.append(buffer.getvalue())
        return {tag: len(blobs) - 1}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, blobs, depth + 1), _encode(v, blobs, depth + 1)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, blobs, depth + 1) for v in obj]
    try:
        text = repr(obj)[:200]
    except Exception:  # a learner's __repr__ may raise
        text = "(no repr)"
    return {"__opaque__": type(obj).__name__, "repr": text}


def _decode(obj: Any, blobs: list[bytes]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, blobs) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__dict__" in obj:
        return {_hashable(_decode(k, blobs)): _decode(v, blobs) for k, v in obj["__dict__"]}
    if "__array__" in obj or "__tensor__" in obj:
        blob = blobs[int(obj.get("__array__", obj.get("__tensor__")))]
        return np.load(io.BytesIO(blob), allow_pickle=False)
    if "__bytes__" in obj:
        return blobs[int(obj["__bytes__"])]
    if "__opaque__" in obj:
        return Opaque(str(obj["__opaque__"]), str(obj.get("repr", "")))
    raise ProtocolError(f"unknown tag in message: {sorted(obj)[:3]}")


def _hashable(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool, type(None), Opaque)) else repr(key)


def encode(message: dict) -> bytes:
    """One framed message: the header (a dict of values) and its blobs."""
    blobs: list[bytes] = []
    header = json.dumps(_encode(message, blobs)).encode()
    sizes = json.dumps([len(b) for b in blobs]).encode()
    body = header + b"\n" + sizes + b"\n" + b"".join(blobs)
    return _LENGTHS.pack(len(body), len(blobs)) + body


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(encode(message))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket, limit: int = MAX_MESSAGE) -> dict:
    """Read one message; :class:`ProtocolError` if it is malformed or larger than ``limit``."""
    size, n_blobs = _LENGTHS.unpack(_recv_exactly(sock, _LENGTHS.size))
    if size > limit:
        raise ProtocolError(f"a message of {size} bytes exceeds the limit of {limit}")
    body = _recv_exactly(sock, size)
    try:
        header, sizes, rest = body.split(b"\n", 2)
        sizes = [int(s) for s in json.loads(sizes)]
        if len(sizes) != n_blobs or sum(sizes) != len(rest) or min(sizes, default=0) < 0:
            raise ValueError("blob sizes do not add up")
        offsets = np.cumsum([0, *sizes])
        blobs = [rest[offsets[i]:offsets[i + 1]] for i in range(n_blobs)]
        message = _decode(json.loads(header), blobs)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a dict")
    return message
