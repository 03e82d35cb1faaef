"""Chapter 3 benchmark: ZCA whitening against batch normalization as the number of
features d grows, forward and forward + backward (autograd), in PyTorch, float64.

Run ``python -m bn_reference.benchmarks.whitening`` (``--quick`` for the book's
smaller setting) to print the table; the Chapter 3 page draws its figure with
:func:`plot` on the rows :func:`run` returns.

Both sides are written with the same plain tensor operations
(``bn_reference.whitening.zca_whiten_torch`` through ``torch.linalg.eigh``, and
``batchnorm_torch``), so the comparison is between the algorithms: O(m d^2) for
the covariance plus O(d^3) for its eigen-decomposition, against O(m d).

Method: each variant is timed with :func:`bn_exercises.whitening.cpu_time` - the
median over the repeats of the process's CPU time per call, BLAS pinned to one thread
- the helper the exercise's learners time their own whitening with; PyTorch runs on
one intra-op thread by default (``--torch-threads`` changes it), so that the
comparison is between algorithms, not core counts, and a busy machine changes it
little. Ratios compare medians.
"""

from __future__ import annotations

import argparse
import platform

import numpy as np
import torch

from bn_exercises.whitening import cpu_time

from . import intra_op_threads, text_table
from .. import whitening as ref

__all__ = ["VARIANTS", "RATIOS", "FULL", "QUICK", "run", "format_table", "plot", "main"]

VARIANTS = ("ZCA forward", "BN forward", "ZCA forward+backward", "BN forward+backward")
#: ratio name -> (numerator, denominator)
RATIOS = {"ZCA/BN forward": ("ZCA forward", "BN forward"),
          "ZCA/BN forward+backward": ("ZCA forward+backward", "BN forward+backward")}
FULL = {"m": 256, "dims": (16, 32, 64, 128, 256, 512, 1024), "repeats": 7}
QUICK = {"m": 256, "dims": (16, 32, 64, 128, 256, 512), "repeats": 5}



def _variants(m: int, d: int, seed: int) -> dict:
    """Zero-argument callables for the four variants on one seeded (m, d) float64 batch."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, d, generator=gen, dtype=torch.float64) @ torch.randn(d, d, generator=gen, dtype=torch.float64)
         ).requires_grad_()
    dout = torch.randn(m, d, generator=gen, dtype=torch.float64)

    def forward(f):
        def call():
            with torch.no_grad():
                return f(x)
        return call

    def forward_backward(f):
        return lambda: torch.autograd.grad(f(x), x, dout)

    return {"ZCA forward": forward(ref.zca_whiten_torch), "BN forward": forward(ref.batchnorm_torch),
            "ZCA forward+backward": forward_backward(ref.zca_whiten_torch),
            "BN forward+backward": forward_backward(ref.batchnorm_torch)}


def run(m: int = FULL["m"], dims=FULL["dims"], repeats: int = FULL["repeats"], seed: int = 0,
        torch_threads: int = 1) -> list[dict]:
    """Time the four ``VARIANTS`` on an (m, d) batch for every d in ``dims``.

    PyTorch uses ``torch_threads`` intra-op threads (0: its default); the setting is
    restored afterwards. Returns one dict per d: ``m``, ``d``, ``torch_threads``,
    ``seconds`` ({variant: median seconds per call}) and the ``RATIOS`` (ratios of
    medians; above 1 means BN is faster).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if m < 2 or min(dims) < 1:
        raise ValueError(f"m must be >= 2 and every d >= 1, got m = {m}, dims = {tuple(dims)}.")
    with intra_op_threads(torch_threads):
        rows = []
        for d in dims:
            seconds = {name: cpu_time(fn, repeats) for name, fn in _variants(m, d, seed).items()}
            row = {"m": m, "d": d, "torch_threads": torch.get_num_threads(), "seconds": seconds}
            row.update({name: seconds[a] / seconds[b] for name, (a, b) in RATIOS.items()})
            rows.append(row)
    return rows


def growth_exponent(rows: list[dict], variant: str, points: int = 3) -> float:
    """The slope of the least-squares line through log(time) against log(d) for the
    ``points`` largest d of ``rows``: about 1 for O(d), 3 for O(d^3)."""
    last = sorted(rows, key=lambda r: r["d"])[-points:]
    if len(last) < 2:
        raise ValueError("growth_exponent needs timings for at least two values of d.")
    logs = np.log([[r["d"], r["seconds"][variant]] for r in last])
    return float(np.polyfit(logs[:, 0], logs[:, 1], 1)[0])


#: Short column names for the table (it must fit a book page's column).
_SHORT = {"ZCA forward": "ZCA fwd", "BN forward": "BN fwd", "ZCA forward+backward": "ZCA f+b",
          "BN forward+backward": "BN f+b", "ZCA/BN forward": "fwd ratio", "ZCA/BN forward+backward": "f+b ratio"}


def format_table(rows: list[dict]) -> str:
    """The rows as a text table: milliseconds per call (fwd: forward, f+b: forward +
    backward) and the two ZCA/BN ratios."""
    head = ["d", *(f"{_SHORT[v]} ms" for v in VARIANTS), *(_SHORT[k] for k in RATIOS)]
    lines = [[str(r["d"]), *(f"{1e3 * r['seconds'][v]:.3f}" for v in VARIANTS),
              *(f"{r[k]:.0f}" if r[k] >= 10 else f"{r[k]:.1f}" for k in RATIOS)] for r in rows]
    return f"m = {rows[0]['m']}, ZCA/BN ratios of CPU time\n" + text_table(head, lines)


def _environment(rows: list[dict]) -> str:
    threads = sorted({r["torch_threads"] for r in rows})
    return (f"PyTorch {torch.__version__}, float64, {'/'.join(map(str, threads))} "
            f"thread{'s' if threads != [1] else ''}, {platform.machine()}")


def plot(rows: list[dict]):
    """Two panels, one above the other: CPU time per call against d (log-log, with d and d^3
    guide lines), and the ZCA/BN ratios against d. Returns the Figure."""
    import matplotlib.pyplot as plt

    dims = np.array([r["d"] for r in rows], dtype=float)
    fig, axes = plt.subplots(2, 1, figsize=(8, 7.2))
    styles = {"ZCA forward": ("tab:red", "--"), "BN forward": ("tab:blue", "--"),
              "ZCA forward+backward": ("tab:red", "-"), "BN forward+backward": ("tab:blue", "-")}
    for v in VARIANTS:
        color, line = styles[v]
        axes[0].loglog(dims, [1e3 * r["seconds"][v] for r in rows], line, marker="o", ms=3, color=color, label=v)
    for power, variant, label in ((1, "BN forward+backward", r"$\propto d$"), (3, "ZCA forward+backward", r"$\propto d^3$")):
        guide = 1e3 * rows[-1]["seconds"][variant] * (dims / dims[-1]) ** power
        axes[0].loglog(dims, guide, ":", color="gray", lw=1)
        axes[0].annotate(label, (dims[0], guide[0]), fontsize=8, color="gray", textcoords="offset points",
                         xytext=(2, 4))
    axes[0].set(ylabel="ms of CPU time per call", title=f"time per call, m = {rows[0]['m']}")
    axes[0].legend(fontsize=9)
    for name, color in zip(RATIOS, ("tab:purple", "tab:green")):
        axes[1].loglog(dims, [r[name] for r in rows], marker="o", ms=3, color=color, label=name)
    axes[1].set(ylabel="ZCA time / BN time", title="how many times slower ZCA is")
    axes[1].legend(fontsize=9)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(int(d)) for d in dims])
        ax.minorticks_off()
        ax.set_xlabel("d (features)")
    fig.suptitle(f"ZCA whitening vs BN, same tensor operations\n({_environment(rows)})", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the book's smaller setting")
    parser.add_argument("--torch-threads", type=int, default=1, help="PyTorch intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    rows = run(**setting, torch_threads=args.torch_threads)
    print(f"ZCA whitening vs batch normalization, median CPU time of {setting['repeats']} repeats; "
          f"{_environment(rows)}")
    print(format_table(rows))
    print(f"growth over the three largest d: ZCA forward+backward ~ d^{growth_exponent(rows, 'ZCA forward+backward'):.1f}, "
          f"BN forward+backward ~ d^{growth_exponent(rows, 'BN forward+backward'):.1f}")
    print("A ratio above 1 means BN is faster.")


if __name__ == "__main__":
    main()
