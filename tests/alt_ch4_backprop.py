"""A second correct Chapter 4 implementation, written differently from the
reference (feature-by-feature forward, the paper's Sec. 3 equations, the
per-feature Jacobian, perturbations built from an identity matrix, the spatial
case by reshaping to 2-D as CS231n does), that every check must accept."""

import numpy as np


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    n, d = x.shape
    x_centered, x_hat = np.empty_like(x), np.empty_like(x)
    mu, var = np.empty(d, x.dtype), np.empty(d, x.dtype)
    for j in range(d):  # one feature (column) at a time
        mu[j] = x[:, j].sum() / n
        x_centered[:, j] = x[:, j] - mu[j]
        var[j] = np.dot(x_centered[:, j], x_centered[:, j]) / n
    inv_std = (var + eps) ** -0.5
    x_hat[:] = x_centered / np.sqrt(var + eps)
    cache = dict(gamma=gamma, eps=eps, mu=mu, var=var, inv_std=inv_std, x_hat=x_hat, x_centered=x_centered)
    return x_hat * gamma + beta, cache


def batchnorm_backward(dout, cache):
    """Ioffe & Szegedy (2015), Sec. 3, one equation per line."""
    m = dout.shape[0]
    xmu, var, eps = cache["x_centered"], cache["var"], cache["eps"]
    dx_hat = dout * cache["gamma"]
    dvar = np.sum(dx_hat * xmu, axis=0) * -0.5 * (var + eps) ** -1.5
    dmu = np.sum(dx_hat, axis=0) * -1 / np.sqrt(var + eps) + dvar * np.sum(-2 * xmu, axis=0) / m
    dx = dx_hat / np.sqrt(var + eps) + dvar * 2 * xmu / m + dmu / m
    return dx, np.sum(dout * cache["x_hat"], axis=0), np.sum(dout, axis=0)


def batchnorm_backward_compact(dout, cache):
    """dx_j = J_j^T dout_j with the per-feature Jacobian J = (gamma/sigma)(I - 1/N - x_hat x_hat^T / N)."""
    n = dout.shape[0]
    x_hat = cache["x_hat"]
    jac = np.eye(n)[:, :, None] - 1.0 / n - np.einsum("id,kd->ikd", x_hat, x_hat) / n
    dx = np.einsum("ikd,id->kd", jac, dout) * (cache["gamma"] * cache["inv_std"])
    return dx, np.einsum("nd,nd->d", dout, x_hat), np.einsum("nd->d", dout)


def numerical_gradient(f, x, dout, h=1e-5):
    x = np.asarray(x, dtype=np.float64)
    steps = h * np.eye(x.size).reshape(x.size, *x.shape)
    grad = [np.sum((f(x + e) - f(x - e)) * dout) / (2 * h) for e in steps]
    return np.array(grad).reshape(x.shape)


def rel_error(a, b):
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return max(abs(p - q) / max(abs(p) + abs(q), 1e-8) for p, q in zip(a, b))


def spatial_batchnorm_forward(x, gamma, beta, eps=1e-5):
    """CS231n's route: channels last, flatten to (N*H*W, C), the 2-D forward, and back."""
    n, c, h, w = x.shape
    out, cache = batchnorm_forward(x.transpose(0, 2, 3, 1).reshape(-1, c), gamma, beta, eps)
    back = lambda a: a.reshape(n, h, w, c).transpose(0, 3, 1, 2)  # noqa: E731
    cache.update(x_hat=back(cache["x_hat"]), x_centered=back(cache["x_centered"]))
    return back(out), cache


def spatial_batchnorm_backward(dout, cache):
    n, c, h, w = dout.shape
    flat = lambda a: a.transpose(0, 2, 3, 1).reshape(-1, c)  # noqa: E731
    dx, dgamma, dbeta = batchnorm_backward(flat(dout), {**cache, "x_hat": flat(cache["x_hat"]),
                                                         "x_centered": flat(cache["x_centered"])})
    return dx.reshape(n, h, w, c).transpose(0, 3, 1, 2), dgamma, dbeta
