"""A second correct Chapter 4 implementation, written differently from the
reference (feature-by-feature forward, the paper's Sec. 3 equations, the
per-feature Jacobian, perturbations built from an identity matrix, the spatial
case by reshaping to 2-D as CS231n does, and an experiment whose autograd run is built
from nn.Linear / nn.BatchNorm1d modules with torch.optim.SGD, whose NumPy runs use the
staged backward and a cross-entropy of their own), that every check must accept."""

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


def _constant_statistics_backward(dout, cache):
    """dx as if mu and sigma were fixed numbers: only the path through x_hat."""
    dx = dout * cache["gamma"] / np.sqrt(cache["var"] + cache["eps"])
    return dx, np.einsum("nd,nd->d", dout, cache["x_hat"]), dout.sum(0)


def _train_numpy(params, X, y, batches, lr, backward):
    """The staged backward, a log-sum-exp cross-entropy written here, ReLU by np.where."""
    W1, gamma, beta, W2, b2 = (np.copy(params[k]) for k in ("W1", "gamma", "beta", "W2", "b2"))
    losses = []
    for idx in batches:
        inputs, labels = X[idx], y[idx]
        bn_out, cache = batchnorm_forward(inputs @ W1, gamma, beta)
        relu = np.where(bn_out > 0, bn_out, 0.0)
        logits = relu @ W2 + b2
        top = logits.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        losses.append(float(np.mean(log_norm - logits[np.arange(len(labels)), labels])))
        dlogits = np.exp(logits - log_norm[:, None])
        dlogits[np.arange(len(labels)), labels] -= 1
        dlogits /= len(labels)
        dbn = np.where(bn_out > 0, dlogits @ W2.T, 0.0)
        dpre, dgamma, dbeta = backward(dbn, cache)
        W2, b2 = W2 - lr * (relu.T @ dlogits), b2 - lr * dlogits.sum(axis=0)
        W1, gamma, beta = W1 - lr * (inputs.T @ dpre), gamma - lr * dgamma, beta - lr * dbeta
    return losses


def _train_autograd(params, X, y, batches, lr):
    """nn.Linear / nn.BatchNorm1d modules in float64, torch.optim.SGD."""
    import torch
    from torch import nn

    hidden = params["W1"].shape[1]
    model = nn.Sequential(nn.Linear(64, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                          nn.Linear(hidden, 10)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(params["W1"].T))
        model[1].weight.copy_(torch.from_numpy(params["gamma"]))
        model[1].bias.copy_(torch.from_numpy(params["beta"]))
        model[3].weight.copy_(torch.from_numpy(params["W2"].T))
        model[3].bias.copy_(torch.from_numpy(params["b2"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    inputs, labels = torch.from_numpy(X), torch.from_numpy(y)
    losses = []
    for idx in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs[idx]), labels[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def backprop_experiment(seed, n_steps=300, batch_size=32, lr=0.5):
    from bn_exercises.backprop import digits_data, init_mlp, minibatches

    X, y = digits_data()
    params = init_mlp(seed)
    batches = minibatches(seed, len(X), batch_size, n_steps)
    return {"autograd": _train_autograd(params, X, y, batches, lr),
            "numpy": _train_numpy(params, X, y, batches, lr, batchnorm_backward),
            "constant statistics": _train_numpy(params, X, y, batches, lr, _constant_statistics_backward)}
