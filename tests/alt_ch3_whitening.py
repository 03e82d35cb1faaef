"""A second correct Chapter 3 implementation, written differently from the
reference (the SVD of the centred data instead of the covariance's
eigen-decomposition, SciPy's matrix square root and triangular solve, einsum,
a loop over channels, the centring's Jacobian), that every check must accept."""

import numpy as np
import scipy.linalg


def whitening_matrix(X, method="zca", eps=1e-5):
    X = np.asarray(X, dtype=np.float64)
    m, d = X.shape
    mu = X.sum(axis=0) / m
    if method == "cholesky":
        S = np.atleast_2d(np.cov(X, rowvar=False, bias=True)) + eps * np.eye(d)
        L = scipy.linalg.cholesky(S, lower=True)
        return np.linalg.inv(L), mu
    if method == "zca":
        S = (X - mu).T @ (X - mu) / m + np.diag(np.full(d, float(eps)))
        return np.real(scipy.linalg.inv(scipy.linalg.sqrtm(S))), mu
    # PCA from the SVD of the centred data: Sigma = V diag(s^2 / m) V^T, s descending;
    # directions beyond rank m are the rest of V (variance 0). SVD's signs are arbitrary.
    _, s, Vt = np.linalg.svd((X - mu) / np.sqrt(m), full_matrices=True)
    variances = np.concatenate([s ** 2, np.zeros(d - len(s))]) + eps
    return Vt / np.sqrt(variances)[:, None], mu


def whiten(X, W, mu):
    return np.einsum("...j,kj->...k", np.asarray(X) - mu, W)


def bn_identity_parameters(x, eps=1e-5):
    x = np.asarray(x)
    channels = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)
    gamma, beta = [], []
    for values in channels:
        mean = values.sum() / values.size
        gamma.append(np.sqrt(np.mean((values - mean) ** 2) + eps))
        beta.append(mean)
    return np.array(gamma, dtype=x.dtype), np.array(beta, dtype=x.dtype)


def bias_drift(u, b0, lr, steps, inside, target=1.0):
    """x_hat = J x per feature with the centring matrix J = I - 11^T / m, so
    dl/db = 1^T J^T dl/dx_hat (inside) or 1^T dl/dx_hat (outside)."""
    u = np.asarray(u, dtype=np.float64)
    m = u.shape[0]
    J = np.eye(m) - np.ones((m, m)) / m
    path = J if inside else np.eye(m)
    b = np.array(b0, dtype=np.float64)
    bs, losses = [b.copy()], []
    for k in range(steps + 1):
        x_hat = J @ (u + b)
        losses.append(np.mean(np.sum((x_hat - target) ** 2, axis=1)) / 2)
        if k < steps:
            b = b - lr * np.ones(m) @ (path.T @ ((x_hat - target) / m))
            bs.append(b.copy())
    return np.stack(bs), np.array(losses)
