"""Chapter 2 - internal covariate shift: the exercise's visible checks and helpers.

Each ``check_*`` runs the learner's class or function on the visible cases
recorded from the grader's check of the same name (``answers/covariate_shift.npz``)
and says what is wrong, naming the misconception when a known wrong
implementation gave the same outputs. The ``_run_*`` functions are the only code
that touches the learner's object: they build the case's small model from a seed
(the case helpers below: ``CASE_HELPERS``), hand it to the learner's code, and
return plain data - the measured values, then whether the model was left as it was
found (parameters, buffers, ``.grad``, train/eval modes, hooks). The grader runs
the same ``_run_*`` functions on its hidden cases.

The notebook's helpers live here too: :func:`load_digits_split` and :func:`make_mlp`
(the data and the network of the paper's Fig. 1) and :func:`percentile_drift`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_activation_recorder",
    "check_gradient_shift",
    "check_noisy_batchnorm",
    "check_loss_along_gradient",
    "check_ics_experiment",
    "load_digits_split",
    "make_mlp",
    "percentile_drift",
]


# --------------------------------------------------------------------------
# The notebook's helpers: the data and the network of the paper's Fig. 1

def load_digits_split(test_size: float = 0.3, seed: int = 0):
    """scikit-learn's digits (1797 8x8 images, 64 features, 10 classes), split into a
    stratified train / test split and standardized with the training split's mean
    and standard deviation (``StandardScaler``; constant pixels stay 0).

    Returns ``(X_train, y_train, X_test, y_test)``: float32 (n, 64) and int64 (n,)
    tensors; 1257 / 540 images with the defaults.
    """
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(X_train)
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return as_x(X_train), torch.tensor(y_train), as_x(X_test), torch.tensor(y_test)


def make_mlp(norm_layer: Callable[[int], nn.Module] | None = None, init_scale: float = 1.0, seed: int = 0,
             hidden: Sequence[int] = (100, 100, 100), n_in: int = 64, n_out: int = 10) -> nn.Sequential:
    """The network of the paper's Fig. 1: fully connected hidden layers of sigmoid units
    (3 of 100 by default), each ``Linear -> [norm_layer] -> Sigmoid``, then a Linear output.

    ``norm_layer(width)`` makes the normalization layer (``nn.BatchNorm1d``, or None for
    none); BN goes before the nonlinearity, as in the paper (Sec. 3.2). Weights are
    Gaussian with standard deviation ``init_scale / sqrt(fan_in)``, biases 0, drawn from
    a generator seeded with ``seed`` in layer order, so networks with and without BN
    built with the same seed start from the same weights.
    """
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale!r}.")
    gen = torch.Generator().manual_seed(seed)

    def gaussian_linear(fan_in: int, fan_out: int) -> nn.Linear:
        linear = nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(fan_out, fan_in, generator=gen) * init_scale / math.sqrt(fan_in))
            linear.bias.zero_()
        return linear

    layers, width = [], n_in
    for size in hidden:
        layers.append(gaussian_linear(width, size))
        if norm_layer is not None:
            layers.append(norm_layer(size))
        layers.append(nn.Sigmoid())
        width = size
    layers.append(gaussian_linear(width, n_out))
    return nn.Sequential(*layers)


def percentile_drift(percentiles, k: int = 50) -> float:
    """How far a recorded distribution moved over training: for percentiles of shape
    (steps, P), the sum over the P columns of |mean of the last k rows - mean of the
    first k rows|."""
    p = np.asarray(percentiles, dtype=np.float64)
    if p.ndim != 2 or len(p) < k:
        raise ValueError(f"percentiles must have shape (steps, P) with steps >= {k}, got shape {p.shape}.")
    return float(np.abs(p[-k:].mean(axis=0) - p[:k].mean(axis=0)).sum())


# --------------------------------------------------------------------------
# The cases' models and loss functions, built from a seed inside run() (never shared)

class _Twice(nn.Module):
    """Linear -> Sigmoid -> Linear -> the *same* Sigmoid -> Linear: one module, two calls."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.out(self.act(self.second(self.act(self.first(x)))))


def _randomize(model, gen, scale=1.0):
    """Random weights (N(0, scale^2 / fan_in)), biases, BN gamma (around 1), beta and
    running statistics away from their defaults, so nothing sits at 0 or 1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * scale / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))


def _mlp_layers(sizes, bn, bias):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if bn else []
            layers.append(nn.Sigmoid())
    return layers


def _model(seed, kind="mlp", sizes=(5, 8, 6, 3), bn=False, bias=True, dtype="float64", mode="train",
           old_grads=False, dead_unit=None, scale=2.0):
    """A small seeded model: an MLP (Linear -> [BatchNorm1d] -> Sigmoid per hidden layer),
    a CNN (Conv2d(2, 3, 3) -> BatchNorm2d -> ReLU -> Flatten -> Linear(27, 4)), ``_Twice``,
    or "nested": the MLP's hidden layers each in a Sequential of their own inside the model.
    ``mode`` is its train/eval mode - "mixed": eval mode except the last BatchNorm1d, in
    training mode; ``old_grads`` fills every ``.grad`` with random values; ``dead_unit``
    zeroes that row of the first Linear (a constant unit)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    elif kind == "twice":
        model = _Twice()
    elif kind == "nested":
        layers, per_block = _mlp_layers(sizes, bn, bias), 3 if bn else 2
        blocks = [nn.Sequential(*layers[i:i + per_block]) for i in range(0, len(layers) - 1, per_block)]
        model = nn.Sequential(*blocks, layers[-1])
    else:
        model = nn.Sequential(*_mlp_layers(sizes, bn, bias))
    model = model.to(getattr(torch, dtype))
    _randomize(model, gen, scale)
    if dead_unit is not None:
        with torch.no_grad():
            model[0].weight[dead_unit] = 0.0
    model.train(mode == "train")
    if mode == "mixed":
        [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)][-1].train()
    if old_grads:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return model


def _cross_entropy(output, target):
    return F.cross_entropy(output, target)


def _mse(output, target):
    return F.mse_loss(output, target)


#: The functions that appear in visible case data (see bn_exercises.codec.resolver).
CASE_HELPERS = {"_model": _model, "_cross_entropy": _cross_entropy, "_mse": _mse}


class CaseInterrupted(Exception):
    """Raised on purpose inside the learner's code by a case that tests what happens
    when the code around it fails (a loss function that raises, an error inside a
    ``with`` block)."""


def _failing(loss_fn, fail_at):
    """``loss_fn``, except that its ``fail_at``-th call and every later one raise
    :class:`CaseInterrupted`."""
    calls = [0]

    def loss(output, target):
        calls[0] += 1
        if calls[0] >= fail_at:
            raise CaseInterrupted(f"the case's loss function raised on its call {calls[0]} (on purpose)")
        return loss_fn(output, target)
    return loss


# --------------------------------------------------------------------------
# Observing a model: what run() reports besides the measured values

def _state(model):
    """Copies of everything a measurement must leave as it was."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "modes": _modes(model),
    }


def _modes(model):
    """The modules in training mode, by their ``named_modules()`` names."""
    names = [name or "(the model)" for name, m in model.named_modules() if m.training]
    return ", ".join(names) if names else "none"


def _same(a, b):
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
        for x, y in zip(a, b))


def _left_as_found(before, model):
    after = _state(model)
    return {
        "parameters left unchanged": _same(before["params"], after["params"]),
        "buffers (BN running statistics) left unchanged": _same(before["buffers"], after["buffers"]),
        ".grad of every parameter left unchanged": _same(before["grads"], after["grads"]),
        "modules in training mode afterwards (by name)": after["modes"],
    }


def _numbers(values, what):
    """A learner's sequence of numbers (list, array, tensor, list of 0-d tensors) as a
    float64 array, or a CheckFailed saying what was expected."""
    try:
        if isinstance(values, torch.Tensor):
            return values.detach().cpu().double().numpy()
        return np.array([float(v.detach()) if isinstance(v, torch.Tensor) else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"{what} must be a sequence of numbers (a list, a NumPy array or a 1-D tensor), "
                          f"got {type(values).__name__}: {exc}") from None


def _pair(result, task, names):
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{task} must return a pair ({names[0]}, {names[1]}), got {type(result).__name__}.")
    return [_numbers(v, f"{task}'s {name}") for v, name in zip(result, names)]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _rows(records, n_percentiles):
    """The learner's ``records`` as a (calls, P) float64 array."""
    if not isinstance(records, (list, tuple)):
        raise CheckFailed(f"ActivationRecorder's records must be a list (one entry per call), "
                          f"got {type(records).__name__}.")
    rows = [_numbers(np.atleast_1d(r) if not isinstance(r, torch.Tensor) else r.reshape(-1),
                     "each entry of records") for r in records]
    if any(r.shape != (n_percentiles,) for r in rows):
        raise CheckFailed(f"each entry of ActivationRecorder's records must hold the {n_percentiles} "
                          f"percentiles of one call, got shapes {sorted({r.shape for r in rows})}.")
    return np.array(rows).reshape(len(rows), n_percentiles)


# --------------------------------------------------------------------------
# The run functions: the only code that touches the learner's object

def _run_recorder(cls, case):
    """Record through the learner's class - in a with block (``use="with"``), in a with
    block that an error leaves (``"raise"``), or without one, ending with ``remove()``
    (``"remove"``) - then call the model once more."""
    d = case.data
    use = d.get("use", "with")
    model = d["make"]()
    module = model.get_submodule(d["module"])
    own_calls = []
    module.register_forward_hook(lambda m, inputs, output: own_calls.append(1))  # the check's hook must survive
    kwargs = {} if d["percentiles"] is None else {"percentiles": d["percentiles"]}
    reached = None
    with torch.set_grad_enabled(d["grad"]):
        recorder = cls(module, d["unit"], **kwargs)
        if use == "remove":
            for x in d["batches"]:
                model(torch.from_numpy(x))
            n = len(recorder.records)
            recorder.remove()
        else:
            try:
                with recorder as entered:
                    if entered is None:
                        raise CheckFailed("`with ActivationRecorder(...) as recorder` gave None: __enter__ must "
                                          "return self.")
                    for x in d["batches"]:
                        model(torch.from_numpy(x))
                    n = len(recorder.records)
                    if use == "raise":
                        raise CaseInterrupted("an error inside the with block (on purpose)")
                reached = False
            except CaseInterrupted:
                reached = True
        calls = len(own_calls)
        model(torch.from_numpy(d["batches"][0]))
    n_percentiles = 3 if d["percentiles"] is None else len(d["percentiles"])
    after = "remove()" if use == "remove" else "the with block"
    out = {"records (one row of percentiles per call)": _rows(recorder.records[:n], n_percentiles)}
    if use == "raise":
        out["the error raised inside the with block reached the code around it"] = reached
    out.update({
        f"records added by a call after {after}": len(recorder.records) - n,
        f"forward hooks on the model after {after} (the check's own included)": _hook_count(model),
        "the check's own hook on the module still runs": len(own_calls) == calls + 1,
    })
    return out


def _run_measure(fn, case, task, names, argument):
    """Call ``fn(model, x, y, loss_fn, case[argument])``; with ``fail_at``, its loss function
    raises from that call on, and the error must reach the caller."""
    d = case.data
    model = d["make"]()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    before = _state(model)
    if d.get("fail_at") is None:
        first, second = _pair(fn(model, x, y, d["loss_fn"], d[argument]), task, names)
        return {names[0]: first, names[1]: second, **_left_as_found(before, model)}
    try:
        fn(model, x, y, _failing(d["loss_fn"], d["fail_at"]), d[argument])
        reached = False
    except CaseInterrupted:
        reached = True
    return {"the loss function's error reached the caller": reached, **_left_as_found(before, model)}


def _run_gradient_shift(fn, case):
    return _run_measure(fn, case, "gradient_shift", ("distances ||G - G'|| (one per layer)",
                                                     "cosines cos(G, G') (one per layer)"), "lr")


def _run_along(fn, case):
    return _run_measure(fn, case, "loss_along_gradient", ("losses L(w - eta * g)",
                                                          "gradient norms ||grad L(w - eta * g)||"), "step_sizes")


def _run_noisy(cls, case):
    """Steps of train()/eval() through the learner's layer: outputs, gradients, statistics."""
    d = case.data
    dtype = getattr(torch, d["dtype"])
    gen = torch.Generator().manual_seed(d["seed"])
    layer = cls(d["C"], gen, **d["kwargs"], dtype=dtype)
    if not isinstance(layer, nn.BatchNorm1d):
        raise CheckFailed("NoisyBatchNorm1d must subclass nn.BatchNorm1d (class NoisyBatchNorm1d(nn.BatchNorm1d)), "
                          "so that it has BN's weight, bias and running statistics.")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(d["gamma"]))
        layer.bias.copy_(torch.from_numpy(d["beta"]))
    out = {}
    for i, (mode, x, dout) in enumerate(d["steps"], 1):
        label = f"step {i} ({mode}() on a {tuple(x.shape)} batch)"
        layer.train(mode == "train")
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        (y * torch.from_numpy(dout)).sum().backward()
        out[f"{label}: output"] = y.detach().clone()
        out[f"{label}: gradient of the input"] = xt.grad.clone()
        out[f"{label}: weight.grad"] = layer.weight.grad.clone()
        layer.zero_grad(set_to_none=True)
        out[f"{label}: running_mean"] = layer.running_mean.clone()
        out[f"{label}: running_var"] = layer.running_var.clone()
    out["the generator's next random number after the steps (how many numbers were drawn)"] = \
        torch.rand(1, generator=gen, dtype=torch.float64).item()
    return out


#: The graded experiment's margins (see tests/test_ch2_covariate_shift.py for the seeds they hold on):
#: BN's ||G - G'|| / no BN's and BN's 1 - cos(G, G') / no BN's, medians over the measured steps, at least these.
SHIFT_FACTOR = 1.0
TURN_FACTOR = 2.0
NETWORKS = ("no BN", "BN")
EXPERIMENT_KEYS = ("percentiles", "distances", "cosines", "test_accuracy")


def _table(result, name, key):
    """One of the experiment's arrays as a 2-D float64 array, or a CheckFailed."""
    value, what = result[name][key], f"ics_experiment's [{name!r}][{key!r}]"
    try:
        array = (value.detach().cpu().double().numpy() if isinstance(value, torch.Tensor)
                 else np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"{what} must be an array of numbers, got {type(value).__name__}: {exc}") from None
    if array.ndim != 2 or not len(array):
        raise CheckFailed(f"{what} must be a 2-D array with one row per step (or per measurement), "
                          f"got shape {array.shape}.")
    return array


def _run_experiment(fn, case):
    """Run the learner's experiment with the case's seed: the phenomenon as booleans with
    margins, and what is exact (step 0: the first batch, before any update)."""
    d = case.data
    steps, every = d["steps"], d["measure_every"]
    result = fn(d["seed"])
    if not isinstance(result, dict) or set(NETWORKS) - set(result) or \
            any(not isinstance(result[n], dict) or set(EXPERIMENT_KEYS) - set(result[n]) for n in NETWORKS):
        raise CheckFailed(f"ics_experiment(seed) must return {{'no BN': r, 'BN': r}}, each r a dict with the keys "
                          f"{', '.join(map(repr, EXPERIMENT_KEYS))}; got {type(result).__name__} "
                          f"{list(result) if isinstance(result, dict) else ''}.")
    out, series = {}, {}
    for name in NETWORKS:
        p, dist, cos = (_table(result, name, key) for key in EXPERIMENT_KEYS[:3])
        n_measured = -(-steps // every)
        out.update({
            f"{name}: one record per training step ({steps})": len(p) == steps,
            f"{name}: percentiles 15/50/85 on the first batch (step 0, before any update)": p[0],
            f"{name}: one gradient_shift measurement every {every} steps ({n_measured})": len(dist) == n_measured,
            f"{name}: ||G - G'|| of the Linear layers at step 0": dist[0],
            f"{name}: cos(G, G') of the Linear layers at step 0": cos[0],
        })
        series[name] = p, dist, cos, _numbers([result[name]["test_accuracy"]], "test_accuracy")[0]
    (p0, d0, c0, a0), (p1, d1, c1, a1) = series["no BN"], series["BN"]
    rows = min(len(d0), len(d1))
    with np.errstate(divide="ignore", invalid="ignore"):
        drift = percentile_drift(p0) > percentile_drift(p1) if min(len(p0), len(p1)) >= 50 else False
        shift = np.median(d1[:rows, 1:].mean(axis=1) / d0[:rows, 1:].mean(axis=1)) >= SHIFT_FACTOR
        turn = np.median((1 - c1[:rows, 1:]).mean(axis=1) / (1 - c0[:rows, 1:]).mean(axis=1)) >= TURN_FACTOR
    out.update({
        "the recorded input drifts less with BN (percentile_drift: no BN's larger than BN's)": bool(drift),
        f"the gradient shift is not smaller with BN (median over the measured steps of BN's ||G - G'|| / no BN's, "
        f"Linear layers 2-4, at least {SHIFT_FACTOR})": bool(shift),
        f"the gradient turns more with BN (median of BN's 1 - cos(G, G') / no BN's, Linear layers 2-4, "
        f"at least {TURN_FACTOR})": bool(turn),
        "BN reaches a higher test accuracy": a1 > a0,
    })
    return out


# --------------------------------------------------------------------------
# The checks

def check_activation_recorder(ActivationRecorder, hidden=False):
    """Check ActivationRecorder(module, unit, percentiles=(15, 50, 85)): records, hooks removed."""
    __tracebackhide__ = True
    recorded_check(check_activation_recorder, "ActivationRecorder", ActivationRecorder, _run_recorder, hidden)


def check_gradient_shift(gradient_shift, hidden=False):
    """Check gradient_shift(model, x, y, loss_fn, lr) -> (distances, cosines), model left as found."""
    __tracebackhide__ = True
    recorded_check(check_gradient_shift, "gradient_shift", gradient_shift, _run_gradient_shift, hidden)


def check_noisy_batchnorm(NoisyBatchNorm1d, hidden=False):
    """Check NoisyBatchNorm1d(num_features, generator, noise_mean=1.0, noise_std=1.0, **kwargs)."""
    __tracebackhide__ = True
    recorded_check(check_noisy_batchnorm, "NoisyBatchNorm1d", NoisyBatchNorm1d, _run_noisy, hidden)


def check_loss_along_gradient(loss_along_gradient, hidden=False):
    """Check loss_along_gradient(model, x, y, loss_fn, step_sizes) -> (losses, grad_norms)."""
    __tracebackhide__ = True
    recorded_check(check_loss_along_gradient, "loss_along_gradient", loss_along_gradient, _run_along, hidden)


def check_ics_experiment(ics_experiment, hidden=False):
    """Check ics_experiment(seed) -> {"no BN": r, "BN": r}: the experiment runs as specified
    (exact at step 0) and shows the chapter's phenomenon with the stated margins."""
    __tracebackhide__ = True
    recorded_check(check_ics_experiment, "ics_experiment", ics_experiment, _run_experiment, hidden)
