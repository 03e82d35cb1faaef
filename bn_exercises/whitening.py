"""Chapter 3 - whitening versus batch normalization: the exercise's visible checks and helpers.

Each ``check_*`` runs the learner's function on the visible cases recorded from
the grader's check of the same name (``answers/whitening.npz``) and says what is
wrong, naming the misconception when a known wrong implementation gave the same
outputs. The ``_run_*`` functions are the only code that touches the learner's
function: they pass the case's arrays to it unchanged and return plain data. The
grader runs the same ``_run_*`` functions on its hidden cases.

PCA whitening is defined only up to the sign of each row (and, where eigenvalues
are equal, up to a rotation inside their eigenspace), so ``_run_whitening``
compares PCA and ZCA matrices through ``W @ W.T`` and ``W.T @ W``, which do not
depend on those choices and pin the answer down exactly (see its docstring).

The notebook's helpers are here too: :func:`drift_problem` and :func:`cost_data`
make the experiment's seeded data, :func:`cpu_time` times a function on one BLAS
thread, and :func:`eigenvector_derivative` is the first-order change of an
eigenvector (the formula the derivation task starts from).
"""

from __future__ import annotations

import statistics
import time
from functools import lru_cache

import numpy as np

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_whitening_matrix",
    "check_whiten",
    "check_bn_identity_parameters",
    "check_bias_drift",
    "check_whitening_experiment",
    "check_zca_derivative",
    "drift_problem",
    "cost_data",
    "cpu_time",
    "eigenvector_derivative",
    "YES",
    "NO",
]

#: Case data that are functions (none in this chapter): see bn_exercises.codec.resolver.
CASE_HELPERS: dict = {}

#: How an experiment's run reports whether a phenomenon showed (strings read better than 1.0 / 0.0).
YES, NO = "yes", "no"


# --------------------------------------------------------------------------
# Helpers the notebook imports

@lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits  # shipped with scikit-learn: nothing is downloaded

    pixels = load_digits().data / 16.0
    pixels.setflags(write=False)
    return pixels


def drift_problem(seed: int, m: int = 128, d: int = 8):
    """The experiment's layer input and target, seeded: ``(u (m, d), t (d,))``, float64.

    u holds the pre-activations of d units for m digit images (scikit-learn's 8x8
    digits, pixels scaled to [0, 1]) under a random projection, plus a random offset per
    unit: correlated features of different spreads. t is a random target vector."""
    rng = np.random.default_rng(seed)
    images = _digits()[rng.choice(len(_digits()), size=m, replace=False)]
    u = images @ (rng.normal(size=(images.shape[1], d)) / 2) + rng.uniform(-1, 1, size=d)
    return u, rng.normal(size=d)


def cost_data(seed: int, m: int, d: int) -> np.ndarray:
    """A seeded (m, d) float64 batch of correlated features for the timing experiment."""
    rng = np.random.default_rng([seed, d])
    return rng.normal(size=(m, d)) @ rng.normal(size=(d, d))


@lru_cache(maxsize=1)
def _cpu_clock_step() -> float:
    """How far ``time.process_time`` moves at a time here, in seconds: about a microsecond
    on most machines, a whole scheduler tick (a millisecond or more) in some sandboxes."""
    start = time.process_time()
    deadline = time.perf_counter() + 0.1
    now = start
    while now == start and time.perf_counter() < deadline:
        now = time.process_time()
    return max(now - start, 1e-6)


def cpu_time(fn, repeats: int = 5, min_seconds: float = 2e-3) -> float:
    """The median CPU time of one call of ``fn()`` in seconds, on one BLAS thread.

    Each of ``repeats`` timings runs enough calls to last ``min_seconds`` (longer where
    the CPU clock moves in coarse steps: at least 10 of them); the process's CPU time
    (``time.process_time``) is counted, not the wall clock, so other programs on a busy
    machine change the result little, and BLAS is pinned to one thread (``threadpoolctl``)
    so that the comparison is between algorithms. How many calls that takes is judged on
    the wall clock, which never reads 0."""
    if not callable(fn):
        raise TypeError(f"cpu_time needs a function to call, got {type(fn).__name__}: "
                        "pass a function of no arguments, e.g. lambda: whitening_matrix(X).")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    from threadpoolctl import threadpool_limits

    sample = max(min_seconds, 10 * _cpu_clock_step())
    with threadpool_limits(limits=1):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        calls = max(1, int(np.ceil(sample / max(time.perf_counter() - start, 1e-7))))
        samples = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                fn()
            samples.append((time.process_time() - start) / calls)
    return statistics.median(samples)


def eigenvector_derivative(sigma, d_sigma, k: int) -> np.ndarray:
    """The first-order change of the k-th eigenvector (descending order) of the symmetric
    ``sigma`` (d, d) when it moves by the symmetric ``d_sigma``: du_k = sum_{j != k}
    u_j (u_j^T dSigma u_k) / (lambda_k - lambda_j), shape (d,). It needs lambda_k to be a
    simple eigenvalue: the terms grow like 1 / (lambda_k - lambda_j) as another one meets it."""
    lam, U = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
    lam, U = lam[::-1], U[:, ::-1]
    coupling = U.T @ np.asarray(d_sigma, dtype=np.float64) @ U[:, k]
    others = np.arange(len(lam)) != k
    return U[:, others] @ (coupling[others] / (lam[k] - lam[others]))


# --------------------------------------------------------------------------
# Running the learner's functions

def _as_float_array(x):
    """x as a float64 array when it is numeric (lists, tensors, arrays), else x unchanged."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return x


def _pair(result, what):
    """The two parts of a returned pair, or a CheckFailed that says what came back."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        size = f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""
        raise CheckFailed(f"{what}, got a {type(result).__name__}{size}.")
    return [_as_float_array(r) for r in result]


def _symmetric_positive_definite(W: np.ndarray) -> str:
    """YES when W equals its transpose (to rounding) and has only positive eigenvalues."""
    scale = np.abs(W).max()
    if not np.isfinite(scale) or not np.allclose(W, W.T, rtol=1e-9, atol=1e-12 * scale):
        return NO
    return YES if np.linalg.eigvalsh((W + W.T) / 2).min() > 0 else NO


def _run_whitening(fn, case):
    """``whitening_matrix(X[, method][, eps])``'s (W, mu) as comparable outputs.

    Cholesky's W is unique and compared as it is. A PCA W is right exactly when
    ``W.T @ W = Sigma_eps^-1`` (it whitens) and ``W @ W.T`` is diagonal with the inverse
    eigenvalues in ascending order (its rows are eigen-directions, largest variance
    first) - whatever the sign of each row, and whatever basis it picks inside the
    eigenspace of a repeated eigenvalue. A ZCA W is right exactly when
    ``W @ W.T = W.T @ W = Sigma_eps^-1`` and W is symmetric positive definite (the one
    symmetric positive square root). Comparing these rather than W lets a catalogue
    entry (PCA returned for ZCA, W transposed) match a learner whose rows have other
    signs than the reference's. Where W has nan or inf entries, the products spread them over
    every entry, so their positions are an output of their own."""
    d = case.data
    method = d["method"] or "zca"
    args = [d["X"]] + ([] if d["method"] is None else [d["method"]]) + ([] if d["eps"] is None else [d["eps"]])
    W, mu = _pair(fn(*args), "whitening_matrix must return a pair (W, mu)")
    features = np.shape(d["X"])[1]
    square = isinstance(W, np.ndarray) and W.shape == (features, features)
    out = {"shape of W": str(np.shape(W))}
    if method == "cholesky" or not square:
        out["W"] = W
    else:
        bad = np.argwhere(~np.isfinite(W))
        out["entries of W that are nan or inf"] = ", ".join(map(str, map(tuple, bad.tolist()))) or "none"
        out["W @ W.T"] = W @ W.T
        out["W.T @ W"] = W.T @ W
        if method == "zca":
            out["W is symmetric positive definite"] = _symmetric_positive_definite(W)
    out["mu"] = mu
    return out


def _run_whiten(fn, case):
    d = case.data
    return {"whitened": _as_float_array(fn(d["X"], d["W"], d["mu"]))}


def _run_identity(fn, case):
    d = case.data
    result = fn(d["x"]) if d["eps"] is None else fn(d["x"], d["eps"])
    gamma, beta = _pair(result, "bn_identity_parameters must return a pair (gamma, beta)")
    return {"gamma": gamma, "beta": beta}


def _run_drift(fn, case):
    d = case.data
    args = [d["u"], d["b0"], d["lr"], d["steps"], d["inside"]] + ([] if d["target"] is None else [d["target"]])
    b, loss = _pair(fn(*args), "bias_drift must return a pair (b_history, loss_history)")
    return {"b_history": b, "loss_history": loss}


#: What whitening_experiment returns: key -> what it holds (shapes in terms of steps, d, dims).
EXPERIMENT_KEYS = {
    "b": "b after each step without beta, (steps + 1, d)",
    "loss": "the loss at each of those b, (steps + 1,)",
    "b_beta": "b after each step with the learned beta, (steps + 1, d)",
    "loss_beta": "the loss at each step with beta, (steps + 1,)",
    "W": "the whitening matrix of the last step without beta, (d, d)",
    "d": "the numbers of features timed, a list",
    "whitening_ms": "milliseconds per whitening of the batch at each d, a list",
    "standardization_ms": "milliseconds per standardization at each d, a list",
}


def _experiment_results(fn, case) -> dict:
    """The learner's experiment's dict, its arrays as float64, or a CheckFailed naming what is missing."""
    d = case.data
    kwargs = {k: d[k] for k in ("steps", "lr", "dims", "m") if d.get(k) is not None}
    result = fn(d["seed"], **kwargs)
    if not isinstance(result, dict):
        raise CheckFailed(f"whitening_experiment must return a dict with the keys {', '.join(EXPERIMENT_KEYS)}, "
                          f"got a {type(result).__name__}.")
    missing = [k for k in EXPERIMENT_KEYS if k not in result]
    if missing:
        raise CheckFailed("whitening_experiment's dict lacks " + "; ".join(f"{k!r} ({EXPERIMENT_KEYS[k]})"
                                                                             for k in missing) + ".")
    return {k: _as_float_array(result[k]) for k in EXPERIMENT_KEYS}


def _yes(condition) -> str:
    return YES if bool(condition) else NO


def _close(a, b) -> bool:
    """a equals b to 1e-6 of b's size (float64 rounding is far below that)."""
    return bool(np.all(np.abs(a - b) <= 1e-6 * np.abs(b).max() + 1e-12))


def _run_experiment(fn, case):
    """Run ``whitening_experiment(seed, ...)`` and report, as "yes" or "no", what it must show.

    Each phenomenon holds with a wide margin for a right experiment on every seed (the
    tests prove it on several, for two implementations), and none depends on the
    learner's whitening being right - only on the experiment doing with it what section
    5 asks (a wrong whitening_matrix costs its own task, not this one too): without beta,
    z does not depend on b, so every step adds lr W^T t to b, where W is the learner's own
    matrix, and the loss stays put; with beta, b settles at W^T t (1 - (1 - lr)^steps).
    """
    r = _experiment_results(fn, case)
    steps, lr = int(case.data.get("steps") or 100), float(case.data.get("lr") or 0.5)
    _, t = drift_problem(case.data["seed"])
    shapes = {"b": (steps + 1, len(t)), "loss": (steps + 1,), "b_beta": (steps + 1, len(t)),
              "loss_beta": (steps + 1,), "W": (len(t), len(t))}
    out = {f"shape of {key}": str(np.shape(r[key])) for key, shape in shapes.items() if np.shape(r[key]) != shape}
    if out:
        return out  # the reference's shapes are `shapes`
    b, loss, b_beta, loss_beta, W = (r[k] for k in shapes)
    norm = np.linalg.norm
    with np.errstate(all="ignore"):
        out["without beta, the first step moves b by lr * W.T @ t (W: the matrix your experiment returned)"] = \
            _yes(_close(b[1] - b[0], lr * W.T @ t))
        out["without beta, b keeps drifting: after the last step it is at least steps / 2 times as far from "
            "where it started as after the first step, and at least 1 away"] = \
            _yes(norm(b[-1] - b[0]) >= max(steps / 2 * norm(b[1] - b[0]), 1.0))
        out["without beta, the loss never moves: relative change below 1e-6"] = \
            _yes(np.all(np.abs(loss - loss[0]) <= 1e-6 * abs(loss[0])))
        out["with beta, b settles: it moves by less than 1e-3 |b| over the second half of the steps"] = \
            _yes(norm(b_beta[-1] - b_beta[steps // 2]) <= 1e-3 * norm(b_beta[-1]) + 1e-9)
        out["with beta, the loss falls below its value without beta by at least 10 %"] = \
            _yes(loss_beta[-1] <= 0.9 * loss[-1])
        out["after the last step, b without beta is steps * lr / (1 - (1 - lr)^steps) times b with beta"] = \
            _yes(_close(b[-1], steps * lr / (1 - (1 - lr) ** steps) * b_beta[-1]))
    dims = [int(x) for x in np.atleast_1d(r["d"])]
    out["d timed"] = str(dims)
    times_w, times_s = np.atleast_1d(r["whitening_ms"]), np.atleast_1d(r["standardization_ms"])
    if len(dims) >= 2 and times_w.shape == times_s.shape == (len(dims),):
        with np.errstate(all="ignore"):
            ratio = times_w / times_s
            out["at the largest d, whitening takes at least 10 times as long as standardization"] = \
                _yes(ratio[-1] >= 10)
            out["the time ratio whitening / standardization grows at least 4-fold from the smallest d to the largest"] = \
                _yes(ratio[-1] >= 4 * ratio[0])
    else:
        out["timings: one whitening and one standardization time per d"] = f"{times_w.shape} and {times_s.shape}"
    return out


def _run_zca_derivative(fn, case):
    d = case.data
    return {"dW": _as_float_array(fn(d["sigma"], d["d_sigma"]))}


# --------------------------------------------------------------------------
# The checks

def check_whitening_matrix(whitening_matrix, hidden=False):
    """Check whitening_matrix(X, method="zca", eps=1e-5) -> (W, mu) for PCA (rows up to sign),
    ZCA and covariance-Cholesky whitening."""
    __tracebackhide__ = True
    recorded_check(check_whitening_matrix, "whitening_matrix", whitening_matrix, _run_whitening, hidden)


def check_whiten(whiten, hidden=False):
    """Check whiten(X, W, mu) -> (X - mu) @ W.T for X (..., d)."""
    __tracebackhide__ = True
    recorded_check(check_whiten, "whiten", whiten, _run_whiten, hidden)


def check_bn_identity_parameters(bn_identity_parameters, hidden=False):
    """Check bn_identity_parameters(x, eps=1e-5) -> (gamma, beta), per channel (axis 1)."""
    __tracebackhide__ = True
    recorded_check(check_bn_identity_parameters, "bn_identity_parameters", bn_identity_parameters, _run_identity,
                   hidden)


def check_bias_drift(bias_drift, hidden=False):
    """Check bias_drift(u, b0, lr, steps, inside, target=1.0) -> (b_history, loss_history)."""
    __tracebackhide__ = True
    recorded_check(check_bias_drift, "bias_drift", bias_drift, _run_drift, hidden)


def check_whitening_experiment(whitening_experiment, hidden=False):
    """Check whitening_experiment(seed, steps=100, lr=0.5, dims=(16, 64, 256), m=256) -> dict:
    the bias drifts with the whitening outside the gradient, settles with a learned beta,
    and whitening's cost grows against standardization's."""
    __tracebackhide__ = True
    recorded_check(check_whitening_experiment, "whitening_experiment", whitening_experiment, _run_experiment,
                   hidden)


def check_zca_derivative(zca_derivative, hidden=False):
    """Check zca_derivative(sigma, d_sigma) -> dW, the change of sigma^(-1/2)."""
    __tracebackhide__ = True
    recorded_check(check_zca_derivative, "zca_derivative", zca_derivative, _run_zca_derivative, hidden)
