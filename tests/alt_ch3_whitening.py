"""A second correct Chapter 3 implementation, written differently from the
reference (the SVD of the centred data instead of the covariance's
eigen-decomposition, SciPy's matrix square root and triangular solve, einsum,
a loop over channels, the centring's Jacobian, a Sylvester equation for the
derivative), that every check must accept."""

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


def whitening_experiment(seed, steps=100, lr=0.5, dims=(16, 64, 256), m=256):
    """With this module's own whitening: the upstream gradient summed with einsum and b's step
    written as a row vector times W (upstream @ W = W^T upstream), the loss as a mean of
    per-example squared norms; the timings with the course's cpu_time."""
    from bn_exercises.whitening import cost_data, cpu_time, drift_problem

    u, t = drift_problem(seed)
    m_u = len(u)
    out = {}
    for name, learn in (("", False), ("_beta", True)):
        b, beta = np.zeros(u.shape[1]), np.zeros(u.shape[1])
        history, losses = [b], []
        for k in range(steps + 1):
            W, mu = whitening_matrix(u + b, "zca", 1e-5)
            z = whiten(u + b, W, mu)
            losses.append(np.mean(np.sum((z + beta - t) ** 2, axis=1)) / 2)
            if k == steps:
                break
            upstream = np.einsum("ij->j", z + beta - t) / m_u
            b, beta = b - lr * upstream @ W, (beta - lr * upstream if learn else beta)
            history.append(b)
        out["b" + name], out["loss" + name] = np.stack(history), np.asarray(losses)
        out.setdefault("W", W)
    out["d"], out["whitening_ms"], out["standardization_ms"] = list(dims), [], []
    for d in dims:
        X = cost_data(seed, m, d)
        out["whitening_ms"].append(1000 * cpu_time(lambda: whiten(X, *whitening_matrix(X))))
        out["standardization_ms"].append(1000 * cpu_time(lambda: (X - X.mean(0)) / np.sqrt(X.var(0) + 1e-5)))
    return out


def zca_derivative(sigma, d_sigma):
    """Through the square root R = sigma^(1/2): R dR + dR R = dSigma (a Sylvester equation,
    well posed since R's eigenvalues are positive), and W = R^(-1) gives dW = -W dR W."""
    R = np.real(scipy.linalg.sqrtm(np.asarray(sigma, dtype=np.float64)))
    dR = scipy.linalg.solve_sylvester(R, R, np.asarray(d_sigma, dtype=np.float64))
    W = np.linalg.inv(R)
    return -W @ dR @ W
