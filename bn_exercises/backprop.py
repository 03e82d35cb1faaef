"""Chapter 4 - backpropagation through batch normalization: the exercise's visible
checks, and the helpers of its graded experiment.

Each ``check_*`` runs the learner's function on the visible cases recorded from the
grader's check of the same name (``answers/backprop.npz``) and says what is wrong,
naming the misconception when a known wrong implementation gave the same outputs.
The ``_run_*`` functions are the only code that touches the learner's function:
they pass the case's arrays to it unchanged (the backward checks hand it a cache
that the grader's forward pass made, recorded with the case) and return plain data.
The grader runs the same ``_run_*`` functions on its hidden cases.

The experiment trains a small network on scikit-learn's digits (no download):
``scores = relu(BN(x @ W1)) @ W2 + b2`` with the mean cross-entropy, by plain SGD.
:func:`digits_data`, :func:`init_mlp`, :func:`minibatches` and
:func:`softmax_cross_entropy` are what every learner's experiment shares, so that
their loss curves can be compared with the grader's; the batch normalization, its
backward pass and the training loops are the learner's.
"""

from __future__ import annotations

import contextlib
import dis
import types
from collections.abc import Mapping
from functools import lru_cache

import numpy as np

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_batchnorm_forward",
    "check_batchnorm_backward",
    "check_batchnorm_backward_compact",
    "check_spatial_batchnorm_forward",
    "check_spatial_batchnorm_backward",
    "check_numerical_gradient",
    "check_rel_error",
    "check_backprop_experiment",
    "digits_data",
    "init_mlp",
    "minibatches",
    "softmax_cross_entropy",
    "one_thread",
    "CACHE_KEYS",
    "CURVES",
    "TRACKING_TOLERANCE",
    "DEPARTURE",
]

#: The keys of the cache a forward pass returns, which both backward functions read:
#: x_centered and x_hat (N, D); mu, var, inv_std (D,); gamma; eps.
CACHE_KEYS = ("x_centered", "x_hat", "mu", "var", "inv_std", "gamma", "eps")

#: The misconception of a compact backward pass written with a Python loop (its run refuses it).
LOOP_MISCONCEPTION = "a Python loop in the compact backward pass"
LOOP_FIX = ("write the closed form with whole-array NumPy operations (dout.sum(axis=0), broadcasting), "
            "with no loop over examples or features.")

#: The loss curves the experiment returns: the learner's backward pass, the backward pass
#: that treats mu and sigma as constants, and PyTorch's autograd.
CURVES = ("numpy", "constant statistics", "autograd")
#: The learner's NumPy curve must stay this close to autograd's at every step (float64
#: rounding leaves about 1e-15; float32 anywhere leaves about 1e-7).
TRACKING_TOLERANCE = 1e-10
#: The constant-statistics curve must leave autograd's by more than this at some step.
DEPARTURE = 0.01
#: Training works when the mean loss of the last tenth of the steps is below this
#: fraction of the first loss.
TRAINED_FRACTION = 0.5


# --------------------------------------------------------------------------
# The experiment's shared pieces (not an answer: the network, its data and its
# optimizer are the same for everyone so that loss curves can be compared)

@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    return digits.data / 16.0, digits.target.astype(np.int64)


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits (shipped with it, no download): X (1797, 64) float64, the
    pixels divided by 16 so that they lie in [0, 1], and y (1797,) int64 labels 0..9.
    Returns new arrays at every call."""
    X, y = _digits()
    return X.copy(), y.copy()


def init_mlp(seed: int, hidden: int = 32) -> dict[str, np.ndarray]:
    """The starting parameters of ``scores = relu(BN(x @ W1)) @ W2 + b2`` (float64):
    W1 (64, hidden) with He's scale sqrt(2 / 64), gamma (hidden,) ones, beta (hidden,)
    zeros, W2 (hidden, 10) with scale sqrt(1 / hidden), b2 (10,) zeros. The first layer
    has no bias: BN's beta does its job."""
    rng = np.random.default_rng([seed, 0])
    return {"W1": rng.normal(size=(64, hidden)) * np.sqrt(2 / 64), "gamma": np.ones(hidden),
            "beta": np.zeros(hidden), "W2": rng.normal(size=(hidden, 10)) * np.sqrt(1 / hidden),
            "b2": np.zeros(10)}


def minibatches(seed: int, n_examples: int, batch_size: int, n_steps: int) -> list[np.ndarray]:
    """``n_steps`` index arrays, each of ``batch_size`` different examples drawn from
    range(n_examples) (a new draw for every step)."""
    rng = np.random.default_rng([seed, 1])
    return [rng.choice(n_examples, size=batch_size, replace=False) for _ in range(n_steps)]


def softmax_cross_entropy(scores: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """The mean cross-entropy of softmax(scores) (N, C) against labels y (N,), and its
    gradient with respect to the scores, (softmax - one_hot(y)) / N, of shape (N, C)."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(y))
    dscores = np.exp(log_p)
    dscores[rows, y] -= 1.0
    return float(-log_p[rows, y].mean()), dscores / len(y)


@contextlib.contextmanager
def one_thread():
    """Within this block NumPy's BLAS and PyTorch compute on one thread (restored afterwards).
    The experiment's matrices are tiny: with several threads, each product costs more in
    waking and waiting for the threads than in arithmetic - ten times more on a busy
    machine. The check runs your experiment in this block; run it there too."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# Functions that appear in the visible numerical-gradient cases (smooth, and none of
# them a batch normalization: that is what the exercise writes)

def _tanh_scaled(x, a):
    """tanh(a x), element by element."""
    return np.tanh(a * x)


def _tanh_linear(x, w):
    """tanh(x @ w): x (N, D), w (D, K) -> (N, K); every output depends on a whole row."""
    return np.tanh(x @ w)


def _softmax_over_batch(x, scale):
    """softmax(scale * x) over axis 0, column by column: like BN, every output of a column
    depends on every input of that column."""
    z = np.exp(scale * (x - x.max(axis=0)))
    return z / z.sum(axis=0)


CASE_HELPERS = {"tanh_scaled": _tanh_scaled, "tanh_linear": _tanh_linear, "softmax_over_batch": _softmax_over_batch}


# --------------------------------------------------------------------------
# Running the learner's functions

def _run_forward(fn, case):
    """The learner's (out, cache) on the case's x, gamma, beta (and eps when it is not the default)."""
    d = case.data
    args = (d["x"], d["gamma"], d["beta"])
    result = fn(*args) if d["eps"] is None else fn(*args, d["eps"])
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise CheckFailed(f"the forward pass must return a pair (out, cache), got {type(result).__name__} "
                          f"on case: {case.label}")
    out, cache = result
    if not isinstance(cache, Mapping):
        raise CheckFailed(f"the forward pass's cache must be a dict, got {type(cache).__name__}.")
    missing = [k for k in CACHE_KEYS if k not in cache]
    if missing:
        raise CheckFailed(f"the forward pass's cache lacks {', '.join(map(repr, missing))}: the backward "
                          f"functions read the keys {', '.join(CACHE_KEYS)}, so the cache must hold them all.")
    return {"out": out, "cache": {k: cache[k] for k in CACHE_KEYS}}


def _run_backward(fn, case):
    """The learner's (dx, dgamma, dbeta) for the case's dout and cache, all three compared at once."""
    result = fn(case.data["dout"], case.data["cache"])
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise CheckFailed("the backward pass must return a triple (dx, dgamma, dbeta), "
                          f"got {type(result).__name__} on case: {case.label}")
    return dict(zip(("dx", "dgamma", "dbeta"), result))


_COMPREHENSIONS = {"<listcomp>": "a list comprehension", "<setcomp>": "a set comprehension",
                   "<dictcomp>": "a dict comprehension", "<genexpr>": "a generator expression"}
_LOOP_BUILTINS = {"sum", "map", "range"}  # Python's sum(dout) loops over the rows


def _python_loop(fn):
    """A description of the first Python-level loop in ``fn``'s compiled code (a function,
    or a partial of one, with the functions defined inside it), or None."""
    code = getattr(getattr(fn, "func", fn), "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        code = stack.pop(0)
        if code.co_name in _COMPREHENSIONS:
            return _COMPREHENSIONS[code.co_name]
        instructions = list(dis.get_instructions(code))
        if any(i.opname == "FOR_ITER" for i in instructions):
            return "a for loop"
        if any("BACKWARD" in i.opname or (i.opname == "JUMP_ABSOLUTE" and i.argval <= i.offset)
               for i in instructions):
            return "a while loop"
        called = next((i.argval for i in instructions
                       if i.opname == "LOAD_GLOBAL" and i.argval in _LOOP_BUILTINS), None)
        if called is not None:
            return f"Python's built-in {called}()"
        stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    return None


def _run_backward_compact(fn, case):
    """``_run_backward`` after checking that fn's code has no Python loop."""
    loop = _python_loop(fn)
    if loop is not None:
        raise CheckFailed(
            f"batchnorm_backward_compact is not in closed form: its code uses {loop}.\n"
            f"  Your code matches a known mistake: {LOOP_MISCONCEPTION}.\n"
            f"  How to fix it: {LOOP_FIX}", misconception=LOOP_MISCONCEPTION)
    return _run_backward(fn, case)


def _run_numgrad(fn, case):
    d = case.data
    args = (d["f"], d["x"], d["dout"])
    return {"gradient": fn(*args) if d["h"] is None else fn(*args, d["h"])}


def _run_rel_error(fn, case):
    return float(fn(case.data["a"], case.data["b"]))


def _curve(value, name: str, label: str) -> np.ndarray:
    """A learner's loss curve (a list of numbers or 0-d tensors, an array, a tensor) as a
    float64 array, or a clear CheckFailed."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.array([float(v) for v in np.asarray(value, dtype=object).reshape(-1)], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"the experiment's {name!r} curve must be a list of losses (numbers), got "
                          f"{type(value).__name__} ({exc}) on case: {label}") from None


def _last_tenth(curve: np.ndarray) -> float:
    """The mean loss over the last tenth of the steps (at least one step)."""
    return float(curve[-max(1, len(curve) // 10):].mean())


#: The first losses of each curve are compared with the grader's: every correct experiment
#: reproduces them to about 1e-15, and a wrong one differs there already (later, a run that
#: diverges is chaotic, and no two wrong implementations agree on it).
FIRST_STEPS = 5


def _run_experiment(fn, case):
    """Run the learner's experiment with the case's seed (and its other arguments where
    they are not the defaults); return the phenomenon as booleans - their NumPy curve
    tracks autograd's at every step, the constant-statistics curve leaves it, training
    works - and the first losses of each curve, which every correct experiment
    reproduces."""
    d = case.data
    with one_thread():
        result = fn(d["seed"], **d["kwargs"])
    if not isinstance(result, Mapping) or any(name not in result for name in CURVES):
        got = sorted(map(str, result)) if isinstance(result, Mapping) else type(result).__name__
        raise CheckFailed(f"the experiment must return a dict with the keys {', '.join(map(repr, CURVES))} (one "
                          f"list of losses each), got {got} on case: {case.label}")
    curves = {name: _curve(result[name], name, case.label) for name in CURVES}
    n = d["n_steps"]
    outputs = {f"{name} curve: one loss per step ({n})": curves[name].shape == (n,) for name in CURVES}
    if not all(outputs.values()):
        return outputs
    numpy, constant, autograd = (curves[name] for name in CURVES)
    with np.errstate(invalid="ignore"):
        outputs.update({
            f"numpy curve within {TRACKING_TOLERANCE:g} of autograd's at every step":
                bool(np.all(np.abs(numpy - autograd) <= TRACKING_TOLERANCE)),
            f"constant-statistics curve more than {DEPARTURE:g} from autograd's at some step":
                bool(np.any(np.abs(constant - autograd) > DEPARTURE)),
            f"numpy training works (last tenth of the steps below {TRAINED_FRACTION:g} x the first loss)":
                bool(_last_tenth(numpy) < TRAINED_FRACTION * numpy[0]),
        })
    outputs.update({f"{name} curve, losses at steps 0-{FIRST_STEPS - 1}": curves[name][:FIRST_STEPS]
                    for name in CURVES})
    return outputs


# --------------------------------------------------------------------------
# The checks

def check_batchnorm_forward(batchnorm_forward, hidden=False):
    """Check batchnorm_forward(x, gamma, beta, eps=1e-5) -> (out, cache): out and the
    cache's keys and values (``CACHE_KEYS``)."""
    __tracebackhide__ = True
    recorded_check(check_batchnorm_forward, "batchnorm_forward", batchnorm_forward, _run_forward, hidden)


def check_batchnorm_backward(batchnorm_backward, hidden=False):
    """Check batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta), given the grader's forward cache."""
    __tracebackhide__ = True
    recorded_check(check_batchnorm_backward, "batchnorm_backward", batchnorm_backward, _run_backward, hidden)


def check_batchnorm_backward_compact(batchnorm_backward_compact, hidden=False):
    """Check batchnorm_backward_compact(dout, cache) like the staged one, and that its
    code has no Python loop over examples or features."""
    __tracebackhide__ = True
    recorded_check(check_batchnorm_backward_compact, "batchnorm_backward_compact", batchnorm_backward_compact,
                   _run_backward_compact, hidden)


def check_spatial_batchnorm_forward(spatial_batchnorm_forward, hidden=False):
    """Check spatial_batchnorm_forward(x, gamma, beta, eps=1e-5) -> (out, cache) on (N, C, H, W) maps."""
    __tracebackhide__ = True
    recorded_check(check_spatial_batchnorm_forward, "spatial_batchnorm_forward", spatial_batchnorm_forward,
                   _run_forward, hidden)


def check_spatial_batchnorm_backward(spatial_batchnorm_backward, hidden=False):
    """Check spatial_batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta), given the
    grader's spatial forward cache."""
    __tracebackhide__ = True
    recorded_check(check_spatial_batchnorm_backward, "spatial_batchnorm_backward", spatial_batchnorm_backward,
                   _run_backward, hidden)


def check_numerical_gradient(numerical_gradient, hidden=False):
    """Check numerical_gradient(f, x, dout, h=1e-5) on smooth functions."""
    __tracebackhide__ = True
    recorded_check(check_numerical_gradient, "numerical_gradient", numerical_gradient, _run_numgrad, hidden)


def check_rel_error(rel_error, hidden=False):
    """Check rel_error(a, b) -> float."""
    __tracebackhide__ = True
    recorded_check(check_rel_error, "rel_error", rel_error, _run_rel_error, hidden)


def check_backprop_experiment(backprop_experiment, hidden=False):
    """Check backprop_experiment(seed, n_steps=300, batch_size=32, lr=0.5) -> {"numpy": [...],
    "constant statistics": [...], "autograd": [...]}: the NumPy curve tracks autograd's,
    the constant-statistics curve leaves it, training works, and the curves start and end
    where the grader's do."""
    __tracebackhide__ = True
    recorded_check(check_backprop_experiment, "backprop_experiment", backprop_experiment, _run_experiment, hidden)
