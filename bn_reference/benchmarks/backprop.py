"""Chapter 4 benchmark: the staged vs the compact backward pass of batch
normalization, and NumPy vs PyTorch (CPU) forward + backward, on the same shapes.

Run ``python -m bn_reference.benchmarks.backprop`` (``--quick`` for the
book's smaller setting) to print the table; the Chapter 4 page draws its figure
with :func:`plot` on the rows :func:`run` returns.

Method: all variants of one (N, D, dtype) are measured in the same run,
interleaved (repeat r times each variant once, in a rotating order), so that
a change in machine load hits all of them alike; each timing is the mean of
enough calls to last a few milliseconds (``time.perf_counter``), and the
reported time is the median over the repeats. Ratios compare medians.
PyTorch runs on one thread by default, like NumPy's element-wise operations,
so that the comparison is between implementations, not core counts
(``--torch-threads`` changes it).
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch
import torch.nn.functional as F

from . import intra_op_threads, median_times, text_table
from .. import backprop as ref

__all__ = ["VARIANTS", "FULL", "QUICK", "run", "format_table", "plot", "main"]

VARIANTS = ("staged backward", "compact backward", "NumPy forward+backward", "PyTorch forward+backward")
FULL = {"shapes": [(64, 256), (512, 512), (4096, 1024)], "dtypes": ("float32", "float64"), "repeats": 21}
QUICK = {"shapes": [(64, 256), (512, 512), (2048, 512)], "dtypes": ("float32", "float64"), "repeats": 7}



def _variants(n: int, d: int, dtype: str, seed: int):
    """Zero-argument callables for the four variants on one seeded random problem."""
    rng = np.random.default_rng(seed)
    x, dout = (rng.normal(size=(n, d)).astype(dtype) for _ in range(2))
    gamma, beta = (rng.normal(size=d).astype(dtype) for _ in range(2))
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    dt = torch.tensor(dout)

    def torch_forward_backward():
        out = F.batch_norm(xt, None, None, gt, bt, training=True, eps=1e-5)
        return torch.autograd.grad(out, (xt, gt, bt), dt)

    return {
        "staged backward": lambda: ref.batchnorm_backward(dout, cache),
        "compact backward": lambda: ref.batchnorm_backward_compact(dout, cache),
        "NumPy forward+backward": lambda: ref.batchnorm_backward_compact(
            dout, ref.batchnorm_forward(x, gamma, beta)[1]),
        "PyTorch forward+backward": torch_forward_backward,
    }


def run(shapes=FULL["shapes"], dtypes=FULL["dtypes"], repeats: int = FULL["repeats"], seed: int = 0,
        torch_threads: int = 1) -> list[dict]:
    """Time the four ``VARIANTS`` on every (N, D) in ``shapes`` and dtype in ``dtypes``.

    PyTorch uses ``torch_threads`` intra-op threads (0: its default); the
    setting is restored afterwards. Returns one dict per (shape, dtype): ``n``,
    ``d``, ``dtype``, ``torch_threads``, ``seconds`` ({variant: median seconds
    per call}), ``staged/compact`` and ``PyTorch/NumPy`` (ratios of medians;
    above 1 means the second is faster).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    with intra_op_threads(torch_threads):
        rows = []
        for n, d in shapes:
            for dtype in dtypes:
                seconds = median_times(_variants(n, d, dtype, seed), repeats)
                rows.append({
                    "n": n, "d": d, "dtype": dtype, "torch_threads": torch.get_num_threads(), "seconds": seconds,
                    "staged/compact": seconds["staged backward"] / seconds["compact backward"],
                    "PyTorch/NumPy": seconds["PyTorch forward+backward"] / seconds["NumPy forward+backward"],
                })
    return rows


def format_table(rows: list[dict], brief: bool = False) -> str:
    """The rows as a text table: milliseconds per call and the two ratios. ``brief``: the
    compact backward's milliseconds and the ratios only (narrow enough for the book's page)."""
    variants = VARIANTS[1:2] if brief else VARIANTS
    head = ["N x D", "dtype", *(f"{v} ms" for v in variants), "staged/compact", "PyTorch/NumPy"]
    lines = [[f"{r['n']} x {r['d']}", r["dtype"], *(f"{1e3 * r['seconds'][v]:.3f}" for v in variants),
              f"{r['staged/compact']:.2f}", f"{r['PyTorch/NumPy']:.2f}"] for r in rows]
    return text_table(head, lines)


def _environment(rows: list[dict]) -> str:
    threads = sorted({r["torch_threads"] for r in rows})
    return (f"NumPy {np.__version__}, PyTorch {torch.__version__} on {'/'.join(map(str, threads))} "
            f"thread{'s' if threads != [1] else ''}, {platform.machine()}")


def plot(rows: list[dict]):
    """A two-panel matplotlib figure of the ratios per shape and dtype, panels stacked (readable
    in a book's column); returns the Figure."""
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(f"{r['n']} x {r['d']}" for r in rows))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    titles = {"staged/compact": "staged / compact backward time",
              "PyTorch/NumPy": "PyTorch / NumPy forward+backward time"}
    width = 0.8 / len(dtypes)
    for ax, key in zip(axes, titles):
        for j, dtype in enumerate(dtypes):
            values = [next(r[key] for r in rows if f"{r['n']} x {r['d']}" == s and r["dtype"] == dtype)
                      for s in shapes]
            xs = np.arange(len(shapes)) + (j - (len(dtypes) - 1) / 2) * width
            bars = ax.bar(xs, values, width, label=dtype)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(shapes)), shapes)
        ax.set_ylabel("ratio of median times")
        ax.set_title(titles[key])
        ax.margins(y=0.15)
    axes[-1].set_xlabel("N x D")
    axes[0].legend(title="dtype", fontsize=8)
    fig.suptitle(f"above 1: the second variant is faster\n({_environment(rows)})", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the book's smaller setting (smaller shapes, fewer repeats)")
    parser.add_argument("--torch-threads", type=int, default=1, help="PyTorch intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    rows = run(**setting, torch_threads=args.torch_threads)
    print(f"Batch-norm backward benchmark, median of {setting['repeats']} interleaved repeats; {_environment(rows)}")
    print(format_table(rows))
    print("A ratio above 1 means the second variant named is faster.")


if __name__ == "__main__":
    main()
