"""Chapter 4 - the backward pass of batch normalization: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's function, runs it and the reference
(``bn_reference.backprop``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces every output the learner gets
wrong. ``hidden=True`` runs the grader's own cases (seeded from the course's
grading secret, more shapes).

The backward checks feed the learner's functions a cache made by the
*reference* forward pass (built with the cases, outside ``run``), so a wrong
forward pass cannot fail them; the forward checks in turn compare the
learner's cache (``bn_exercises.backprop.CACHE_KEYS``) with the reference's,
so that in the notebook the learner's backward functions can read the
learner's own cache just as well. Each check compares all of a function's
outputs at once (``out`` and the cache; dx, dgamma and dbeta), so a failure
lists every output that differs.

The ``_run_*`` functions, the only code that touches the learner's function, live
in the learner package (:mod:`bn_exercises.backprop`); its visible checks replay
this module's visible cases from recorded answers.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from bn_exercises.backprop import (LOOP_FIX, LOOP_MISCONCEPTION, _run_backward, _run_backward_compact,
                                   _run_experiment, _run_forward, _run_numgrad, _run_rel_error, _softmax_over_batch,
                                   _tanh_linear, _tanh_scaled, digits_data, init_mlp, minibatches,
                                   softmax_cross_entropy)

from .. import backprop as ref
from . import Case, Misconception, case_rng, combined, hidden_seed, report_pass, run_check

__all__ = [
    "check_batchnorm_forward",
    "check_batchnorm_backward",
    "check_batchnorm_backward_compact",
    "check_spatial_batchnorm_forward",
    "check_spatial_batchnorm_backward",
    "check_numerical_gradient",
    "check_rel_error",
    "check_backprop_experiment",
    "CATALOGUE",
]


# --------------------------------------------------------------------------
# Wrong implementations, each a switchable variation of otherwise right code.

def _forward(x, gamma, beta, eps=1e-5, ddof=0, eps_mode="inside", fixed_eps=False, axis=0):
    """Algorithm 1 with switchable mistakes; returns (out, cache) with the cache's keys.

    ``eps_mode``: "inside" sqrt(var + eps) (right), "outside" sqrt(var) + eps, "none"
    (eps left out); ``fixed_eps``: 1e-5 whatever eps is given; ``ddof``: 1 for the
    unbiased variance; ``axis``: 1 for layer normalization's statistics.
    """
    x = np.asarray(x)
    used = 0.0 if eps_mode == "none" else 1e-5 if fixed_eps else eps
    mu = x.mean(axis=axis, keepdims=True)
    x_centered = x - mu
    var = (x_centered ** 2).sum(axis=axis, keepdims=True) / (x.shape[axis] - ddof)
    std = np.sqrt(var) + used if eps_mode == "outside" else np.sqrt(var + used)
    x_hat = x_centered / std
    cache = {"x_centered": x_centered, "x_hat": x_hat, "mu": np.squeeze(mu, axis), "var": np.squeeze(var, axis),
             "inv_std": np.squeeze(1.0 / std, axis), "gamma": gamma, "eps": eps}
    return gamma * x_hat + beta, cache


_NO_EPS = Misconception(
    "eps left out of the normalization",
    "normalize by sqrt(var + eps) (Algorithm 1): without eps a constant feature gives 0 / 0 = nan, "
    "and every feature is off by the factor sqrt(var / (var + eps)).",
    partial(_forward, eps_mode="none"))
_UNBIASED = Misconception(
    "unbiased (N-1) batch variance in the forward pass",
    "Algorithm 1 divides by N (the biased variance): use x.var(axis=0), whose default is ddof=0. "
    "The unbiased estimate belongs to the running statistics used at inference (Chapter 5).",
    partial(_forward, ddof=1))
_EPS_OUTSIDE = Misconception(
    "eps added outside the square root",
    "normalize by sqrt(var + eps), not sqrt(var) + eps (Algorithm 1).",
    partial(_forward, eps_mode="outside"))
_FIXED_EPS = Misconception(
    "the eps argument is ignored (a fixed 1e-5 is used)",
    "use the eps passed to the function in sqrt(var + eps); 1e-5 is only its default.",
    partial(_forward, fixed_eps=True))

FORWARD_CATALOGUE = [
    _NO_EPS,
    _UNBIASED,
    _EPS_OUTSIDE,
    Misconception(
        "statistics over the feature axis instead of the batch axis (that is layer normalization)",
        "batch normalization averages over the examples: mean and var with axis=0, one value per feature.",
        partial(_forward, axis=1)),
    _FIXED_EPS,
    # Mistakes made together: the unbiased variance (the default of torch.std and pandas) with eps
    # outside the root, left out or hard-coded; eps both outside the root and hard-coded.
    combined(_UNBIASED, _EPS_OUTSIDE, partial(_forward, ddof=1, eps_mode="outside")),
    combined(_UNBIASED, _NO_EPS, partial(_forward, ddof=1, eps_mode="none")),
    combined(_UNBIASED, _FIXED_EPS, partial(_forward, ddof=1, fixed_eps=True)),
    combined(_EPS_OUTSIDE, _FIXED_EPS, partial(_forward, eps_mode="outside", fixed_eps=True)),
]


def _spatial_forward(x, gamma, beta, eps=1e-5, mode="per_activation"):
    """Spatial BN with one switchable mistake; returns (out, cache) like the reference."""
    x = np.asarray(x)
    c = x.shape[1]
    if mode == "no_transpose":  # (N, C, H, W) -> (N*H*W, C) by reshape alone: channels get mixed
        out, cache = _forward(x.reshape(-1, c), gamma, beta, eps)
        cache.update(x_centered=cache["x_centered"].reshape(x.shape), x_hat=cache["x_hat"].reshape(x.shape))
        return out.reshape(x.shape), cache
    axes = (0,) if mode == "per_activation" else (2, 3)  # per activation, or per example (instance norm)
    mu = x.mean(axis=axes, keepdims=True)
    x_centered = x - mu
    var = (x_centered ** 2).mean(axis=axes, keepdims=True)
    x_hat = x_centered / np.sqrt(var + eps)
    cache = {"x_centered": x_centered, "x_hat": x_hat, "mu": np.squeeze(mu, axes), "var": np.squeeze(var, axes),
             "inv_std": np.squeeze(1.0 / np.sqrt(var + eps), axes), "gamma": gamma, "eps": eps}
    return gamma.reshape(1, c, 1, 1) * x_hat + beta.reshape(1, c, 1, 1), cache


SPATIAL_FORWARD_CATALOGUE = [
    Misconception(
        "statistics per activation (over N only), as for a fully connected layer",
        "a convolutional layer's BN has one mean and variance per channel, over the N examples and all "
        "H*W positions (Sec. 3.2): reduce over the axes (0, 2, 3).",
        partial(_spatial_forward, mode="per_activation")),
    Misconception(
        "x reshaped to (N*H*W, C) without moving the channel axis last",
        "x.reshape(-1, C) mixes channels, because C is not the last axis: move it there first, "
        "x.transpose(0, 2, 3, 1).reshape(-1, C), and undo both steps afterwards; or reduce over axes (0, 2, 3).",
        partial(_spatial_forward, mode="no_transpose")),
    Misconception(
        "statistics per example and channel over (H, W) (that is instance normalization)",
        "batch normalization also averages over the examples: reduce over the axes (0, 2, 3), not (2, 3).",
        partial(_spatial_forward, mode="instance")),
]


def _backward(dout, cache, reduce="sum", constant_stats=False, mean_path="right", var_path="right",
              with_gamma=True):
    """Backward pass with switchable mistakes; returns (dx, dgamma, dbeta).

    In the closed form dx = gamma s / N (N dout - a sum(dout) - b x_hat sum(dout x_hat)),
    ``mean_path`` sets a: "right" 1, "missing" 0, "no 1/N" N (dmu added without its
    1/N); ``var_path`` sets b: "right" 1, "missing" 0, "no 1/N" N (dsigma2/dx_c = 2 x_c),
    "unbiased" N / (N - 1) (the derivative of the unbiased variance).
    """
    dout = np.asarray(dout)
    x_hat, inv_std = cache["x_hat"], cache["inv_std"]
    gamma = cache["gamma"] if with_gamma else 1.0
    n = dout.shape[0]
    a = {"right": 1.0, "missing": 0.0, "no 1/N": n}[mean_path]
    b = {"right": 1.0, "missing": 0.0, "no 1/N": n, "unbiased": n / (n - 1)}[var_path]
    dbeta, dgamma = dout.sum(axis=0), (dout * x_hat).sum(axis=0)
    if constant_stats:
        dx = gamma * inv_std * dout
    else:
        dx = (gamma * inv_std / n) * (n * dout - a * dbeta - b * x_hat * dgamma)
    if reduce == "none":
        dbeta, dgamma = dout, dout * x_hat
    elif reduce == "mean":
        dbeta, dgamma = dbeta / n, dgamma / n
    elif reduce == "keepdims":
        dbeta, dgamma = dbeta[None, :], dgamma[None, :]
    return dx, dgamma, dbeta


_VAR_NO_1_OVER_N = Misconception(
    "the path through the variance is missing its 1/N (dsigma2/dx_c = 2 x_c instead of 2 x_c / N)",
    "sigma2 = (1/N) sum_i x_c,i^2, so dsigma2/dx_c,i = 2 x_c,i / N: the second path into x_c is "
    "dvar * 2 * x_centered / N (without the 1/N that term is N times too large).",
    partial(_backward, var_path="no 1/N"))
_MEAN_NO_1_OVER_N = Misconception(
    "the path through the mean is missing its 1/N (dx = dx_c + dmu instead of dx_c + dmu / N)",
    "mu = (1/N) sum_i x_i, so dmu/dx_i = 1/N: the second path into x is dmu / N (without the 1/N "
    "the -sum(dout) term is N times too large).",
    partial(_backward, mean_path="no 1/N"))

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
        "dgamma and dbeta have shape (1, D) instead of (D,)",
        "gamma and beta have shape (D,), and so must their gradients: sum with axis=0 and without "
        "keepdims=True (or reshape the result to (D,)).",
        partial(_backward, reduce="keepdims")),
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
        partial(_backward, var_path="missing")),
    _VAR_NO_1_OVER_N,
    Misconception(
        "the path through the variance divides by N - 1 (the unbiased variance's derivative)",
        "the forward pass divides by N (Algorithm 1), so dsigma2/dx_c,i = 2 x_c,i / N; N - 1 belongs to a "
        "layer that normalizes with the unbiased variance (as makemore does), not to this one.",
        partial(_backward, var_path="unbiased")),
    Misconception(
        "dx is missing the -sum(dout) term (the path through the mean)",
        "x_i also changes mu: include dl/dmu * dmu/dx_i = dl/dmu / N, which contributes "
        "-gamma / (N sigma) * sum(dout).",
        partial(_backward, mean_path="missing")),
    _MEAN_NO_1_OVER_N,
    Misconception(
        "dx is missing the factor gamma",
        "y = gamma * x_hat + beta, so dl/dx_hat = gamma * dout before anything else.",
        partial(_backward, with_gamma=False)),
]
_BACKWARD_COMBINED = [
    # Both 1/N of the staged pass forgotten: the derivative of a mean taken as that of a sum, twice.
    combined(_VAR_NO_1_OVER_N, _MEAN_NO_1_OVER_N, partial(_backward, var_path="no 1/N", mean_path="no 1/N")),
]


def _looping_compact(dout, cache):
    """The closed form, one feature at a time: right values, not the closed form the task asks for."""
    n, d = np.shape(dout)
    dx, dgamma, dbeta = np.empty((n, d)), np.empty(d), np.empty(d)
    for j in range(d):
        g, x_hat = dout[:, j], cache["x_hat"][:, j]
        dbeta[j], dgamma[j] = g.sum(), (g * x_hat).sum()
        dx[:, j] = cache["gamma"][j] * cache["inv_std"][j] / n * (n * g - dbeta[j] - x_hat * dgamma[j])
    return dx, dgamma, dbeta


COMPACT_CATALOGUE = [*BACKWARD_CATALOGUE, Misconception(LOOP_MISCONCEPTION, LOOP_FIX, _looping_compact),
                     *_BACKWARD_COMBINED]
BACKWARD_CATALOGUE += _BACKWARD_COMBINED


def _spatial_backward(dout, cache, mode="no_transpose"):
    """Spatial backward with one switchable mistake; returns (dx, dgamma, dbeta)."""
    dout = np.asarray(dout)
    n, c, h, w = dout.shape
    x_hat = cache["x_hat"]
    if mode == "no_transpose":
        dx, dgamma, dbeta = _backward(dout.reshape(-1, c), {**cache, "x_hat": x_hat.reshape(-1, c)})
        return dx.reshape(dout.shape), dgamma, dbeta
    axes, m = (0, 2, 3), (n if mode == "count_n" else n * h * w)
    scale = (cache["gamma"] * cache["inv_std"]).reshape(1, c, 1, 1) / m
    dbeta, dgamma = dout.sum(axis=axes, keepdims=True), (dout * x_hat).sum(axis=axes, keepdims=True)
    dx = scale * (m * dout - dbeta - x_hat * dgamma)
    if mode == "per_position":
        return dx, (dout * x_hat).sum(axis=0), dout.sum(axis=0)
    if mode == "keepdims":
        return dx, dgamma, dbeta
    return dx, dgamma.reshape(c), dbeta.reshape(c)


SPATIAL_BACKWARD_CATALOGUE = [
    Misconception(
        "dout and the cache reshaped to (N*H*W, C) without moving the channel axis last",
        "x.reshape(-1, C) mixes channels, because C is not the last axis: move it there first, "
        "a.transpose(0, 2, 3, 1).reshape(-1, C), and undo both steps for dx; or reduce over axes (0, 2, 3).",
        partial(_spatial_backward, mode="no_transpose")),
    Misconception(
        "dgamma and dbeta are summed over N only (one value per position, shape (C, H, W))",
        "gamma and beta are shared by every example and every position of a channel: "
        "sum over the axes (0, 2, 3), giving shape (C,).",
        partial(_spatial_backward, mode="per_position")),
    Misconception(
        "dgamma and dbeta have shape (1, C, 1, 1) instead of (C,)",
        "sum with axis=(0, 2, 3) without keepdims=True (or reshape the result to (C,)): gamma and beta "
        "have shape (C,).",
        partial(_spatial_backward, mode="keepdims")),
    Misconception(
        "dx uses the batch size N where a channel has N*H*W values",
        "each channel's mean and variance are taken over M = N*H*W values, so the closed form's N "
        "becomes M: dx = gamma / (M sigma) * (M dout - sum(dout) - x_hat * sum(dout * x_hat)).",
        partial(_spatial_backward, mode="count_n")),
]


def _numgrad(f, x, dout, h=1e-5, step="central", restore=True, use_dout=True, own_dtype=False):
    """Finite-difference gradient of sum(f(x) * dout) with switchable mistakes."""
    x = np.array(x) if own_dtype else np.array(x, dtype=np.float64)
    weight = np.asarray(dout, dtype=np.float64) if use_dout else 1.0
    if step == "all_at_once":  # every element moved together: one directional derivative, copied everywhere
        return np.full(x.shape, (np.sum(f(x + h) * weight) - np.sum(f(x - h) * weight)) / (2 * h))
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
        "all elements of x are perturbed at once (x + h instead of x + h e_k)",
        "perturb one element at a time: for each index k, set x[k] = old + h, then old - h, then put "
        "old back; x + h moves every element and measures one directional derivative.",
        partial(_numgrad, step="all_at_once")),
    Misconception(
        "x is not restored after perturbing an element",
        "put the old value back (x[k] = old) before moving to the next element.",
        partial(_numgrad, restore=False)),
    Misconception(
        "the differences are taken in float32 (x's own dtype)",
        "work on a float64 copy, x = np.array(x, dtype=np.float64): float32 rounds each L(x + h) and "
        "L(x - h) to about 1e-7 of its size, and divided by 2 h = 2e-5 that noise is about 0.6 % of "
        "the size of L in every entry of the gradient.",
        partial(_numgrad, own_dtype=True)),
]


def _rel_error(a, b, reduce=np.max, floor=1e-8, ratio_of_max=False, symmetric=True, abs_of_sum=False):
    """rel_error with switchable mistakes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.abs(a - b)
    scale = np.abs(a + b) if abs_of_sum else (np.abs(a) + np.abs(b) if symmetric else np.abs(a))
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
    Misconception(
        "divides by |a + b| instead of |a| + |b|",
        "take the absolute values first, np.abs(a) + np.abs(b): where a and b have opposite signs "
        "|a + b| is small (or 0) and the ratio explodes.",
        partial(_rel_error, abs_of_sum=True)),
]

_PARAMETERS = ("W1", "gamma", "beta", "W2", "b2")


def _numpy_losses(params, X, y, batches, lr, backward, in_place=False, update_bn=True, mask="output",
                  w2_input="output", forward=ref.batchnorm_forward):
    """The NumPy training run with switchable mistakes: ``in_place`` updates the caller's
    arrays; ``update_bn=False`` never updates gamma and beta; ``mask="input"`` takes the
    ReLU's mask from the BN layer's input; ``w2_input="input"`` takes W2's gradient from
    the ReLU's input; ``forward`` is the BN forward pass used."""
    p = params if in_place else {k: params[k].copy() for k in _PARAMETERS}
    losses = []
    for index in batches:
        xb = X[index]
        h = xb @ p["W1"]
        a, cache = forward(h, p["gamma"], p["beta"])
        r = np.maximum(a, 0.0)
        loss, ds = softmax_cross_entropy(r @ p["W2"] + p["b2"], y[index])
        losses.append(loss)
        da = (ds @ p["W2"].T) * ((h if mask == "input" else a) > 0)
        dh, dgamma, dbeta = backward(da, cache)
        grads = {"W1": xb.T @ dh, "gamma": dgamma * update_bn, "beta": dbeta * update_bn,
                 "W2": (a if w2_input == "input" else r).T @ ds, "b2": ds.sum(axis=0)}
        for k in _PARAMETERS:
            if in_place:
                p[k] -= lr * grads[k]
            else:
                p[k] = p[k] - lr * grads[k]
    return losses


def _autograd_losses(params, X, y, batches, lr, dtype="float64", zero_grad=True, training=True):
    """The PyTorch training run with switchable mistakes: ``dtype="float32"``; ``zero_grad=False``
    lets .grad accumulate; ``training=False`` normalizes with running statistics (0 and 1)."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype)
    p = {k: torch.tensor(params[k], dtype=dt, requires_grad=True) for k in _PARAMETERS}
    Xt, yt = torch.tensor(X, dtype=dt), torch.tensor(y)
    running = (torch.zeros(p["gamma"].shape, dtype=dt), torch.ones(p["gamma"].shape, dtype=dt))
    losses = []
    for index in batches:
        index = torch.from_numpy(index)
        h = Xt[index] @ p["W1"]
        a = (F.batch_norm(h, None, None, p["gamma"], p["beta"], training=True) if training
             else F.batch_norm(h, *running, p["gamma"], p["beta"], training=False))
        loss = F.cross_entropy(torch.relu(a) @ p["W2"] + p["b2"], yt[index])
        losses.append(loss.item())
        loss.backward()
        with torch.no_grad():
            for t in p.values():
                t -= lr * t.grad
                if zero_grad:
                    t.grad.zero_()
    return losses


def _experiment(seed, n_steps=300, batch_size=32, lr=0.5, numpy=(), constant=(), autograd=(),
                fixed=(), constant_backward=ref.constant_statistics_backward):
    """The experiment with switchable mistakes: keyword arguments of the NumPy runs (``numpy``,
    for both of them, and ``constant`` for the constant-statistics run alone) and of the
    autograd run (``autograd``) as (name, value) pairs; ``fixed`` names the experiment's
    arguments that are not passed on (their defaults are used)."""
    defaults = {"n_steps": 300, "batch_size": 32, "lr": 0.5}
    n_steps, batch_size, lr = ({**{"n_steps": n_steps, "batch_size": batch_size, "lr": lr},
                                **{k: defaults[k] for k in fixed}}[k] for k in defaults)
    X, y = digits_data()
    params = init_mlp(seed)
    batches = minibatches(seed, len(X), batch_size, n_steps)
    return {"numpy": _numpy_losses(params, X, y, batches, lr, ref.batchnorm_backward_compact, **dict(numpy)),
            "constant statistics": _numpy_losses(params, X, y, batches, lr, constant_backward,
                                                 **dict(numpy), **dict(constant)),
            "autograd": _autograd_losses(params, X, y, batches, lr, **dict(autograd))}


_NOT_PASSED_ON = ("backprop_experiment must hand its arguments on: minibatches(seed, len(X), batch_size, n_steps) "
                  "and the lr of both training runs; the check calls it with other values than the defaults.")

EXPERIMENT_CATALOGUE = [
    Misconception(
        "the autograd run computes in float32 (PyTorch's default dtype), so it cannot track float64 to 1e-10",
        "make every tensor of the autograd run float64: torch.tensor(params[k], dtype=torch.float64, "
        "requires_grad=True) and torch.tensor(X, dtype=torch.float64); float32 rounds every loss to about 1e-7.",
        partial(_experiment, autograd=(("dtype", "float32"),))),
    Misconception(
        "the autograd run's gradients accumulate from step to step (.grad is never zeroed)",
        "loss.backward() adds to each parameter's .grad: set it to zero after every update (p.grad.zero_(), "
        "or p.grad = None), or use torch.autograd.grad, which returns the gradients without storing them.",
        partial(_experiment, autograd=(("zero_grad", False),))),
    Misconception(
        "the autograd run normalizes with running statistics (F.batch_norm in evaluation mode)",
        "F.batch_norm's training argument is False by default: call F.batch_norm(h, None, None, gamma, beta, "
        "training=True), so that it normalizes with the batch's own mean and variance, as your NumPy layer does.",
        partial(_experiment, autograd=(("training", False),))),
    Misconception(
        "the NumPy run updates the parameters in place, so the later runs start from trained weights",
        "train a copy: p = {k: v.copy() for k, v in params.items()} at the start of each run (p[k] -= ... "
        "changes the arrays of params itself), so that all three runs start from init_mlp(seed).",
        partial(_experiment, numpy=(("in_place", True),))),
    Misconception(
        "the NumPy runs normalize with the unbiased (N-1) batch variance",
        "the experiment uses your batchnorm_forward: make it pass its own test first (divide by N, the biased "
        "variance of Algorithm 1, as F.batch_norm does in training mode).",
        partial(_experiment, numpy=(("forward", _UNBIASED.impl),))),
    Misconception(
        "gamma and beta are never updated in the NumPy runs",
        "update every parameter after each step, gamma and beta too: gamma -= lr * dgamma, beta -= lr * dbeta "
        "(autograd updates all five).",
        partial(_experiment, numpy=(("update_bn", False),))),
    Misconception(
        "the ReLU's backward pass uses the sign of the BN layer's input instead of its output",
        "the ReLU acts on BN's output a = gamma * x_hat + beta: its gradient passes where a > 0 "
        "(dout_bn = dhidden * (a > 0)), not where x @ W1 > 0.",
        partial(_experiment, numpy=(("mask", "input"),))),
    Misconception(
        "W2's gradient is taken with the ReLU's input instead of its output",
        "scores = relu(a) @ W2 + b2, so dW2 = relu(a).T @ dscores: use the ReLU's output, the input of W2.",
        partial(_experiment, numpy=(("w2_input", "input"),))),
    Misconception(
        "the constant-statistics run uses the right backward pass",
        "pass constant_statistics_backward (dx = gamma * dout * inv_std, with the right dgamma and dbeta) to "
        "the second NumPy run: that curve shows what the paths through mu and sigma change.",
        partial(_experiment, constant_backward=ref.batchnorm_backward_compact)),
    Misconception("the learning rate lr is not passed on to the training runs", _NOT_PASSED_ON,
                  partial(_experiment, fixed=("lr",))),
    Misconception("batch_size is not passed on to minibatches", _NOT_PASSED_ON,
                  partial(_experiment, fixed=("batch_size",))),
    Misconception("n_steps is not passed on to minibatches", _NOT_PASSED_ON,
                  partial(_experiment, fixed=("n_steps",))),
]

CATALOGUE = {
    "batchnorm_forward": FORWARD_CATALOGUE,
    "batchnorm_backward": BACKWARD_CATALOGUE,
    "batchnorm_backward_compact": COMPACT_CATALOGUE,
    "spatial_batchnorm_forward": SPATIAL_FORWARD_CATALOGUE,
    "spatial_batchnorm_backward": SPATIAL_BACKWARD_CATALOGUE,
    "numerical_gradient": NUMERICAL_GRADIENT_CATALOGUE,
    "rel_error": REL_ERROR_CATALOGUE,
    "backprop_experiment": EXPERIMENT_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible case streams are seeded 0..; hidden ones from the course's secret
# (case_rng, hidden_seed), with more shapes. Data are random, never uniform: dout =
# ones would make dx exactly 0; gamma and beta are away from 1 and 0 (gamma of both
# signs), eps takes non-default values, and there are batches of 2, constant
# features and float32 inputs.

_F32 = {"rtol": 1e-4, "atol": 1e-4}  # float32 resolves about 1e-7; the data are O(1)


def _layer(rng, shape, dtype=np.float64, spread=None):
    """x of ``shape`` (axis 1 = features or channels) with per-feature means and spreads,
    gamma (both signs, away from 1) and beta of shape (shape[1],), and a random dout
    shaped like x with a per-feature offset."""
    d = shape[1]
    per_feature = (1, d) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-3, 3, size=d).reshape(per_feature)
    scale = (rng.uniform(0.3, 3, size=d) if spread is None else np.full(d, spread)).reshape(per_feature)
    x = rng.normal(size=shape) * scale + loc
    gamma = rng.uniform(0.5, 2, size=d) * rng.choice([-1.0, 1.0], size=d)
    beta = rng.normal(size=d)
    dout = rng.normal(size=shape) + rng.normal(size=d).reshape(per_feature)
    return {k: v.astype(dtype) for k, v in {"x": x, "gamma": gamma, "beta": beta, "dout": dout}.items()}


def _bn_cases(hidden: bool):
    """Cases shared by the forward and backward checks (each with its dout)."""
    rng = case_rng(hidden, 0)
    # the first case has a non-default eps, so that mistakes about eps show with the others
    settings = [(16, 4, 1e-3), (2, 3, None), (7, 1, None)] + ([(64, 10, None), (3, 5, None)] if hidden else [])
    cases = [Case(f"x {n} x {d} float64, {'default eps' if eps is None else f'eps={eps:g}'}",
                  {**_layer(rng, (n, d)), "eps": eps}) for n, d, eps in settings]
    cases.append(Case("x 10 x 3 float64 with a tiny spread (std 0.01), eps=1e-3",
                      {**_layer(rng, (10, 3), spread=0.01), "eps": 1e-3}))
    data = _layer(rng, (12, 3))
    data["x"][:, 1] = 2.5  # a constant feature, exactly representable so its variance is exactly 0
    cases.append(Case("x 12 x 3 float64 whose 2nd feature is constant, default eps", {**data, "eps": None}))
    cases.append(Case("x 32 x 6 float32, default eps", {**_layer(rng, (32, 6), np.float32), "eps": None, **_F32}))
    if hidden:
        cases.append(Case("x 2 x 4 float32, eps=0.1", {**_layer(rng, (2, 4), np.float32), "eps": 0.1, **_F32}))
        cases.append(Case("x 40 x 2 float64, eps=0.5", {**_layer(rng, (40, 2)), "eps": 0.5}))
    return cases


def _spatial_cases(hidden: bool):
    """(N, C, H, W) cases: a batch of one example with H*W > 1 (PyTorch accepts it), a
    constant channel, float32, non-default eps."""
    rng = case_rng(hidden, 5)
    settings = [((4, 3, 5, 2), np.float64, None), ((2, 2, 3, 3), np.float64, 0.1),
                ((1, 3, 4, 4), np.float64, None)]
    if hidden:
        settings += [((8, 5, 3, 3), np.float64, None), ((1, 2, 2, 1), np.float64, 1e-3),
                     ((3, 4, 2, 5), np.float32, 0.01)]
    cases = []
    for shape, dtype, eps in settings:
        extra = _F32 if dtype == np.float32 else {}
        label = f"x of shape {shape} {np.dtype(dtype).name}, {'default eps' if eps is None else f'eps={eps:g}'}"
        cases.append(Case(label, {**_layer(rng, shape, dtype), "eps": eps, **extra}))
    data = _layer(rng, (3, 3, 2, 2))
    data["x"][:, 0] = -1.5  # a constant channel: variance exactly 0
    cases.append(Case("x of shape (3, 3, 2, 2) float64 whose 1st channel is constant, default eps",
                      {**data, "eps": None}))
    cases.append(Case("x of shape (2, 4, 3, 3) float32, default eps",
                      {**_layer(rng, (2, 4, 3, 3), np.float32), "eps": None, **_F32}))
    return cases


def check_batchnorm_forward(batchnorm_forward, hidden=False):
    """Check batchnorm_forward(x, gamma, beta, eps=1e-5) -> (out, cache): out and the
    cache's keys and values (``bn_exercises.backprop.CACHE_KEYS``)."""
    __tracebackhide__ = True
    report_pass("batchnorm_forward", run_check("batchnorm_forward", batchnorm_forward, ref.batchnorm_forward,
                                               _bn_cases(hidden), _run_forward, FORWARD_CATALOGUE, hidden=hidden))


def check_spatial_batchnorm_forward(spatial_batchnorm_forward, hidden=False):
    """Check spatial_batchnorm_forward(x, gamma, beta, eps=1e-5) -> (out, cache) on (N, C, H, W) maps."""
    __tracebackhide__ = True
    report_pass("spatial_batchnorm_forward", run_check(
        "spatial_batchnorm_forward", spatial_batchnorm_forward, ref.spatial_batchnorm_forward,
        _spatial_cases(hidden), _run_forward, SPATIAL_FORWARD_CATALOGUE, hidden=hidden))


def _with_reference_cache(cases, forward):
    """Backward cases: each case's dout and the cache ``forward`` (the reference) makes for it."""
    backward_cases = []
    for case in cases:
        d = case.data
        eps = {} if d["eps"] is None else {"eps": d["eps"]}
        cache = forward(d["x"], d["gamma"], d["beta"], **eps)[1]
        tolerances = {k: d[k] for k in ("rtol", "atol") if k in d}
        backward_cases.append(Case(case.label + ", random dout", {"dout": d["dout"], "cache": cache, **tolerances}))
    return backward_cases


def check_batchnorm_backward(batchnorm_backward, hidden=False):
    """Check batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta), given the reference forward's cache."""
    __tracebackhide__ = True
    cases = _with_reference_cache(_bn_cases(hidden), ref.batchnorm_forward)
    report_pass("batchnorm_backward", run_check("batchnorm_backward", batchnorm_backward, ref.batchnorm_backward,
                                                cases, _run_backward, BACKWARD_CATALOGUE, hidden=hidden))


def check_batchnorm_backward_compact(batchnorm_backward_compact, hidden=False):
    """Check batchnorm_backward_compact(dout, cache) like the staged one, and that its
    code has no Python loop over examples or features."""
    __tracebackhide__ = True
    cases = _with_reference_cache(_bn_cases(hidden), ref.batchnorm_forward)
    report_pass("batchnorm_backward_compact", run_check(
        "batchnorm_backward_compact", batchnorm_backward_compact, ref.batchnorm_backward_compact,
        cases, _run_backward_compact, COMPACT_CATALOGUE, hidden=hidden))


def check_spatial_batchnorm_backward(spatial_batchnorm_backward, hidden=False):
    """Check spatial_batchnorm_backward(dout, cache) -> (dx, dgamma, dbeta), given the
    reference spatial forward's cache."""
    __tracebackhide__ = True
    cases = _with_reference_cache(_spatial_cases(hidden), ref.spatial_batchnorm_forward)
    report_pass("spatial_batchnorm_backward", run_check(
        "spatial_batchnorm_backward", spatial_batchnorm_backward, ref.spatial_batchnorm_backward,
        cases, _run_backward, SPATIAL_BACKWARD_CATALOGUE, hidden=hidden))


def _bn_output(x, gamma, beta):
    """Batch normalization's output (eps = 1e-5) as a function of x alone, the f of hidden
    numerical-gradient cases. It computes what the exercise's forward pass asks for, so it
    stays with the grader: the visible cases use the learner package's smooth functions."""
    centred = x - x.mean(axis=0)
    return gamma * centred / np.sqrt(np.mean(centred * centred, axis=0) + 1e-5) + beta


def _numgrad_cases(hidden: bool):
    """f = tanh(2 x) (element-wise), softmax over the batch (every output of a column depends on
    every input of it, as in BN), tanh(x @ W) (f(x) and x of different shapes), each at several
    h; a float32 x; and, for hidden cases only, the BN forward itself."""
    rng = case_rng(hidden, 3)
    shape = (2, 3, 2) if hidden else (6,)
    cases = [Case(f"f = tanh(2 x) on x of shape {shape}, h=1e-3",
                  {"f": partial(_tanh_scaled, a=2.0), "x": rng.normal(size=shape),
                   "dout": rng.normal(size=shape), "h": 1e-3})]
    for n, d, h in [(5, 3, 1e-5), (2, 3, 1e-3)]:
        layer = _layer(rng, (n, d))
        if hidden:
            f, what = partial(_bn_output, gamma=layer["gamma"], beta=layer["beta"]), "batch-norm forward"
        else:
            f, what = partial(_softmax_over_batch, scale=1.5), "softmax over the batch of 1.5 x"
        cases.append(Case(f"f = {what} on x {n} x {d}, h={h:g}", {"f": f, "x": layer["x"], "dout": layer["dout"], "h": h}))
    if hidden:
        layer = _layer(rng, (4, 2))
        cases.append(Case("f = softmax over the batch of 0.7 x on x 4 x 2, h=1e-4",
                          {"f": partial(_softmax_over_batch, scale=0.7), "x": layer["x"], "dout": layer["dout"],
                           "h": 1e-4}))
    w = rng.normal(size=(4, 2))
    cases.append(Case("f = tanh(x @ W) with x 3 x 4 and W 4 x 2 (f(x) is 3 x 2, so is dout), default h",
                      {"f": partial(_tanh_linear, w=w), "x": rng.normal(size=(3, 4)),
                       "dout": rng.normal(size=(3, 2)), "h": None}))
    layer = _layer(rng, (4, 2), np.float32)
    if hidden:
        f, what = (partial(_bn_output, gamma=layer["gamma"].astype(np.float64), beta=layer["beta"].astype(np.float64)),
                   "batch-norm forward")
    else:
        f, what = partial(_softmax_over_batch, scale=1.5), "softmax over the batch of 1.5 x"
    cases.append(Case(f"f = {what} on a float32 x 4 x 2, h=1e-5 (differences must be taken in float64)",
                      {"f": f, "x": layer["x"], "dout": layer["dout"].astype(np.float64), "h": 1e-5}))
    return cases


def check_numerical_gradient(numerical_gradient, hidden=False):
    """Check numerical_gradient(f, x, dout, h=1e-5) on smooth functions (tanh, softmax over the
    batch, and the BN forward on hidden cases)."""
    __tracebackhide__ = True
    # rounding in L(x +- h) is ~1e-16 / h: 1e-8 absolute leaves room for any correct summation order
    report_pass("numerical_gradient", run_check(
        "numerical_gradient", numerical_gradient, ref.numerical_gradient, _numgrad_cases(hidden),
        _run_numgrad, NUMERICAL_GRADIENT_CATALOGUE, rtol=1e-6, atol=1e-8, hidden=hidden))


def _rel_error_cases(hidden: bool):
    rng = case_rng(hidden, 4)
    cases = []
    for shape in [(3, 4), (5,)] + ([(2, 2, 2)] if hidden else []):
        a = rng.normal(size=shape)
        b = a * (1 + 1e-6 * rng.normal(size=shape))
        cases.append(Case(f"a and b of shape {shape} that agree to about 1e-6", {"a": a, "b": b}))
    if hidden:  # the same edge cases as the visible ones, with other values
        big, small, other = rng.uniform(50, 200), rng.uniform(1e-4, 1e-2), rng.uniform(1, 5, size=2)
        a = np.array([big, -other[0], small, 0.0, other[1]])
        b = np.array([big * (1 + rng.uniform(2e-3, 1e-2)), -other[0], 2 * small, 0.0, other[1]])
    else:
        a = np.array([100.0, -3.0, 1e-3, 0.0, 2.0])
        b = np.array([100.5, -3.0, 2e-3, 0.0, 2.0])
    cases.append(Case("a = [100, -3, 1e-3, 0, 2], b = [100.5, -3, 2e-3, 0, 2] (one small entry is far off)",
                      {"a": a, "b": b}))
    a = rng.normal(size=6)
    a[[1, 4]] = 0.0
    b = a + 1e-3 * rng.normal(size=6)
    b[[1, 4]] = 0.0
    cases.append(Case("a and b of shape (6,), both 0 at the same two places", {"a": a, "b": b}))
    near_zero, ends = (rng.uniform(1e-5, 1e-3), rng.uniform(1, 5, size=2) * [1, -1]) if hidden else (1e-4, [3.0, -2.0])
    cases.append(Case("a = [3, 1e-4, -2], b = [3, -1e-4, -2] (an entry near 0 with opposite signs)",
                      {"a": np.array([ends[0], near_zero, ends[1]]), "b": np.array([ends[0], -near_zero, ends[1]])}))
    if hidden:
        cases.append(Case("a = [0, 1], b = [1e-3, 1] (a is 0 where b is not)",
                          {"a": np.array([0.0, 1.0]), "b": np.array([1e-3, 1.0])}))
    return cases


def check_rel_error(rel_error, hidden=False):
    """Check rel_error(a, b) -> float."""
    __tracebackhide__ = True
    report_pass("rel_error", run_check("rel_error", rel_error, ref.rel_error, _rel_error_cases(hidden),
                                       _run_rel_error, REL_ERROR_CATALOGUE, hidden=hidden))


#: The experiment's losses agree to about 1e-15 between correct implementations; 1e-5 absolute
#: lets a float32 run's losses count as right (its mistake is the tracking, which is judged
#: exactly), while every other mistake moves them by far more.
_EXPERIMENT_TOLERANCE = {"rtol": 1e-6, "atol": 1e-5}


def _experiment_cases(hidden: bool):
    """The experiment with its defaults, then with every argument at another value."""
    settings = [({}, 300), ({"n_steps": 120, "batch_size": 16, "lr": 0.2}, 120)]
    if hidden:
        settings = [({}, 300), ({"n_steps": 200, "batch_size": 24, "lr": 0.3}, 200)]
    cases = []
    for i, (kwargs, n_steps) in enumerate(settings):
        seed = hidden_seed(f"experiment {i}") % 2**32 if hidden else i
        arguments = ", ".join([f"seed={seed}"] + [f"{k}={v:g}" for k, v in kwargs.items()])
        cases.append(Case(f"backprop_experiment({arguments})", {"seed": seed, "kwargs": kwargs, "n_steps": n_steps}))
    return cases


def check_backprop_experiment(backprop_experiment, hidden=False):
    """Check backprop_experiment(seed, n_steps=300, batch_size=32, lr=0.5): the learner's NumPy
    curve tracks autograd's to 1e-10, the constant-statistics curve leaves it by more than
    0.01, training works, and the curves start and end where the reference's do."""
    __tracebackhide__ = True
    report_pass("backprop_experiment", run_check(
        "backprop_experiment", backprop_experiment, ref.backprop_experiment, _experiment_cases(hidden),
        _run_experiment, EXPERIMENT_CATALOGUE, hidden=hidden, **_EXPERIMENT_TOLERANCE))
