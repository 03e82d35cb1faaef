"""Plain data as JSON plus arrays: the one encoding of the course's recorded answers
and of what the class grader's sandbox sends back.

:func:`encode` turns a value made of numbers, strings, ``None``, lists, tuples,
dicts, NumPy arrays and scalars, torch tensors and dtypes into a JSON-able tree
and a list of arrays; :func:`decode` turns them back. Nothing is ever pickled.
Tags in the tree:

``{"__array__": i}``, ``{"__tensor__": i, "grad": b}``, ``{"__scalar__": i}``,
``{"__bytes__": i}`` (the i-th array), ``{"__tuple__": [...]}``,
``{"__dict__": [[key, value], ...]}``, ``{"__dtype__": name, "torch": b}``,
``{"__ref__": "module:name"}`` and ``{"__partial__": ref, "args": [...],
"kwargs": {...}}`` (a function of the learner package, only where the caller
resolves names: recorded cases that build a small model), ``{"__opaque__":
type, "repr": text}`` (anything else, when encoding is not strict).

Decoding is bounded: at most ``max_nodes`` values, nesting at most ``MAX_DEPTH``,
and, unless ``reuse`` is allowed, no array referenced twice - so the size of
what comes out is bounded by the size of what came in. :func:`from_npy` reads
one ``.npy`` blob after checking that its header asks for exactly the bytes it
carries (NumPy's own reader allocates what the header asks for first).
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["DecodeError", "Opaque", "encode", "decode", "dumps", "to_npy", "from_npy"]

MAX_DEPTH = 64


class DecodeError(ValueError):
    """The tree or an array is not well formed, or asks for more than allowed."""


@dataclass(frozen=True)
class Opaque:
    """A value of a type the encoding does not carry (a learner's object, a module...)."""

    type: str
    repr: str

    def __repr__(self) -> str:
        return f"<{self.type} {self.repr}>"


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and type(x).__name__ in ("Tensor", "Parameter")


def _is_torch_dtype(x: Any) -> bool:
    return type(x).__module__ == "torch" and type(x).__name__ == "dtype"


def encode(value: Any, arrays: list | None = None, *, strict: bool = False,
           refer: Callable[[Any], str | None] | None = None, shared: dict | None = None) -> tuple[Any, list]:
    """``(tree, arrays)`` for ``value``; its arrays are appended to ``arrays`` (a new list
    by default), which the tree refers to by index.

    ``strict``: raise :class:`TypeError` for a value the encoding does not carry
    (instead of an :class:`Opaque`). ``refer(obj)`` names a function (``"module:name"``)
    that the decoding side can resolve, or returns ``None``. ``shared``: a dict that
    makes equal arrays share one entry (give the same dict to every call that adds to
    one ``arrays`` list; only :func:`decode` with ``reuse=True`` accepts the result).
    """
    arrays = [] if arrays is None else arrays
    return _encode(value, arrays, strict, refer, shared, 0), arrays


def _add(array: np.ndarray, arrays: list, shared: dict | None) -> int:
    if shared is None:
        arrays.append(array)
        return len(arrays) - 1
    key = (array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes())
    if key not in shared:
        arrays.append(array)
        shared[key] = len(arrays) - 1
    return shared[key]


def _encode(obj, arrays, strict, refer, shared, depth):
    if depth > MAX_DEPTH:
        if strict:
            raise TypeError("a value nested too deeply to encode")
        return {"__opaque__": type(obj).__name__, "repr": "(nested too deeply)"}
    enc = functools.partial(_encode, arrays=arrays, strict=strict, refer=refer, shared=shared, depth=depth + 1)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return {"__scalar__": _add(np.asarray(obj), arrays, shared)} if not isinstance(obj, np.object_) \
            else _opaque(obj, strict)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": _add(np.frombuffer(bytes(obj), dtype=np.uint8), arrays, shared)}
    if isinstance(obj, np.ndarray) or _is_tensor(obj):
        tensor = not isinstance(obj, np.ndarray)
        try:
            array = obj.detach().cpu().numpy() if tensor else obj
        except (TypeError, RuntimeError):  # bfloat16, sparse, meta tensors...
            return _opaque(obj, strict)
        if array.dtype.hasobject:
            return _opaque(obj, strict)
        index = _add(np.array(array), arrays, shared)
        return {"__tensor__": index, "grad": bool(obj.requires_grad)} if tensor else {"__array__": index}
    if isinstance(obj, np.dtype):
        return {"__dtype__": obj.str, "torch": False}
    if _is_torch_dtype(obj):
        return {"__dtype__": str(obj).removeprefix("torch."), "torch": True}
    if isinstance(obj, dict):
        return {"__dict__": [[enc(k), enc(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [enc(v) for v in obj]}
    if isinstance(obj, list):
        return [enc(v) for v in obj]
    if refer is not None:
        if isinstance(obj, functools.partial):
            name = refer(obj.func)
            if name is not None:
                return {"__partial__": name, "args": [enc(a) for a in obj.args],
                        "kwargs": {k: enc(v) for k, v in obj.keywords.items()}}
        else:
            name = refer(obj)
            if name is not None:
                return {"__ref__": name}
    return _opaque(obj, strict)


def _opaque(obj, strict):
    if strict:
        raise TypeError(f"cannot encode a {type(obj).__module__}.{type(obj).__qualname__}: {obj!r:.120}")
    try:
        text = repr(obj)[:200]
    except Exception:  # a learner's __repr__ may raise
        text = "(no repr)"
    return {"__opaque__": type(obj).__name__[:100], "repr": text}


def decode(tree: Any, array: Callable[[int], np.ndarray], *, resolve: Callable[[str], Any] | None = None,
           tensors: bool = False, reuse: bool = False, max_nodes: int = 1_000_000) -> Any:
    """The value ``tree`` encodes; ``array(i)`` gives the i-th array.

    ``resolve(name)`` turns a ``"module:name"`` reference into the object (references
    are refused without it); ``tensors``: tensors come back as torch tensors (else as
    arrays). :class:`DecodeError` for anything malformed or over the bounds.
    """
    state = {"nodes": 0, "used": set()}

    def get(i):
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise DecodeError("an array index must be a non-negative integer")
        if not reuse:
            if i in state["used"]:
                raise DecodeError(f"array {i} is referenced more than once")
            state["used"].add(i)
        try:
            return array(i)
        except (IndexError, KeyError):
            raise DecodeError(f"no array {i}") from None

    def dec(obj, depth):
        state["nodes"] += 1
        if state["nodes"] > max_nodes:
            raise DecodeError(f"more than {max_nodes} values")
        if depth > MAX_DEPTH:
            raise DecodeError("nested too deeply")
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, list):
            return [dec(v, depth + 1) for v in obj]
        if not isinstance(obj, dict) or len(obj) > 3:
            raise DecodeError(f"unexpected {type(obj).__name__} in the tree")
        if "__array__" in obj:
            return get(obj["__array__"])
        if "__scalar__" in obj:
            value = get(obj["__scalar__"])
            if value.ndim:
                raise DecodeError("a scalar must be a 0-d array")
            return value[()]
        if "__tensor__" in obj:
            value = get(obj["__tensor__"])
            if not tensors:
                return value
            import torch
            t = torch.from_numpy(np.array(value))
            return t.requires_grad_() if obj.get("grad") is True and t.is_floating_point() else t
        if "__bytes__" in obj:
            return get(obj["__bytes__"]).tobytes()
        if "__float__" in obj:
            if obj["__float__"] not in ("nan", "inf", "-inf"):
                raise DecodeError("a special float must be nan, inf or -inf")
            return float(obj["__float__"])
        if "__tuple__" in obj:
            items = obj["__tuple__"]
            if not isinstance(items, list):
                raise DecodeError("a tuple must hold a list")
            return tuple(dec(v, depth + 1) for v in items)
        if "__dict__" in obj:
            pairs = obj["__dict__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise DecodeError("a dict must hold [key, value] pairs")
            return {_hashable(dec(k, depth + 1)): dec(v, depth + 1) for k, v in pairs}
        if "__dtype__" in obj:
            name = obj["__dtype__"]
            if not isinstance(name, str):
                raise DecodeError("a dtype must be named")
            if obj.get("torch"):
                import torch
                dtype = getattr(torch, name, None)
                if not isinstance(dtype, torch.dtype):
                    raise DecodeError(f"torch has no dtype {name!r}")
                return dtype
            try:
                return np.dtype(name)
            except TypeError:
                raise DecodeError(f"NumPy has no dtype {name!r}") from None
        if "__ref__" in obj or "__partial__" in obj:
            if resolve is None:
                raise DecodeError("references to functions are not accepted here")
            if "__ref__" in obj:
                return resolve(obj["__ref__"])
            args, kwargs = obj.get("args", []), obj.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise DecodeError("a partial needs a list of args and a dict of kwargs")
            return functools.partial(resolve(obj["__partial__"]), *[dec(a, depth + 1) for a in args],
                                     **{str(k): dec(v, depth + 1) for k, v in kwargs.items()})
        if "__opaque__" in obj:
            return Opaque(str(obj["__opaque__"])[:100], str(obj.get("repr", ""))[:200])
        raise DecodeError(f"unknown tag in the tree: {sorted(obj)[:3]}")

    try:
        return dec(tree, 0)
    except RecursionError:
        raise DecodeError("nested too deeply") from None


def _hashable(key: Any) -> Any:
    return key if isinstance(key, (str, int, float, bool, type(None), Opaque, tuple)) else repr(key)


def dumps(tree: Any) -> str:
    """The tree as compact JSON (NaN never appears: special floats are tagged)."""
    return json.dumps(tree, separators=(",", ":"), allow_nan=False)


def resolver(prefix: str = "bn_exercises.") -> Callable[[str], Any]:
    """``resolve`` for :func:`decode`: ``"module:name"`` of a module under ``prefix``, and
    only the names that module lists in its ``CASE_HELPERS``."""
    def resolve(name: Any) -> Any:
        if not isinstance(name, str) or ":" not in name:
            raise DecodeError(f"a reference must read 'module:name', got {name!r:.80}")
        module, _, attr = name.partition(":")
        if not module.startswith(prefix):
            raise DecodeError(f"{module} is not a module of the learner package")
        try:
            helpers = importlib.import_module(module).CASE_HELPERS
        except (ImportError, AttributeError):
            raise DecodeError(f"{module} has no case helpers") from None
        if attr not in helpers:
            raise DecodeError(f"{name} is not one of {module}'s case helpers")
        return helpers[attr]
    return resolve


def referrer(prefix: str = "bn_exercises.") -> Callable[[Any], str | None]:
    """``refer`` for :func:`encode`: the name :func:`resolver` resolves back to ``obj``."""
    def refer(obj: Any) -> str | None:
        module = getattr(obj, "__module__", "") or ""
        if not module.startswith(prefix):
            return None
        helpers = getattr(importlib.import_module(module), "CASE_HELPERS", {})
        return next((f"{module}:{name}" for name, helper in helpers.items() if helper is obj), None)
    return refer


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` blob, refusing a header that asks for more (or fewer) bytes
    than the blob carries, and object arrays."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise DecodeError(f".npy version {version} is not accepted")
        shape, fortran, dtype = read_header(f)
    except (ValueError, OSError, SyntaxError) as exc:
        raise DecodeError(f"not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise DecodeError("object arrays are not accepted")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - f.tell():
        raise DecodeError(f"the .npy header asks for {count * dtype.itemsize} bytes, the blob has "
                          f"{len(data) - f.tell()}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=f.tell())
    return array.reshape(shape, order="F" if fortran else "C").copy()
