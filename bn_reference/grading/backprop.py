"""Chapter 4 - the backward pass of batch normalization: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's function, runs it and the reference
(``bn_reference.backprop``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more shapes).

The backward checks feed the learner's functions a cache made by the
*reference* forward pass, so a wrong forward pass cannot fail them; the
forward check in turn verifies that the learner's cache holds the same keys
(``bn_reference.backprop.CACHE_KEYS``) and values, so that in the notebook the
learner's backward functions can read the learner's own cache just as well.
Outputs are checked one at a time (``out`` before the cache; dbeta, dgamma,
then dx), so each message is about one quantity.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Mapping
from functools import partial

import numpy as np

from .. import backprop as ref
from . import Case, CheckFailed, Misconception, run_check, report_pass

__all__ = [
    "check_batchnorm_forward",
    "check_batchnorm_backward",
    "check_batchnorm_backward_compact",
    "check_numerical_gradient",
    "check_rel_error",
    "CATALOGUE",
]


# --------------------------------------------------------------------------
# Wrong implementations, each a switchable variation of otherwise right code.

def _forward(x, gamma, beta, eps=1e-5, ddof=0, eps_inside=True, axis=0, eps_used=True):
    """Algorithm 1 with switchable mistakes; returns (out, {}): only out is compared."""
    x = np.asarray(x)
    eps = eps if eps_used else 1e-5
    mu = x.mean(axis=axis, keepdims=True)
    var = x.var(axis=axis, ddof=ddof, keepdims=True)
    x_hat = (x - mu) / (np.sqrt(var + eps) if eps_inside else np.sqrt(var) + eps)
    return gamma * x_hat + beta, {}


FORWARD_CATALOGUE = [
    Misconception(
        "unbiased (N-1) batch variance in the forward pass",
        "Algorithm 1 divides by N (the biased variance): use x.var(axis=0), whose default is ddof=0. "
        "The unbiased estimate belongs to the running statistics used at inference (Chapter 5).",
        partial(_forward, ddof=1)),
    Misconception(
        "eps added outside the square root",
        "normalize by sqrt(var + eps), not sqrt(var) + eps (Algorithm 1).",
        partial(_forward, eps_inside=False)),
    Misconception(
        "statistics over the feature axis instead of the batch axis (that is layer normalization)",
        "batch normalization averages over the examples: mean and var with axis=0, one value per feature.",
        partial(_forward, axis=1)),
    Misconception(
        "the eps argument is ignored (a fixed 1e-5 is used)",
        "use the eps passed to the function in sqrt(var + eps); 1e-5 is only its default.",
        partial(_forward, eps_used=False)),
]


def _backward(dout, cache, reduce="sum", constant_stats=False, mean_path=True, var_path=True, with_gamma=True):
    """Backward pass with switchable mistakes; returns (dx, dgamma, dbeta)."""
    dout = np.asarray(dout)
    x_hat, inv_std = cache["x_hat"], cache["inv_std"]
    gamma = cache["gamma"] if with_gamma else 1.0
    n = dout.shape[0]
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    if constant_stats:
        dx = gamma * inv_std * dout
    else:
        dx = (gamma * inv_std / n) * (n * dout - mean_path * dbeta - var_path * x_hat * dgamma)
    if reduce == "none":
        dbeta, dgamma = dout, dout * x_hat
    elif reduce == "mean":
        dbeta, dgamma = dbeta / n, dgamma / n
    return dx, dgamma, dbeta


BACKWARD_CATALOGUE = [
    Misconception(
        "dgamma or dbeta is not summed over the batch",
        "gamma and beta are shared by all N examples, so their gradients add up: "
        "dbeta = dout.sum(axis=0), dgamma = (dout * x_hat).sum(axis=0), each of shape (D,).",
        partial(_backward, reduce="none")),
    Misconception(
        "dgamma or dbeta is averaged over the batch instead of summed",
        "the loss depends on gamma through all N outputs: sum the per-example terms, do not divide by N.",
        partial(_backward, reduce="mean")),
    Misconception(
        "dx computed with mu and sigma treated as constants (dx = gamma * dout / sigma)",
        "mu and sigma2 are computed from the whole batch, so every x_i also changes them: add the paths "
        "through mu and sigma2 (Sec. 3), which gives "
        "dx = gamma / (N sigma) * (N dout - sum(dout) - x_hat * sum(dout * x_hat)).",
        partial(_backward, constant_stats=True)),
    Misconception(
        "dx is missing the x_hat * sum(dout * x_hat) term (the path through the variance)",
        "x_i also changes sigma2: include dl/dsigma2 * dsigma2/dx_i, which contributes "
        "-gamma / (N sigma) * x_hat * sum(dout * x_hat).",
        partial(_backward, var_path=False)),
    Misconception(
        "dx is missing the -sum(dout) term (the path through the mean)",
        "x_i also changes mu: include dl/dmu * dmu/dx_i = dl/dmu / N, which contributes "
        "-gamma / (N sigma) * sum(dout).",
        partial(_backward, mean_path=False)),
    Misconception(
        "dx is missing the factor gamma",
        "y = gamma * x_hat + beta, so dl/dx_hat = gamma * dout before anything else.",
        partial(_backward, with_gamma=False)),
]


def _numgrad(f, x, dout, h=1e-5, step="central", restore=True, use_dout=True, own_dtype=False):
    """Finite-difference gradient of sum(f(x) * dout) with switchable mistakes."""
    x = np.array(x) if own_dtype else np.array(x, dtype=np.float64)
    weight = np.asarray(dout, dtype=np.float64) if use_dout else 1.0
    grad = np.zeros(x.shape)
    for k in np.ndindex(x.shape):
        old = x[k]
        x[k] = old + h
        plus = np.sum(f(x) * weight)
        x[k] = old - h
        minus = np.sum(f(x) * weight)
        x[k] = old
        center = np.sum(f(x) * weight)
        if step == "forward":
            grad[k] = (plus - center) / h
        elif step == "backward":
            grad[k] = (center - minus) / h
        elif step == "half":
            grad[k] = (plus - minus) / h
        else:
            grad[k] = (plus - minus) / (2 * h)
        if not restore:
            x[k] = old - h
    return grad


NUMERICAL_GRADIENT_CATALOGUE = [
    Misconception(
        "a one-sided (forward) difference",
        "use the central difference (L(x + h) - L(x - h)) / (2 h): its error is O(h^2), "
        "the forward difference (L(x + h) - L(x)) / h has an O(h) error.",
        partial(_numgrad, step="forward")),
    Misconception(
        "a one-sided (backward) difference",
        "use the central difference (L(x + h) - L(x - h)) / (2 h): its error is O(h^2), "
        "the backward difference (L(x) - L(x - h)) / h has an O(h) error.",
        partial(_numgrad, step="backward")),
    Misconception(
        "the central difference is divided by h instead of 2 h",
        "x + h and x - h are 2 h apart: divide L(x + h) - L(x - h) by 2 h.",
        partial(_numgrad, step="half")),
    Misconception(
        "dout is ignored (the gradient of sum(f(x)) instead of sum(f(x) * dout))",
        "weight the outputs by dout before summing: L = np.sum(f(x) * dout).",
        partial(_numgrad, use_dout=False)),
    Misconception(
        "x is not restored after perturbing an element",
        "put the old value back (x[k] = old) before moving to the next element.",
        partial(_numgrad, restore=False)),
    Misconception(
        "the differences are taken in float32 (x's own dtype)",
        "work on a float64 copy, x = np.array(x, dtype=np.float64): float32 resolves about 1e-7 "
        "relative, so x + h with h = 1e-5 is rounded and L(x + h) - L(x - h) is mostly rounding noise.",
        partial(_numgrad, own_dtype=True)),
]


def _rel_error(a, b, reduce=np.max, floor=1e-8, ratio_of_max=False, symmetric=True):
    """rel_error with switchable mistakes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    scale = np.abs(a) + np.abs(b) if symmetric else np.abs(a)
    if ratio_of_max:
        return float(diff.max() / max(scale.max(), floor))
    return float(reduce(diff / (np.maximum(scale, floor) if floor else scale)))


REL_ERROR_CATALOGUE = [
    Misconception(
        "the mean relative error instead of the maximum",
        "report the worst element: np.max(...), so that one bad entry is not averaged away.",
        partial(_rel_error, reduce=np.mean)),
    Misconception(
        "no floor in the denominator (0 / 0 gives nan where both arrays are 0)",
        "divide by np.maximum(np.abs(a) + np.abs(b), 1e-8).",
        partial(_rel_error, floor=0)),
    Misconception(
        "the ratio of the maxima, max|a - b| / max(|a| + |b|), instead of the largest element-wise ratio",
        "divide element by element first, then take the maximum: a small entry with a large relative "
        "error must show up.",
        partial(_rel_error, ratio_of_max=True)),
    Misconception(
        "divides by |a| only (the error is not symmetric in a and b)",
        "divide by |a| + |b| (floored at 1e-8), so rel_error(a, b) == rel_error(b, a).",
        partial(_rel_error, symmetric=False)),
]

CATALOGUE = {
    "batchnorm_forward": FORWARD_CATALOGUE,
    "batchnorm_backward": BACKWARD_CATALOGUE,
    "batchnorm_backward_compact": BACKWARD_CATALOGUE,
    "numerical_gradient": NUMERICAL_GRADIENT_CATALOGUE,
    "rel_error": REL_ERROR_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible seeds are 0..; hidden seeds start at 1000 and add shapes.
# Data are random, never uniform: dout = ones would make dx exactly 0.

_F32 = {"rtol": 1e-4, "atol": 1e-4}  # float32 resolves about 1e-7; the data are O(1)


def _layer(rng, n, d, dtype=np.float64, spread=None):
    """x (n, d) whose features have different means and spreads, gamma (both signs, away
    from 1) and beta (d,), and a random dout (n, d) with a per-feature offset."""
    loc = rng.uniform(-3, 3, size=d)
    scale = rng.uniform(0.3, 3, size=d) if spread is None else spread
    x = rng.normal(size=(n, d)) * scale + loc
    gamma = rng.uniform(0.5, 2, size=d) * rng.choice([-1.0, 1.0], size=d)
    beta = rng.normal(size=d)
    dout = rng.normal(size=(n, d)) + rng.normal(size=d)
    return {k: v.astype(dtype) for k, v in {"x": x, "gamma": gamma, "beta": beta, "dout": dout}.items()}


def _bn_cases(hidden: bool):
    """Cases shared by the forward and backward checks (each with its dout)."""
    rng = np.random.default_rng(1000 if hidden else 0)
    shapes = [(16, 4), (2, 3), (7, 1)] + ([(64, 10), (3, 5)] if hidden else [])
    cases = [Case(f"x {n} x {d} float64, default eps", {**_layer(rng, n, d), "eps": None}) for n, d in shapes]
    cases.append(Case("x 10 x 3 float64 with a tiny spread (std 0.01), eps=1e-3",
                      {**_layer(rng, 10, 3, spread=0.01), "eps": 1e-3}))
    data = _layer(rng, 12, 3)
    data["x"][:, 1] = 2.5  # a constant feature, exactly representable so its variance is exactly 0
    cases.append(Case("x 12 x 3 float64 whose 2nd feature is constant, default eps", {**data, "eps": None}))
    cases.append(Case("x 32 x 6 float32, default eps", {**_layer(rng, 32, 6, np.float32), "eps": None, **_F32}))
    if hidden:
        cases.append(Case("x 2 x 4 float32, eps=0.1", {**_layer(rng, 2, 4, np.float32), "eps": 0.1, **_F32}))
        cases.append(Case("x 40 x 2 float64, eps=0.5", {**_layer(rng, 40, 2), "eps": 0.5}))
    return cases


def _call_forward(fn, case):
    d = case.data
    args = (d["x"].copy(), d["gamma"].copy(), d["beta"].copy())
    return fn(*args) if d["eps"] is None else fn(*args, d["eps"])


def _run_forward_out(fn, case):
    result = _call_forward(fn, case)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise CheckFailed("batchnorm_forward must return a pair (out, cache), "
                          f"got {type(result).__name__} on case: {case.label}")
    return {"out": result[0]}


def _run_forward_cache(fn, case):
    cache = _call_forward(fn, case)[1]
    if not isinstance(cache, Mapping):
        raise CheckFailed(f"batchnorm_forward's cache must be a dict, got {type(cache).__name__}.")
    missing = [k for k in ref.CACHE_KEYS if k not in cache]
    if missing:
        raise CheckFailed(f"batchnorm_forward's cache lacks {', '.join(map(repr, missing))}: the backward "
                          f"functions read the keys {', '.join(ref.CACHE_KEYS)}, so the cache must hold them all.")
    return {"cache": {k: cache[k] for k in ref.CACHE_KEYS}}


def check_batchnorm_forward(batchnorm_forward, hidden=False):
    """Check batchnorm_forward(x, gamma, beta, eps=1e-5) -> (out, cache): first out,
    then the cache's keys and values (``bn_reference.backprop.CACHE_KEYS``)."""
    __tracebackhide__ = True
    cases = _bn_cases(hidden)
    run_check("batchnorm_forward", batchnorm_forward, ref.batchnorm_forward, cases,
              _run_forward_out, FORWARD_CATALOGUE)
    report_pass("batchnorm_forward", run_check("batchnorm_forward's cache", batchnorm_forward,
                                           ref.batchnorm_forward, cases, _run_forward_cache))


def _backward_case(case):
    """The case's data with the reference forward's cache for x, gamma, beta, eps."""
    d = case.data
    eps = {} if d["eps"] is None else {"eps": d["eps"]}
    return ref.batchnorm_forward(d["x"], d["gamma"], d["beta"], **eps)[1], d["dout"]


def _run_backward(fn, case, output):
    cache, dout = _backward_case(case)
    cache = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in cache.items()}
    result = fn(dout.copy(), cache)
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise CheckFailed("the backward pass must return a triple (dx, dgamma, dbeta), "
                          f"got {type(result).__name__} on case: {case.label}")
    return {output: dict(zip(("dx", "dgamma", "dbeta"), result))[output]}


def _check_backward(task, student, reference, hidden):
    __tracebackhide__ = True
    run_check(task, student, reference, (), None)  # refuses the reference itself, under the task's own name
    cases = [Case(c.label + ", random dout", c.data) for c in _bn_cases(hidden)]
    for output in ("dbeta", "dgamma", "dx"):
        n = run_check(f"{task}'s {output}", student, reference, cases,
                      partial(_run_backward, output=output), BACKWARD_CATALOGUE)
    report_pass(task, n)


def check_batchnorm_backward(batchnorm_backward, hidden=False):
    """Check batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta), given the reference forward's cache."""
    __tracebackhide__ = True
    _check_backward("batchnorm_backward", batchnorm_backward, ref.batchnorm_backward, hidden)


LOOP_MISCONCEPTION = "a Python loop in the compact backward pass"
_LOOP_NODES = (ast.For, ast.AsyncFor, ast.While, ast.comprehension)
_LOOP_BUILTINS = {"sum", "map", "range"}  # Python's sum(dout) loops over the rows


def _python_loop(fn):
    """A description of the first Python-level loop in fn's source, or None (also when the
    source is unavailable)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, _LOOP_NODES):
            return f"a {type(node).__name__.lower()} loop"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _LOOP_BUILTINS:
            return f"Python's built-in {node.func.id}()"
    return None


def check_batchnorm_backward_compact(batchnorm_backward_compact, hidden=False):
    """Check batchnorm_backward_compact(dout, cache) like the staged one, and that its
    source has no Python loop over examples or features."""
    __tracebackhide__ = True
    loop = _python_loop(batchnorm_backward_compact)
    if loop is not None:
        raise CheckFailed(
            f"batchnorm_backward_compact is not in closed form: its code uses {loop}.\n"
            f"  Your code matches a known mistake: {LOOP_MISCONCEPTION}.\n"
            f"  How to fix it: write the closed form with whole-array NumPy operations "
            f"(dout.sum(axis=0), broadcasting), with no loop over examples or features.",
            misconception=LOOP_MISCONCEPTION)
    _check_backward("batchnorm_backward_compact", batchnorm_backward_compact, ref.batchnorm_backward_compact, hidden)


def _bn_loss_out(x, gamma, beta):
    """The BN forward's output as a function of x alone (for numerical_gradient)."""
    return ref.batchnorm_forward(x, gamma, beta)[0]


def _tanh_scaled(x, a):
    return np.tanh(a * x)


def _tanh_linear(x, w):
    return np.tanh(x @ w)


def _numgrad_cases(hidden: bool):
    rng = np.random.default_rng(1003 if hidden else 3)
    cases = []
    for n, d, h in [(5, 3, 1e-5), (2, 3, 1e-3)] + ([(4, 2, 1e-4)] if hidden else []):
        layer = _layer(rng, n, d)
        cases.append(Case(f"f = batch-norm forward on x {n} x {d}, h={h:g}",
                          {"f": partial(_bn_loss_out, gamma=layer["gamma"], beta=layer["beta"]),
                           "x": layer["x"], "dout": layer["dout"], "h": h}))
    shape = (2, 3, 2) if hidden else (6,)
    cases.append(Case(f"f = tanh(2 x) on x of shape {shape}, h=1e-3",
                      {"f": partial(_tanh_scaled, a=2.0), "x": rng.normal(size=shape),
                       "dout": rng.normal(size=shape), "h": 1e-3}))
    w = rng.normal(size=(4, 2))
    cases.append(Case("f = tanh(x @ W) with x 3 x 4 and W 4 x 2 (f(x) is 3 x 2, so is dout), h=1e-4",
                      {"f": partial(_tanh_linear, w=w), "x": rng.normal(size=(3, 4)),
                       "dout": rng.normal(size=(3, 2)), "h": 1e-4}))
    layer = _layer(rng, 4, 2, np.float32)
    cases.append(Case("f = batch-norm forward on a float32 x 4 x 2, h=1e-5 (differences must be taken in float64)",
                      {"f": partial(_bn_loss_out, gamma=layer["gamma"].astype(np.float64),
                                    beta=layer["beta"].astype(np.float64)),
                       "x": layer["x"], "dout": layer["dout"].astype(np.float64), "h": 1e-5}))
    return cases


def _run_numgrad(fn, case):
    d = case.data
    return {"gradient": fn(d["f"], d["x"].copy(), d["dout"].copy(), d["h"])}


def check_numerical_gradient(numerical_gradient, hidden=False):
    """Check numerical_gradient(f, x, dout, h) on smooth functions (BN forward, tanh)."""
    __tracebackhide__ = True
    # rounding in L(x +- h) is ~1e-16 / h: 1e-8 absolute leaves room for any correct summation order
    report_pass("numerical_gradient", run_check(
        "numerical_gradient", numerical_gradient, ref.numerical_gradient, _numgrad_cases(hidden),
        _run_numgrad, NUMERICAL_GRADIENT_CATALOGUE, rtol=1e-6, atol=1e-8))


def _rel_error_cases(hidden: bool):
    rng = np.random.default_rng(1004 if hidden else 4)
    cases = []
    for shape in [(3, 4), (5,)] + ([(2, 2, 2)] if hidden else []):
        a = rng.normal(size=shape)
        b = a * (1 + 1e-6 * rng.normal(size=shape))
        cases.append(Case(f"a and b of shape {shape} that agree to about 1e-6", {"a": a, "b": b}))
    a = np.array([100.0, -3.0, 1e-3, 0.0, 2.0])
    b = np.array([100.5, -3.0, 2e-3, 0.0, 2.0])
    cases.append(Case("a = [100, -3, 1e-3, 0, 2], b = [100.5, -3, 2e-3, 0, 2] (one small entry is far off)",
                      {"a": a, "b": b}))
    a = rng.normal(size=6)
    a[[1, 4]] = 0.0
    b = a + 1e-3 * rng.normal(size=6)
    b[[1, 4]] = 0.0
    cases.append(Case("a and b of shape (6,), both 0 at the same two places", {"a": a, "b": b}))
    if hidden:
        cases.append(Case("a = [0, 1], b = [1e-3, 1] (a is 0 where b is not)",
                          {"a": np.array([0.0, 1.0]), "b": np.array([1e-3, 1.0])}))
    return cases


def check_rel_error(rel_error, hidden=False):
    """Check rel_error(a, b) -> float."""
    __tracebackhide__ = True
    report_pass("rel_error", run_check(
        "rel_error", rel_error, ref.rel_error, _rel_error_cases(hidden),
        lambda fn, case: float(fn(case.data["a"].copy(), case.data["b"].copy())), REL_ERROR_CATALOGUE))
