"""The wire format between the grader and the sandboxed notebook process.

A message is a JSON header plus binary blobs, framed by lengths: the header is
:func:`bn_exercises.codec.encode`'s tree, each blob one array as ``.npy`` (or
bytes). Nothing read from the sandbox is ever unpickled, and nothing is decoded
before the frame has been checked: its size against the limit, the blob sizes
against the frame, each ``.npy`` header against its blob (:func:`codec.from_npy`),
every blob referenced at most once - so what the grader builds from a reply is
never larger than the reply. (The grader's own requests carry cloudpickled course
code as bytes; the sandbox trusts the grader, never the reverse.)

Every read has a deadline for the whole message, not per chunk: a sender that
trickles one byte at a time runs out of time like one that sends nothing.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

import numpy as np

from bn_exercises import codec
from bn_exercises.codec import Opaque  # noqa: F401 - what an undecodable value of a reply becomes

MAX_MESSAGE = 64 * 2**20   # bytes; a larger message from the sandbox is a protocol violation
MAX_BLOBS = 10_000         # arrays in one message
MAX_NODES = 200_000        # values in one message's header
_LENGTHS = struct.Struct("!II")


class ProtocolError(Exception):
    """The other side sent something that is not a well-formed message, or hung up."""


def encode(message: dict) -> bytes:
    """One framed message: the header (a dict of values) and its blobs."""
    tree, arrays = codec.encode(message)
    blobs = [a.tobytes() if a.dtype == np.uint8 and a.ndim == 1 else codec.to_npy(a) for a in arrays]
    kinds = ["b" if a.dtype == np.uint8 and a.ndim == 1 else "n" for a in arrays]
    header = codec.dumps(tree).encode()
    sizes = json.dumps([[len(b), k] for b, k in zip(blobs, kinds)]).encode()
    body = header + b"\n" + sizes + b"\n" + b"".join(blobs)
    return _LENGTHS.pack(len(body), len(blobs)) + body


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(encode(message))


def _recv_exactly(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("the deadline passed before the whole message arrived")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ProtocolError("the other side closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket, limit: int = MAX_MESSAGE, deadline: float | None = None) -> dict:
    """Read one message by ``deadline`` (``time.monotonic()`` seconds; ``socket.timeout``
    when it passes); :class:`ProtocolError` if it is malformed or larger than ``limit``."""
    size, n_blobs = _LENGTHS.unpack(_recv_exactly(sock, _LENGTHS.size, deadline))
    if size > limit:
        raise ProtocolError(f"a message of {size} bytes exceeds the limit of {limit}")
    if n_blobs > MAX_BLOBS:
        raise ProtocolError(f"a message of {n_blobs} blobs exceeds the limit of {MAX_BLOBS}")
    body = _recv_exactly(sock, size, deadline)
    try:
        header, sizes, rest = body.split(b"\n", 2)
        sizes = json.loads(sizes)
        if not isinstance(sizes, list) or len(sizes) != n_blobs or not all(
                isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and s[0] >= 0 and s[1] in ("b", "n")
                for s in sizes):
            raise ValueError("the blob table is malformed")
        if sum(s[0] for s in sizes) != len(rest):
            raise ValueError("blob sizes do not add up")
        offsets = np.cumsum([0, *(s[0] for s in sizes)])

        def array(i: int) -> np.ndarray:
            blob = rest[offsets[i]:offsets[i + 1]]
            return np.frombuffer(blob, dtype=np.uint8).copy() if sizes[i][1] == "b" else codec.from_npy(blob)

        message = codec.decode(json.loads(header), array, max_nodes=MAX_NODES)
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:  # DecodeError is a ValueError
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a dict")
    return message
