"""Chapter 4 - the backward pass of batch normalization: reference implementations.

Training-mode BN over a mini-batch x of shape (N, D), Algorithm 1 of
Ioffe & Szegedy (2015): per feature,

    mu = mean_i x_i,   var = mean_i (x_i - mu)^2   (biased: divide by N),
    x_hat = (x - mu) / sqrt(var + eps),   y = gamma * x_hat + beta.

The backward pass comes twice: staged through the nodes of the computational
graph (``batchnorm_backward``, the chain rule of the paper's Sec. 3 one node at
a time) and in closed form (``batchnorm_backward_compact``),

    dx = gamma / (N sigma) * (N dout - sum_i dout_i - x_hat * sum_i dout_i x_hat_i),

with sigma = sqrt(var + eps). ``numerical_gradient`` and ``rel_error`` check
either against central differences. For convolutional feature maps (N, C, H, W),
``spatial_batchnorm_forward`` and ``spatial_batchnorm_backward`` normalize each
channel over (N, H, W) (the paper's Sec. 3.2): the same formulas with N*H*W
values per channel.

``backprop_experiment`` trains a small network with BN on scikit-learn's digits
three times from the same start on the same mini-batches - with the NumPy backward
pass, with the backward pass that treats mu and sigma as constants
(``constant_statistics_backward``), and with PyTorch's autograd - and returns the
three loss curves: the exercise's graded experiment.
"""

from __future__ import annotations

import numpy as np

from bn_exercises.backprop import CACHE_KEYS, digits_data, init_mlp, minibatches, softmax_cross_entropy

__all__ = [
    "CACHE_KEYS",
    "batchnorm_forward",
    "batchnorm_backward",
    "batchnorm_backward_compact",
    "constant_statistics_backward",
    "spatial_batchnorm_forward",
    "spatial_batchnorm_backward",
    "numerical_gradient",
    "rel_error",
    "mlp_losses_numpy",
    "mlp_losses_autograd",
    "backprop_experiment",
]


def batchnorm_forward(x, gamma, beta, eps: float = 1e-5):
    """Algorithm 1 on x (N, D) with gamma, beta (D,) or scalars; returns ``(out, cache)``.

    ``out`` has x's shape; ``cache`` is a dict holding what the backward pass
    needs (``CACHE_KEYS``): ``x_centered`` = x - mu and ``x_hat`` (N, D),
    ``mu``, ``var`` (biased), ``inv_std`` = 1 / sqrt(var + eps) (D,),
    ``gamma`` and ``eps``.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (N, D), got shape {x.shape}; for (N, C, H, W) feature maps use "
                         f"spatial_batchnorm_forward.")
    if x.shape[0] < 2:
        raise ValueError("Batch statistics need at least 2 examples (N >= 2) in training mode.")
    for name, p in (("gamma", gamma), ("beta", beta)):
        if np.shape(p) not in ((), (x.shape[1],)):
            raise ValueError(f"{name} must have shape ({x.shape[1]},) (one value per feature), got {np.shape(p)}.")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}.")
    mu = x.mean(axis=0)
    x_centered = x - mu
    var = x.var(axis=0)  # biased, as in Algorithm 1
    inv_std = 1.0 / np.sqrt(var + eps)
    x_hat = x_centered * inv_std
    out = gamma * x_hat + beta
    cache = {"x_centered": x_centered, "x_hat": x_hat, "mu": mu, "var": var, "inv_std": inv_std,
             "gamma": np.asarray(gamma), "eps": eps}
    return out, cache


def _check_dout(dout, cache) -> np.ndarray:
    """``dout`` as an array shaped like the forward's output, or a clear ValueError."""
    dout = np.asarray(dout)
    if dout.shape != cache["x_hat"].shape:
        raise ValueError(f"dout must have the forward output's shape {cache['x_hat'].shape}, got {dout.shape}.")
    return dout


def _param_grads(dout, x_hat):
    """dl/dgamma = sum_i dout_i * x_hat_i and dl/dbeta = sum_i dout_i, each (D,)."""
    return (dout * x_hat).sum(axis=0), dout.sum(axis=0)


def batchnorm_backward(dout, cache):
    """Backward pass staged through the graph x -> mu -> x_centered -> var -> inv_std -> x_hat -> y.

    dout (N, D) is dl/dy, ``cache`` is ``batchnorm_forward``'s. Returns
    ``(dx, dgamma, dbeta)`` with shapes (N, D), (D,), (D,). Each line is the
    gradient at one node (paper, Sec. 3); a node with two consumers sums the
    gradients arriving from both.
    """
    dout = _check_dout(dout, cache)
    xc, x_hat, inv_std, gamma = cache["x_centered"], cache["x_hat"], cache["inv_std"], cache["gamma"]
    n = dout.shape[0]
    dgamma, dbeta = _param_grads(dout, x_hat)           # y = gamma * x_hat + beta
    dx_hat = dout * gamma
    dinv_std = (dx_hat * xc).sum(axis=0)                # x_hat = x_centered * inv_std
    dvar = -0.5 * inv_std**3 * dinv_std                 # inv_std = (var + eps)^(-1/2)
    dxc = dx_hat * inv_std + dvar * 2.0 * xc / n        # x_centered feeds x_hat and var = mean(x_centered^2)
    dmu = -dxc.sum(axis=0)                              # x_centered = x - mu
    dx = dxc + dmu / n                                  # x feeds x_centered and mu = mean(x)
    return dx, dgamma, dbeta


def batchnorm_backward_compact(dout, cache):
    """Closed-form backward pass, no loops; same inputs and outputs as ``batchnorm_backward``.

    dx = gamma * inv_std / N * (N dout - sum_i dout_i - x_hat * sum_i dout_i x_hat_i),
    where the two sums are dl/dbeta and dl/dgamma.
    """
    dout = _check_dout(dout, cache)
    x_hat, inv_std, gamma = cache["x_hat"], cache["inv_std"], cache["gamma"]
    n = dout.shape[0]
    dgamma, dbeta = _param_grads(dout, x_hat)
    dx = (gamma * inv_std / n) * (n * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def constant_statistics_backward(dout, cache):
    """The wrong backward pass that treats mu and sigma as constants: dx = gamma * dout / sigma
    (only the path through x_hat), with the right dgamma and dbeta. It is the gradient of
    a layer that normalizes with statistics computed outside the gradient step (paper,
    Sec. 2)."""
    dout = _check_dout(dout, cache)
    dgamma, dbeta = _param_grads(dout, cache["x_hat"])
    return cache["gamma"] * cache["inv_std"] * dout, dgamma, dbeta


def _channels_last(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C): one row per (example, position), one column per channel."""
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _channels_first(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Undo ``_channels_last``: (N*H*W, C) -> ``shape`` = (N, C, H, W)."""
    n, c, h, w = shape
    return np.moveaxis(a.reshape(n, h, w, c), -1, 1)


def spatial_batchnorm_forward(x, gamma, beta, eps: float = 1e-5):
    """Batch normalization of feature maps x (N, C, H, W), per channel over (N, H, W)
    (paper, Sec. 3.2: the effective mini-batch is m' = N*H*W); gamma, beta (C,).

    Returns ``(out, cache)``: ``out`` has x's shape; ``cache`` holds ``CACHE_KEYS``
    with ``x_centered`` and ``x_hat`` shaped like x and ``mu``, ``var`` (biased),
    ``inv_std`` (C,). A batch of one example is fine when H*W > 1 (as in PyTorch);
    only N*H*W == 1 is refused.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {x.shape}; for (N, D) use batchnorm_forward.")
    n, _, h, w = x.shape
    if n * h * w < 2:
        raise ValueError("Batch statistics need more than 1 value per channel (N*H*W >= 2) in training mode.")
    out, cache = batchnorm_forward(_channels_last(x), gamma, beta, eps)
    for key in ("x_centered", "x_hat"):
        cache[key] = _channels_first(cache[key], x.shape)
    return _channels_first(out, x.shape), cache


def spatial_batchnorm_backward(dout, cache):
    """Backward pass of ``spatial_batchnorm_forward``: dout (N, C, H, W) and its cache.

    Returns ``(dx, dgamma, dbeta)`` with shapes (N, C, H, W), (C,), (C,): the
    closed form of ``batchnorm_backward_compact`` with the N*H*W values of a
    channel in place of the N examples of a feature.
    """
    dout = _check_dout(dout, cache)
    flat = {**cache, "x_centered": _channels_last(cache["x_centered"]), "x_hat": _channels_last(cache["x_hat"])}
    dx, dgamma, dbeta = batchnorm_backward_compact(_channels_last(dout), flat)
    return _channels_first(dx, dout.shape), dgamma, dbeta


def numerical_gradient(f, x, dout, h: float = 1e-5):
    """Central-difference gradient of L(x) = sum(f(x) * dout) with respect to x.

    ``f`` maps an array shaped like x to an array shaped like ``dout``. Each
    element is perturbed in turn: dL/dx_k ~ (L(x + h e_k) - L(x - h e_k)) / (2 h),
    on a float64 copy of x. In float32, h = 1e-5 itself is representable (about
    84 times float32's spacing of 1.19e-7 near 1), but each L(x +- h e_k) is
    rounded to about 1e-7 times the size of the values it sums, and dividing
    that noise by 2h = 2e-5 leaves an error of about 0.6 % of that size in every
    entry. Returns a float64 array shaped like x; x itself is not modified.
    """
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h!r}.")
    x = np.array(x, dtype=np.float64)
    dout = np.asarray(dout, dtype=np.float64)
    if np.shape(f(x)) != dout.shape:
        raise ValueError(f"dout must have the shape of f(x), {np.shape(f(x))}, got {dout.shape}.")
    grad = np.empty_like(x)
    for k in np.ndindex(x.shape):
        old = x[k]
        x[k] = old + h
        plus = np.sum(f(x) * dout)
        x[k] = old - h
        minus = np.sum(f(x) * dout)
        x[k] = old
        grad[k] = (plus - minus) / (2.0 * h)
    return grad


def rel_error(a, b) -> float:
    """The largest element-wise relative error max_k |a_k - b_k| / max(|a_k| + |b_k|, 1e-8).

    The floor 1e-8 makes two zeros agree (0 / 0 would be nan). Shapes must match.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}.")
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), 1e-8)))


# --------------------------------------------------------------------------
# The graded experiment: a small network trained with the backward pass above

_PARAMETERS = ("W1", "gamma", "beta", "W2", "b2")


def mlp_losses_numpy(params, X, y, batches, lr: float, backward=batchnorm_backward_compact, eps: float = 1e-5):
    """SGD on scores = relu(BN(X[b] @ W1)) @ W2 + b2 with the mean cross-entropy, in NumPy.

    ``params`` is ``init_mlp``'s dict (left unchanged), ``batches`` a list of index
    arrays into X (n, 64) and y (n,); ``backward(dout, cache)`` is BN's backward pass.
    Every step records the loss of its batch, then updates every parameter by
    ``-lr`` times its gradient. Returns the losses, shape (len(batches),).
    """
    p = {k: np.array(params[k], dtype=np.float64) for k in _PARAMETERS}
    losses = []
    for index in batches:
        xb = X[index]
        normalized, cache = batchnorm_forward(xb @ p["W1"], p["gamma"], p["beta"], eps)
        active = normalized > 0
        hidden = normalized * active
        loss, dscores = softmax_cross_entropy(hidden @ p["W2"] + p["b2"], y[index])
        losses.append(loss)
        dnormalized = (dscores @ p["W2"].T) * active
        dh, dgamma, dbeta = backward(dnormalized, cache)
        grads = {"W1": xb.T @ dh, "gamma": dgamma, "beta": dbeta, "W2": hidden.T @ dscores, "b2": dscores.sum(axis=0)}
        p = {k: p[k] - lr * grads[k] for k in _PARAMETERS}
    return np.array(losses)


def mlp_losses_autograd(params, X, y, batches, lr: float, eps: float = 1e-5):
    """``mlp_losses_numpy`` with PyTorch: ``F.batch_norm`` in training mode, ``F.cross_entropy``
    and autograd, in float64, from the same ``params`` (left unchanged). Returns the losses."""
    import torch
    import torch.nn.functional as F

    p = {k: torch.tensor(params[k], dtype=torch.float64, requires_grad=True) for k in _PARAMETERS}
    X, y = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y)
    losses = []
    for index in batches:
        index = torch.as_tensor(index)
        h = F.batch_norm(X[index] @ p["W1"], None, None, p["gamma"], p["beta"], training=True, eps=eps)
        loss = F.cross_entropy(torch.relu(h) @ p["W2"] + p["b2"], y[index])
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, [p[k] for k in _PARAMETERS])
        with torch.no_grad():
            for k, g in zip(_PARAMETERS, grads):
                p[k] -= lr * g
    return np.array(losses)


def backprop_experiment(seed: int, n_steps: int = 300, batch_size: int = 32, lr: float = 0.5) -> dict:
    """The network of ``init_mlp(seed)`` trained on the digits for ``n_steps`` SGD steps on
    ``minibatches(seed, 1797, batch_size, n_steps)``, three times from the same start:
    {"numpy": the compact backward pass, "constant statistics":
    ``constant_statistics_backward``, "autograd": PyTorch}, each a (n_steps,) array of
    losses."""
    X, y = digits_data()
    params = init_mlp(seed)
    batches = minibatches(seed, len(X), batch_size, n_steps)
    return {"numpy": mlp_losses_numpy(params, X, y, batches, lr),
            "constant statistics": mlp_losses_numpy(params, X, y, batches, lr, constant_statistics_backward),
            "autograd": mlp_losses_autograd(params, X, y, batches, lr)}
