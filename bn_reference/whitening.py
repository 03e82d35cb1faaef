"""Chapter 3 - whitening versus batch normalization: reference implementations.

Whitening maps centred data x - mu (rows of X, shape (m, d)) with a matrix W
so that the result has identity covariance, W Sigma W^T = I. The course's
conventions (the exercise notebook states them too):

* Sigma is the **biased** covariance, (X - mu)^T (X - mu) / m, as in BN's
  Algorithm 1 (Ioffe & Szegedy 2015), so that for d = 1 every whitening is BN's
  x_hat; and eps is added to its **diagonal** before any square root or
  inverse, Sigma_eps = Sigma + eps I (as BN's sqrt(var + eps); Huang et al.
  2018's decorrelated BN does the same). The whitened data then have covariance
  W Sigma W^T = I - eps W W^T, which is I up to eps.
* With Sigma_eps = U Lambda U^T (eigenvalues in Lambda **descending**):
  PCA  W = Lambda^{-1/2} U^T, each row's largest-magnitude entry made positive
  (scikit-learn's sign rule, sklearn.utils.extmath.svd_flip);
  ZCA  W = U Lambda^{-1/2} U^T = Sigma_eps^{-1/2} (symmetric);
  covariance Cholesky  W = L^{-1} with Sigma_eps = L L^T, L lower triangular
  (method ``"cholesky"``; Kessy et al.'s own Cholesky whitening is another one,
  W = L_P^T with L_P L_P^T = Sigma_eps^{-1}, upper triangular:
  ``kessy_cholesky_matrix``).
  Each is Q Sigma_eps^{-1/2} for an orthogonal Q (Kessy, Lewin & Strimmer 2018).
* Whitening a row vector x is ``(x - mu) @ W.T``.

Also here: BN's per-feature standardization as a (diagonal) whitening-like map,
the gamma and beta that make BN the identity, the bias-drift simulation of the
paper's Sec. 2 and the exercise's experiment (the same drift with a whitening
outside the gradient step, and the cost of whitening as d grows), the derivative
of ZCA's matrix Sigma^{-1/2}, the sigmoid's near-linear region, and PyTorch
versions of ZCA and PCA whitening for the cost benchmark and the derivative
through the eigen-decomposition.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.special import expit
from scipy.stats import norm

from bn_exercises.whitening import cost_data, cpu_time, drift_problem

__all__ = [
    "METHODS",
    "covariance",
    "whitening_matrix",
    "kessy_cholesky_matrix",
    "standardization_matrix",
    "whiten",
    "bn_identity_parameters",
    "bias_drift",
    "whitening_experiment",
    "zca_derivative",
    "sigmoid_tangent_gap",
    "sigmoid_linearity",
    "zca_whiten_torch",
    "pca_whiten_torch",
    "batchnorm_torch",
]

#: The whitening methods ``whitening_matrix`` knows.
METHODS = ("pca", "zca", "cholesky")


def _check_data(X) -> np.ndarray:
    """X as a float64 (m, d) array with m >= 2, or a ValueError that says what to do."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (m examples, d features), got shape {X.shape}; "
                         "for (N, C, H, W) maps move C last and flatten the rest first.")
    if X.shape[0] < 2:
        raise ValueError(f"A covariance needs at least 2 examples (m >= 2), got m = {X.shape[0]}.")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise ValueError(f"X must hold real numbers, got dtype {X.dtype}.")
    return X.astype(np.float64)


def _check_eps(eps) -> float:
    if not (np.isscalar(eps) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}.")
    return float(eps)


def covariance(X):
    """The biased covariance of X (m, d): ``(Sigma (d, d), mu (d,))`` with
    Sigma = (X - mu)^T (X - mu) / m and mu the mean of the rows (float64)."""
    X = _check_data(X)
    mu = X.mean(axis=0)
    Xc = X - mu
    return Xc.T @ Xc / X.shape[0], mu


def _eigh_descending(S):
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric S."""
    lam, U = np.linalg.eigh(S)
    return lam[::-1], U[:, ::-1]


def _require_positive_definite(lam, eps: float, S) -> None:
    """A clear error when Sigma_eps (eigenvalues ``lam``, descending) is singular to working precision."""
    d = len(lam)
    if lam[-1] > d * np.finfo(np.float64).eps * max(lam[0], 1.0):
        return
    if eps == 0:
        raise ValueError(f"The covariance is singular (rank {np.linalg.matrix_rank(S)} of d = {d}, e.g. because "
                         "m <= d or a feature is constant): use eps > 0, or more examples than features.")
    raise ValueError(f"The covariance plus eps * I is singular to working precision: eps = {eps:g} is below the "
                     f"rounding error of the largest eigenvalue {lam[0]:.3g}; use a larger eps.")


def whitening_matrix(X, method: str = "zca", eps: float = 1e-5):
    """The whitening matrix of X (m, d): returns ``(W (d, d), mu (d,))``, float64.

    ``(X - mu) @ W.T`` has covariance W Sigma W^T = I - eps W W^T (identity up
    to eps), with Sigma the biased covariance and Sigma_eps = Sigma + eps I:

    * ``"pca"``: W = Lambda^{-1/2} U^T, rows in descending eigenvalue order, each
      row's largest-magnitude entry positive;
    * ``"zca"``: W = U Lambda^{-1/2} U^T = Sigma_eps^{-1/2};
    * ``"cholesky"``: W = L^{-1}, Sigma_eps = L L^T with L lower triangular (the
      covariance Cholesky whitening; ``kessy_cholesky_matrix`` is Kessy et al.'s).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    eps = _check_eps(eps)
    S, mu = covariance(X)
    d = S.shape[0]
    S_eps = S + eps * np.eye(d)
    lam, U = _eigh_descending(S_eps)
    _require_positive_definite(lam, eps, S)
    if method == "cholesky":
        L = np.linalg.cholesky(S_eps)
        return scipy.linalg.solve_triangular(L, np.eye(d), lower=True), mu   # L^{-1}
    W = U.T / np.sqrt(lam)[:, None]                   # Lambda^{-1/2} U^T
    if method == "zca":
        return U @ W, mu                              # U Lambda^{-1/2} U^T
    rows = np.arange(d)
    return W * np.sign(W[rows, np.argmax(np.abs(W), axis=1)])[:, None], mu


def kessy_cholesky_matrix(X, eps: float = 1e-5):
    """Kessy, Lewin & Strimmer's (2018) Cholesky whitening of X (m, d): ``(W (d, d), mu (d,))``
    with W = L_P^T, where L_P L_P^T = Sigma_eps^{-1} (the Cholesky factor of the precision
    matrix, as Strimmer's R package ``whitening`` computes it: chol(solve(Sigma))). W is
    upper triangular; it whitens as every Q Sigma_eps^{-1/2} does, but it is not the
    covariance Cholesky whitening L^{-1} of ``whitening_matrix(X, "cholesky")``."""
    eps = _check_eps(eps)
    S, mu = covariance(X)
    S_eps = S + eps * np.eye(S.shape[0])
    lam, _ = _eigh_descending(S_eps)
    _require_positive_definite(lam, eps, S)
    return np.linalg.cholesky(np.linalg.inv(S_eps)).T, mu


def standardization_matrix(X, eps: float = 1e-5):
    """BN's per-feature standardization as a linear map: ``(D, mu)`` with
    D = diag(1 / sqrt(var + eps)) (d, d), var the biased per-feature variance.
    ``whiten(X, D, mu)`` is BN's x_hat: unit variances, correlations kept."""
    eps = _check_eps(eps)
    S, mu = covariance(X)
    return np.diag(1.0 / np.sqrt(np.diag(S) + eps)), mu


def whiten(X, W, mu):
    """Apply a whitening: ``(X - mu) @ W.T``.

    X (..., d) has features last (any leading axes, e.g. (N, H, W, C) maps);
    W (k, d) and mu (d,), e.g. from ``whitening_matrix`` fitted on other data.
    Returns (..., k).
    """
    X, W, mu = np.asarray(X), np.asarray(W), np.asarray(mu)
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D (k, d) matrix, got shape {W.shape}.")
    d = W.shape[1]
    if X.ndim < 1 or X.shape[-1] != d:
        raise ValueError(f"X must have its {d} features on the last axis (W is {W.shape}), got shape {X.shape}.")
    if mu.shape != (d,):
        raise ValueError(f"mu must have shape ({d},), one mean per feature, got {mu.shape}.")
    return (X - mu) @ W.T


def bn_identity_parameters(x, eps: float = 1e-5):
    """The gamma and beta for which BN's training-mode forward pass returns x itself.

    x is (N, C) or (N, C, ...) with channels on axis 1 (statistics per channel over
    every other axis, Sec. 3.2). Returns ``(gamma, beta)``, each (C,):
    gamma = sqrt(var + eps) (biased batch variance) and beta = mean, so that
    gamma * (x - mean) / sqrt(var + eps) + beta = x (Algorithm 1, Sec. 3).
    """
    x = np.asarray(x)
    if x.ndim < 2 or x.size // x.shape[1] < 2:
        raise ValueError(f"x must be (N, C) or (N, C, ...) with at least 2 values per channel, got shape {x.shape}.")
    eps = _check_eps(eps)
    axes = (0, *range(2, x.ndim))
    return np.sqrt(x.var(axis=axes) + eps), x.mean(axis=axes)


def bias_drift(u, b0, lr: float, steps: int, inside: bool, target=1.0):
    """The Sec. 2 simulation: gradient descent on a bias b in front of a centring.

    x = u + b, x_hat = x - E[x] (E over the m examples, rows of u (m, d)), and the
    loss l = 1/(2m) sum_i ||x_hat_i - target_i||^2 with ``target`` a number, (d,) or
    (m, d). Each of ``steps`` steps sets b <- b - lr * dl/db, where

    * ``inside=False``: E[x] is treated as a constant (normalization outside the
      gradient step): dl/db = sum_i dl/dx_hat_i;
    * ``inside=True``: the gradient also flows through E[x], which moves with b:
      dl/dx_i = dl/dx_hat_i - mean_k dl/dx_hat_k, and dl/db = sum_i dl/dx_i (= 0).

    Returns ``(b_history (steps + 1, d), loss_history (steps + 1,))``, float64; row k
    is b after k steps and the loss at that b (row 0: b0 and its loss).
    """
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError(f"u must be 2-D (m, d) with m >= 2 examples, got shape {u.shape}.")
    m, d = u.shape
    b = np.asarray(b0, dtype=np.float64)
    if b.shape != (d,):
        raise ValueError(f"b0 must have shape ({d},), one bias per feature, got {b.shape}.")
    target = np.asarray(target, dtype=np.float64)
    if target.shape not in ((), (d,), (m, d)):
        raise ValueError(f"target must be a number or have shape ({d},) or {(m, d)}, got {target.shape}.")
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}.")
    b_history, loss_history = np.empty((steps + 1, d)), np.empty(steps + 1)
    b_history[0] = b
    for k in range(steps + 1):
        x = u + b_history[k]
        residual = x - x.mean(axis=0) - target            # x_hat - target
        loss_history[k] = 0.5 * np.sum(residual ** 2) / m
        if k < steps:
            dx_hat = residual / m                          # dl/dx_hat_i
            dx = dx_hat - dx_hat.mean(axis=0) if inside else dx_hat
            b_history[k + 1] = b_history[k] - lr * dx.sum(axis=0)
    return b_history, loss_history


def _drift_under_whitening(u, t, lr: float, steps: int, learn_beta: bool):
    """Gradient descent on the bias b of a ZCA-whitening layer whose statistics are
    recomputed from the current x = u + b at every step but left out of the gradient:
    z = W (x - mu) with (W, mu) = whitening_matrix(x), loss 1/(2m) sum_i ||z_i + beta - t||^2,
    dl/db = W^T sum_i dl/dz_i (W and mu constants), dl/dbeta = sum_i dl/dz_i; beta stays 0
    unless ``learn_beta``. Returns ``(b_history (steps + 1, d), loss_history (steps + 1,))``."""
    m, d = u.shape
    b, beta = np.zeros(d), np.zeros(d)
    bs, losses = np.empty((steps + 1, d)), np.empty(steps + 1)
    for k in range(steps + 1):
        x = u + b
        W, mu = whitening_matrix(x)
        residual = whiten(x, W, mu) + beta - t            # dl/dz_i = residual_i / m
        bs[k], losses[k] = b, 0.5 * np.sum(residual ** 2) / m
        if k < steps:
            grad_z = residual.sum(axis=0) / m             # sum_i dl/dz_i
            b = b - lr * W.T @ grad_z
            if learn_beta:
                beta = beta - lr * grad_z
    return bs, losses


def whitening_experiment(seed: int, steps: int = 100, lr: float = 0.5, dims=(16, 64, 256), m: int = 256) -> dict:
    """The exercise's experiment, on ``drift_problem(seed)`` and ``cost_data(seed, m, d)``:

    * the Sec. 2 drift with a ZCA whitening outside the gradient step
      (``_drift_under_whitening``), without and with a learned beta: ``b``, ``loss``,
      ``b_beta``, ``loss_beta``, and ``W``, the whitening matrix of the last step without beta.
      Without beta, z does not depend on b, so every step adds lr W^T t to b and the loss
      never moves; with beta, beta -> t and b settles;
    * the CPU time (``cpu_time``, one BLAS thread) of whitening an (m, d) batch
      (``whitening_matrix`` and ``whiten``) and of standardizing it (BN's x_hat, biased
      variance, eps = 1e-5) for each d in ``dims``: ``d``, ``whitening_ms``,
      ``standardization_ms``.
    """
    u, t = drift_problem(seed)
    results = {}
    for suffix, learn_beta in (("", False), ("_beta", True)):
        results["b" + suffix], results["loss" + suffix] = _drift_under_whitening(u, t, lr, steps, learn_beta)
    results["W"] = whitening_matrix(u + results["b"][-1])[0]
    results["d"], results["whitening_ms"], results["standardization_ms"] = list(dims), [], []
    for d in dims:
        X = cost_data(seed, m, d)
        results["whitening_ms"].append(1e3 * cpu_time(lambda: whiten(X, *whitening_matrix(X))))
        results["standardization_ms"].append(1e3 * cpu_time(lambda: (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + 1e-5)))
    return results


def zca_derivative(sigma, d_sigma):
    """The change dW of ZCA's matrix W = sigma^{-1/2} when the symmetric positive definite
    ``sigma`` (d, d) moves by the symmetric ``d_sigma`` (d, d), to first order.

    With sigma = U Lambda U^T, dW = U (K * (U^T dSigma U)) U^T (the Daleckii-Krein formula
    for a function of a symmetric matrix; Ionescu et al. 2015), where K holds the divided
    differences of f(lambda) = lambda^{-1/2}: K_ij = (f(lambda_i) - f(lambda_j)) / (lambda_i -
    lambda_j) = -1 / (s_i s_j (s_i + s_j)) with s = sqrt(lambda), and K_ii = f'(lambda_i) =
    -1/2 lambda_i^{-3/2}, the same expression. The eigenvectors' 1 / (lambda_i - lambda_j)
    cancels: K stays finite, and is computed without cancellation, when eigenvalues meet."""
    S, dS = np.asarray(sigma, dtype=np.float64), np.asarray(d_sigma, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or dS.shape != S.shape:
        raise ValueError(f"sigma and d_sigma must be square matrices of one shape, got {S.shape} and {dS.shape}.")
    lam, U = np.linalg.eigh(S)
    if lam[0] <= 0:
        raise ValueError(f"sigma must be positive definite, its smallest eigenvalue is {lam[0]:.3g}.")
    s = np.sqrt(lam)
    K = -1.0 / (np.outer(s, s) * (s[:, None] + s[None, :]))
    return U @ (K * (U.T @ dS @ U)) @ U.T


def sigmoid_tangent_gap(a: float):
    """How linear the sigmoid is on [-a, a]: ``(gap, share)`` with gap the largest
    |sigmoid(z) - (1/2 + z/4)| there (reached at z = +-a, since sigmoid' <= 1/4) and
    share = P(|z| <= a) for z ~ N(0, 1)."""
    if not a >= 0:
        raise ValueError(f"a must be >= 0, got {a!r}.")
    return float(0.5 + a / 4 - expit(a)), float(norm.cdf(a) - norm.cdf(-a))


def sigmoid_linearity(gamma: float = 1.0, beta: float = 0.0) -> float:
    """R^2 of the best straight-line fit of sigmoid(gamma z + beta) in z, for z ~ N(0, 1):
    Cov[z, s]^2 / Var[s] (Var[z] = 1). The expectations are trapezoidal sums on a grid of
    z in [-12, 12] (spacing 1e-3; the normal density is below 1e-31 outside).
    1 means the sigmoid acts as a linear map on such inputs."""
    z = np.linspace(-12.0, 12.0, 24001)
    w = norm.pdf(z)
    w /= np.trapezoid(w, z)
    s = expit(gamma * z + beta)
    mean = np.trapezoid(w * s, z)
    return float(np.trapezoid(w * z * s, z) ** 2 / np.trapezoid(w * (s - mean) ** 2, z))


# --------------------------------------------------------------------------
# PyTorch versions (differentiable with autograd): the cost benchmark and the
# derivative through the eigen-decomposition.

def _covariance_torch(x: torch.Tensor, eps: float):
    m, d = x.shape
    xc = x - x.mean(dim=0)
    return xc, xc.T @ xc / m + eps * torch.eye(d, dtype=x.dtype)


def zca_whiten_torch(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ZCA-whitened x (m, d) through ``torch.linalg.eigh``: (x - mu) @ Sigma_eps^{-1/2}."""
    xc, S = _covariance_torch(x, eps)
    lam, U = torch.linalg.eigh(S)
    return xc @ ((U * lam.rsqrt()) @ U.T)


def pca_whiten_torch(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PCA-whitened x (m, d): (x - mu) @ W.T with W = Lambda^{-1/2} U^T, descending
    order, each row's largest-magnitude entry positive (as ``whitening_matrix``)."""
    xc, S = _covariance_torch(x, eps)
    lam, U = torch.linalg.eigh(S)
    W = (U * lam.rsqrt()).T.flip(0)
    signs = torch.sign(W.gather(1, W.abs().argmax(dim=1, keepdim=True)))
    return xc @ (W * signs).T


def batchnorm_torch(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """BN's x_hat for x (m, d), written with the same tensor operations as the whitening
    above (no fused kernel): (x - mean) / sqrt(var + eps), biased variance."""
    xc = x - x.mean(dim=0)
    return xc * (xc.square().mean(dim=0) + eps).rsqrt()
