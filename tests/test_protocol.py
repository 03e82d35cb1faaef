"""What the sandbox sends the grader is checked before anything is decoded, and read
within one deadline: replies that ask for more than they carry, name one array many
times, nest without end, or trickle in a byte at a time are refused in bounded time
and memory. (The hostile class in test_class_grading sends such replies from inside
a notebook; these tests pin down the decoder itself.)"""

from __future__ import annotations

import io
import json
import resource
import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch

from bn_exercises import codec
from bncourse import protocol


def _frame(header: dict, blobs: list[tuple[bytes, str]]) -> bytes:
    """A frame whose header is the message ``{key: tree}`` for each key of ``header`` (the
    trees written by hand, as a hostile sender would)."""
    tree = {"__dict__": [[key, value] for key, value in header.items()]}
    body = json.dumps(tree).encode() + b"\n" + json.dumps([[len(b), k] for b, k in blobs]).encode() + b"\n" \
        + b"".join(b for b, _ in blobs)
    return struct.pack("!II", len(body), len(blobs)) + body


def _receive(frame: bytes, deadline: float | None = None) -> dict:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        threading.Thread(target=lambda: _send_quietly(theirs, frame), daemon=True).start()
        return protocol.recv(ours, deadline=deadline if deadline is not None else time.monotonic() + 30)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the reader stopped early, as it should
        pass


def test_a_message_comes_back_as_it_was_sent():
    message = {"value": {"out": np.arange(6.0).reshape(2, 3), (1, "k"): torch.ones(2, dtype=torch.float32),
                         "n": np.float32(1.5), "t": (1, [2, None]), "raw": b"\x00\x01", "odd": float("nan")},
               "text": "ok"}
    ours, theirs = socket.socketpair()
    with ours, theirs:
        protocol.send(theirs, message)
        got = protocol.recv(ours)
    value = got["value"]
    np.testing.assert_array_equal(value["out"], message["value"]["out"])
    assert value[(1, "k")].dtype == np.float32 and value["n"].dtype == np.float32 and value["t"] == (1, [2, None])
    assert value["raw"] == b"\x00\x01" and np.isnan(value["odd"]) and got["text"] == "ok"


def test_an_object_of_another_kind_arrives_as_an_opaque_description():
    got = _receive(protocol.encode({"value": object()}))
    assert isinstance(got["value"], codec.Opaque) and got["value"].type == "object"


def test_one_array_named_many_times_is_refused():
    """A header that names one array 200 times would make the grader decode 200 copies."""
    blob = codec.to_npy(np.zeros(1000))
    frame = _frame({"value": [{"__array__": 0}] * 200}, [(blob, "n")])
    with pytest.raises(protocol.ProtocolError, match="referenced more than once"):
        _receive(frame)


def test_an_array_header_asking_for_more_than_it_carries_is_refused_without_allocating():
    """A 100-byte blob whose .npy header says (10**12,) float64: NumPy's own reader would
    allocate 8 TB first."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    blob = buffer.getvalue() + bytes(24)
    frame = _frame({"value": {"__array__": 0}}, [(blob, "n")])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(protocol.ProtocolError, match="asks for 8000000000000 bytes"):
        _receive(frame)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB


@pytest.mark.parametrize("header, says", [
    ({"value": [[[[0]]]] * 1}, None),
    ({"value": {"__array__": 5}}, "no array 5"),
    ({"value": {"__array__": -1}}, "non-negative"),
    ({"value": {"__ref__": "os:system"}}, "references to functions are not accepted"),
    ({"value": {"__pickle__": "gASV"}}, "unknown tag"),
    ({"value": {"__float__": "1e999999"}}, "special float"),
])
def test_malformed_headers_are_refused(header, says):
    frame = _frame(header, [])
    if says is None:
        assert _receive(frame)["value"] == [[[[0]]]]
    else:
        with pytest.raises(protocol.ProtocolError, match=says):
            _receive(frame)


def test_nesting_without_end_and_too_many_values_are_refused():
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
        _receive(_frame({"value": deep}, []))
    with pytest.raises(protocol.ProtocolError, match="more than"):
        _receive(_frame({"value": [0] * (protocol.MAX_NODES + 1)}, []))


def test_a_frame_that_lies_about_its_size_or_blobs_is_refused():
    with pytest.raises(protocol.ProtocolError, match="exceeds the limit"):
        _receive(struct.pack("!II", protocol.MAX_MESSAGE + 1, 0))
    with pytest.raises(protocol.ProtocolError, match="blobs exceeds"):
        _receive(struct.pack("!II", 10, protocol.MAX_BLOBS + 1))
    body = b'{"value": 1}\n[[5, "n"]]\n' + b"abc"
    with pytest.raises(protocol.ProtocolError, match="do not add up"):
        _receive(struct.pack("!II", len(body), 1) + body)


def test_a_trickling_sender_runs_out_of_time():
    """One byte every 0.2 s: each read would be quick, the whole message never arrives.
    The deadline is for the whole message."""
    frame = protocol.encode({"value": "x" * 1000})
    ours, theirs = socket.socketpair()
    stop = threading.Event()

    def trickle():
        for byte in frame:
            if stop.is_set():
                return
            try:
                theirs.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        protocol.recv(ours, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 2.0
    stop.set()
    ours.close()
    theirs.close()
