"""Benchmarks that run in the repository with one command each, for example
``python -m bn_reference.benchmarks.backprop``; the book pages draw their speed
figures with the same code at a smaller setting.

:func:`median_times` is how every benchmark here times its variants: side by
side in one run, interleaved in a rotating order, so that a noisy machine slows
them all alike and the ratios stay meaningful.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

MIN_SECONDS = 5e-3  # each timing averages enough calls to last at least this long


def calls_per_timing(fn) -> int:
    """Warm up ``fn`` (first calls can be slow, e.g. a backward through eigh) and return how
    many calls last about ``MIN_SECONDS``."""
    fn()
    start = time.perf_counter()
    fn()
    return max(1, math.ceil(MIN_SECONDS / max(time.perf_counter() - start, 1e-9)))


def median_times(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each callable, measured interleaved in a rotating order."""
    calls = {name: calls_per_timing(fn) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(s) for name, s in samples.items()}


def text_table(head: list[str], lines: list[list[str]]) -> str:
    """``head`` and ``lines`` (rows of cells) as right-aligned columns with a rule below the head."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run the block with ``n`` PyTorch intra-op threads (0: PyTorch's default), then restore."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(n or default)
    try:
        yield
    finally:
        torch.set_num_threads(default)
