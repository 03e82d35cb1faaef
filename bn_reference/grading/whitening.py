"""Chapter 3 - whitening versus batch normalization: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's function, runs it and the reference
(``bn_reference.whitening``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's outputs.
``hidden=True`` runs the grader's own cases (seeded from the course's secret,
more shapes). The ``_run_*`` functions that touch the learner's function live in
the learner package (:mod:`bn_exercises.whitening`); its visible checks replay
this module's visible cases from recorded answers.

PCA whitening is defined only up to the sign of each row, so ``_run_whitening``
compares PCA and ZCA matrices through ``W @ W.T`` and ``W.T @ W`` (see its
docstring): every valid sign passes, and the catalogue's PCA entries match a
learner whatever signs their rows have.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from bn_exercises.whitening import (_run_drift, _run_experiment, _run_identity, _run_whiten, _run_whitening,
                                    _run_zca_derivative, cost_data, cpu_time, drift_problem)

from .. import whitening as ref
from . import Case, Misconception, case_rng, combined, hidden_seed, report_pass, run_check

__all__ = [
    "check_whitening_matrix",
    "check_whiten",
    "check_bn_identity_parameters",
    "check_bias_drift",
    "check_whitening_experiment",
    "check_zca_derivative",
    "CATALOGUE",
]


# --------------------------------------------------------------------------
# Wrong implementations, each a switchable variation of otherwise right code.

def _largest_entry_positive(W):
    """W with each row's sign flipped so that its largest-magnitude entry is positive
    (entries within 1e-6 of the largest count as tied: the first of them decides)."""
    mag = np.abs(W)
    first = np.argmax(mag >= mag.max(axis=1, keepdims=True) * (1 - 1e-6), axis=1)
    signs = np.sign(W[np.arange(len(W)), first])
    return W * np.where(signs == 0, 1.0, signs)[:, None]


def _whitening(X, method="zca", eps=1e-5, bugs=()):
    """whitening_matrix with switchable mistakes (``bugs``, a tuple of names; () is right).
    Returns (W, mu)."""
    if "kessy" in bugs and method != "cholesky":
        bugs = ()  # Kessy et al.'s form, with or without eps, is a Cholesky whitening's mistake
    X = np.asarray(X) if "input_dtype" in bugs else np.asarray(X, dtype=np.float64)
    m, d = X.shape
    if "fixed_eps" in bugs:
        eps = 1e-5
    mu = X.mean(axis=0)
    Xc = X if "uncentred" in bugs else X - mu
    S = Xc.T @ Xc / (1 if "unnormalized" in bugs else m - 1 if "unbiased" in bugs else m)
    if "global_mean" in bugs:  # the covariance still centres each feature (np.cov does)
        mu = np.full(d, X.mean())
    if "standardize" in bugs:
        return np.diag(1.0 / np.sqrt(np.diag(S) + eps)), mu
    if {"eps_after_sqrt", "no_eps", "floor"} & set(bugs):
        S_eps = S + 0.0 * np.eye(d)
    elif "eps_everywhere" in bugs:
        S_eps = S + eps
    elif "shrinkage" in bugs:
        S_eps = (1 - eps) * S + eps * np.eye(d)
    else:
        S_eps = S + eps * np.eye(d)
    if method == "cholesky":
        if "kessy" in bugs:
            return np.linalg.cholesky(np.linalg.inv(S_eps)).T, mu
        L = np.linalg.cholesky(S_eps)
        W = np.linalg.inv(L + eps * np.eye(d) if "eps_after_sqrt" in bugs else L)
        return (W.T if "transposed" in bugs else W), mu
    if method == "zca" and "elementwise" in bugs:
        return S_eps ** -0.5, mu
    if "reduced_svd" in bugs:   # min(m, d) directions only
        _, s, Vt = np.linalg.svd(Xc / np.sqrt(m), full_matrices=False)
        W = Vt / np.sqrt(s ** 2 + eps)[:, None]
        return (Vt.T @ W if method == "zca" else _largest_entry_positive(W)), mu
    lam, U = np.linalg.eigh(S_eps)                      # ascending
    if "floor" in bugs:
        lam = np.maximum(lam, eps)
    if "ascending" not in bugs:
        lam, U = lam[::-1], U[:, ::-1]
    if "rows" in bugs:
        U = U.T
    scale = lam if "inverse" in bugs else (np.sqrt(lam) + eps if "eps_after_sqrt" in bugs else np.sqrt(lam))
    W = U.T / scale[:, None]                            # the PCA rows
    if method == "zca" and "pca_for_zca" not in bugs:
        W = U @ W
    else:
        W = _largest_entry_positive(W)
    return (W.T if "transposed" in bugs else W), mu


_UNBIASED = Misconception(
    "the sample covariance (divided by m - 1, Bessel-corrected) instead of the biased one (m)",
    "this notebook divides by m, as BN's Algorithm 1 does for the variance: Sigma = Xc.T @ Xc / m "
    "(np.cov(X, rowvar=False, bias=True)). np.cov's default divides by m - 1.",
    partial(_whitening, bugs=("unbiased",)))
_FLOOR = Misconception(
    "the eigenvalues floored at eps (max(lambda, eps)) instead of eps added to Sigma",
    "add eps to the covariance's diagonal, Sigma_eps = Sigma + eps * I, so that every eigenvalue becomes "
    "lambda + eps; a floor max(lambda, eps) changes only the eigenvalues below eps.",
    partial(_whitening, bugs=("floor",)))
_FIXED_EPS = Misconception(
    "eps hard-coded (the eps argument is ignored)",
    "use the eps the function is given - whitening_matrix(X, method, eps) - not a constant such as 1e-5 "
    "written into the code.",
    partial(_whitening, bugs=("fixed_eps",)))
_EPS_AFTER_SQRT = Misconception(
    "eps added after the square root (to sqrt(lambda) or to the Cholesky factor) instead of to Sigma",
    "add eps to the covariance's diagonal first, Sigma_eps = Sigma + eps * I, then take the eigenvalues "
    "(or the Cholesky factor) of Sigma_eps - as BN uses sqrt(var + eps), not sqrt(var) + eps.",
    partial(_whitening, bugs=("eps_after_sqrt",)))
_NO_EPS = Misconception(
    "eps not used (W computed from Sigma itself)",
    "add eps * I to the covariance before the eigen-decomposition or the Cholesky factorization: it "
    "keeps W finite when the covariance is singular (m <= d, a constant feature).",
    partial(_whitening, bugs=("no_eps",)))

_SHRINKAGE = Misconception(
    "eps mixed in by shrinkage ((1 - eps) Sigma + eps I) instead of added (Sigma + eps I)",
    "this notebook adds eps to the diagonal and leaves Sigma itself alone: Sigma_eps = Sigma + eps * np.eye(d). "
    "Shrinking towards the identity, (1 - eps) * Sigma + eps * I, also scales every covariance by 1 - eps.",
    partial(_whitening, bugs=("shrinkage",)))
_UNNORMALIZED = Misconception(
    "the covariance not divided by m (Xc.T @ Xc is m times Sigma)",
    "Sigma is an average over the examples: Sigma = Xc.T @ Xc / m. Without the 1/m every eigenvalue is m times "
    "too large and W is sqrt(m) times too small.",
    partial(_whitening, bugs=("unnormalized",)))
_GLOBAL_MEAN = Misconception(
    "mu is the mean of the whole array (np.mean(X) without axis), one number for every feature",
    "take the mean of each feature, over the examples: mu = X.mean(axis=0), shape (d,).",
    partial(_whitening, bugs=("global_mean",)))
_KESSY = Misconception(
    "Kessy et al.'s Cholesky whitening (upper-triangular W = L^T with L L^T = Sigma^-1) instead of the "
    "covariance Cholesky whitening",
    "you computed Kessy et al.'s upper-triangular W (the Cholesky factor of the precision matrix, "
    "transposed: chol(inv(Sigma_eps)).T). It whitens too, but this exercise asks for the covariance "
    "Cholesky whitening: W = L^(-1) with Sigma_eps = L @ L.T and L = np.linalg.cholesky(Sigma_eps), "
    "lower triangular.",
    partial(_whitening, bugs=("kessy",)))

WHITENING_CATALOGUE = [
    Misconception(
        "per-feature standardization returned as whitening (the correlations are kept)",
        "dividing each feature by its own standard deviation, W = diag(1 / sqrt(var + eps)), is what BN does; "
        "it leaves the off-diagonal covariances in place. Whitening uses the whole covariance matrix: "
        "W = Sigma_eps^(-1/2) (ZCA), Lambda^(-1/2) U^T (PCA) or L^(-1) (covariance Cholesky).",
        partial(_whitening, bugs=("standardize",))),
    Misconception(
        "the mean not subtracted (the covariance is computed from X instead of X - mu)",
        "center first: Xc = X - X.mean(axis=0), then Sigma = Xc.T @ Xc / m. X.T @ X / m is the second "
        "moment, not the covariance, unless the mean is 0.",
        partial(_whitening, bugs=("uncentred",))),
    _UNBIASED,
    _EPS_AFTER_SQRT,
    Misconception(
        "eps added to every entry of Sigma (Sigma + eps) instead of to its diagonal (Sigma + eps * I)",
        "NumPy broadcasts a number to every entry: write Sigma + eps * np.eye(d) to add it to the "
        "variances only.",
        partial(_whitening, bugs=("eps_everywhere",))),
    _NO_EPS,
    _FLOOR,
    _FIXED_EPS,
    Misconception(
        "W transposed (the whitened data are (X - mu) @ W, not (X - mu) @ W.T)",
        "return W with one row per output coordinate, so that W @ Sigma_eps @ W.T = I: for PCA the rows "
        "are the eigenvectors, Lambda^(-1/2) U^T; for the covariance Cholesky whitening W = L^(-1) with "
        "Sigma_eps = L @ L.T and L lower triangular (np.linalg.cholesky returns L; scipy.linalg.cholesky "
        "returns L.T unless lower=True).",
        partial(_whitening, bugs=("transposed",))),
    Misconception(
        "PCA whitening returned where ZCA was asked (W is not symmetric)",
        "ZCA rotates back after scaling: W = U @ diag(lambda^(-1/2)) @ U.T, which is symmetric and equals "
        "Sigma_eps^(-1/2). diag(lambda^(-1/2)) @ U.T alone is PCA whitening.",
        partial(_whitening, bugs=("pca_for_zca",))),
    Misconception(
        "eigenvalues in ascending order (np.linalg.eigh's order) for PCA",
        "np.linalg.eigh returns the eigenvalues in ascending order: reverse them and the eigenvector "
        "columns, lam[::-1] and U[:, ::-1], so that the first row of W belongs to the largest eigenvalue.",
        partial(_whitening, bugs=("ascending",))),
    Misconception(
        "eigenvectors taken from the rows of U instead of its columns",
        "np.linalg.eigh(S) returns U with the eigenvectors as columns, U[:, k]; the PCA matrix has them as "
        "rows, U.T.",
        partial(_whitening, bugs=("rows",))),
    Misconception(
        "Sigma ** -0.5 taken entry by entry (NumPy's ** is not a matrix power)",
        "the matrix inverse square root is U @ diag(lambda^(-1/2)) @ U.T from np.linalg.eigh; "
        "Sigma ** -0.5 raises each entry to the power -0.5 (nan for negative covariances).",
        partial(_whitening, bugs=("elementwise",))),
    Misconception(
        "the directions the batch does not span are dropped (a reduced SVD of the centred data when m <= d)",
        "with m <= d examples the centred data span at most m - 1 directions, but W must act on all d: the "
        "others have variance 0, so Sigma_eps = Sigma + eps * I gives them 1 / sqrt(eps). Decompose the d x d "
        "matrix Sigma + eps * I with np.linalg.eigh (or use np.linalg.svd(..., full_matrices=True)).",
        partial(_whitening, bugs=("reduced_svd",))),
    Misconception(
        "the inverse covariance (lambda^-1) used instead of its inverse square root (lambda^-1/2)",
        "whitening divides each eigen-direction by its standard deviation sqrt(lambda), not by its "
        "variance: W = diag(lambda^(-1/2)) @ U.T (PCA), so that W @ Sigma_eps @ W.T = I.",
        partial(_whitening, bugs=("inverse",))),
    _KESSY,
    _SHRINKAGE,
    _UNNORMALIZED,
    _GLOBAL_MEAN,
    Misconception(
        "computed in float32 (the input's dtype) instead of float64",
        "convert first: X = np.asarray(X, dtype=np.float64). In float32 the covariance keeps about 7 digits, "
        "and whitening an ill-conditioned covariance multiplies that error by its condition number.",
        partial(_whitening, bugs=("input_dtype",))),
    # the sample covariance rarely comes alone in real code: the common pairs
    combined(_UNBIASED, _FLOOR, partial(_whitening, bugs=("unbiased", "floor"))),
    combined(_UNBIASED, _FIXED_EPS, partial(_whitening, bugs=("unbiased", "fixed_eps"))),
    combined(_UNBIASED, _EPS_AFTER_SQRT, partial(_whitening, bugs=("unbiased", "eps_after_sqrt"))),
    combined(_UNBIASED, _NO_EPS, partial(_whitening, bugs=("unbiased", "no_eps"))),
    combined(_UNBIASED, _SHRINKAGE, partial(_whitening, bugs=("unbiased", "shrinkage"))),
    combined(_GLOBAL_MEAN, _UNBIASED, partial(_whitening, bugs=("global_mean", "unbiased"))),
    combined(_UNNORMALIZED, _NO_EPS, partial(_whitening, bugs=("unnormalized", "no_eps"))),
    combined(_KESSY, _NO_EPS, partial(_whitening, bugs=("kessy", "no_eps"))),
]


def _whiten(X, W, mu, bug=None):
    """whiten with one switchable mistake."""
    X, W, mu = np.asarray(X), np.asarray(W), np.asarray(mu)
    if bug == "no_mean":
        return X @ W.T
    if bug == "own_mean":
        mu = X.reshape(-1, X.shape[-1]).mean(axis=0)
    return (X - mu) @ (W if bug == "untransposed" else W.T)


WHITEN_CATALOGUE = [
    Misconception(
        "the mean not subtracted (X @ W.T)",
        "whitening is a map of the centred data: (X - mu) @ W.T.",
        partial(_whiten, bug="no_mean")),
    Misconception(
        "W applied without transposing ((X - mu) @ W)",
        "each example is a row x, and its whitened version is W @ (x - mu); for all rows at once that is "
        "(X - mu) @ W.T. The two agree only when W is symmetric (ZCA).",
        partial(_whiten, bug="untransposed")),
    Misconception(
        "X's own mean used instead of the mu passed in",
        "use the mu that was fitted together with W (on the training batch): new data are centred with the "
        "training mean, exactly as a fitted scaler or BN at inference does.",
        partial(_whiten, bug="own_mean")),
]


def _identity(x, eps=1e-5, bug=None):
    """bn_identity_parameters with one switchable mistake; returns (gamma, beta)."""
    x = np.asarray(x)
    if bug == "per_activation":
        axes = 0
    elif bug == "axes_023":   # written for 2-, 3- and 4-D input only
        axes = (0, 2, 3)[:x.ndim - 1]
    else:
        axes = (0, *range(2, x.ndim))
    mean = x.mean(axis=axes)
    var = x.var(axis=axes, ddof=1 if bug == "unbiased" else 0)
    if bug == "no_eps":
        return np.sqrt(var), mean
    if bug == "variance":
        return var + eps, mean
    if bug == "inverse":
        return 1.0 / np.sqrt(var + eps), mean
    if bug == "swapped":
        return mean, np.sqrt(var + eps)
    return np.sqrt(var + eps), mean


IDENTITY_CATALOGUE = [
    Misconception(
        "identity parameters without eps (gamma = sqrt(var))",
        "the paper's gamma = sqrt(Var[x]) (Sec. 3) is exact for its eps-free x_hat; Algorithm 1 divides by "
        "sqrt(var + eps), so undoing it needs gamma = sqrt(var + eps).",
        partial(_identity, bug="no_eps")),
    Misconception(
        "the sample variance (N - 1, Bessel-corrected) instead of the batch's biased variance",
        "the training-mode forward pass normalizes with the biased batch variance (divide by N, "
        "x.var(axis=0)), so gamma must use the same one.",
        partial(_identity, bug="unbiased")),
    Misconception(
        "gamma set to the variance instead of the standard deviation",
        "x_hat = (x - mean) / sqrt(var + eps); multiplying by gamma = sqrt(var + eps) undoes it.",
        partial(_identity, bug="variance")),
    Misconception(
        "gamma set to 1 / sqrt(var + eps), the normalization's own factor instead of its inverse",
        "y = gamma * x_hat + beta must undo x_hat = (x - mean) / sqrt(var + eps): gamma = sqrt(var + eps).",
        partial(_identity, bug="inverse")),
    Misconception(
        "statistics per activation instead of per channel (input with axes after the channels)",
        "for (N, C, L), (N, C, H, W) or (N, C, D, H, W) input BN has one gamma and one beta per channel, and "
        "the statistics run over every axis but the channel axis 1 (axis=(0, 2, 3) for 4-D input), "
        "Sec. 3.2 of the paper.",
        partial(_identity, bug="per_activation")),
    Misconception(
        "statistics over axes (0, 2, 3) at most: written for input of up to 4 dimensions",
        "take every axis but the channel axis 1, whatever the number of dimensions: "
        "axes = (0,) + tuple(range(2, x.ndim)) - a 5-D (N, C, D, H, W) input has D, H and W after C.",
        partial(_identity, bug="axes_023")),
    Misconception(
        "gamma and beta swapped (returns (mean, std))",
        "return (gamma, beta) in this order: gamma = sqrt(var + eps) scales, beta = mean shifts.",
        partial(_identity, bug="swapped")),
]


def _drift(u, b0, lr, steps, inside, target=1.0, bug=None):
    """bias_drift with one switchable mistake; returns (b_history, loss_history)."""
    u = np.asarray(u, dtype=np.float64)
    m = 1 if bug == "sum_loss" else u.shape[0]
    b, t = np.asarray(b0, dtype=np.float64), np.asarray(target, dtype=np.float64)
    through_mean = {"always_inside": True, "always_outside": False}.get(bug, inside)
    bs, losses = [], []
    for k in range(steps + 1):
        x = u + b
        residual = (x if bug == "no_centring" else x - x.mean(axis=0)) - t
        if bug != "no_start" or k > 0:
            bs.append(b)
            losses.append(0.5 * np.sum(residual ** 2) / m)
        if k == steps or (bug == "stop_early" and k == steps - 1):
            break
        g = residual / m
        if through_mean and bug != "no_centring":
            g = g - g.mean(axis=0)
        grad = g.mean(axis=0) if bug == "mean_grad" else g.sum(axis=0)
        b = b + lr * grad if bug == "ascent" else b - lr * grad
    return np.array(bs).reshape(-1, u.shape[1]), np.array(losses)


BIAS_DRIFT_CATALOGUE = [
    Misconception(
        "the gradient flows through E[x] although inside=False, so b never drifts",
        "with inside=False the step must ignore that E[x] moves with b (the paper's normalization outside "
        "the gradient step, Sec. 2): dl/db = sum_i dl/dx_hat_i, without subtracting its mean. That is what "
        "makes b drift.",
        partial(_drift, bug="always_inside")),
    Misconception(
        "E[x] treated as a constant although inside=True",
        "with inside=True the gradient also flows through E[x] = mean_i (u_i + b): dl/dx_i = dl/dx_hat_i - "
        "mean_k dl/dx_hat_k, and dl/db = sum_i dl/dx_i, which is 0 - b stays put.",
        partial(_drift, bug="always_outside")),
    Misconception(
        "b moves up the gradient (b + lr * grad)",
        "gradient descent subtracts: b = b - lr * dl/db.",
        partial(_drift, bug="ascent")),
    Misconception(
        "the loss summed over the examples instead of averaged (no 1/m)",
        "l = 1/(2m) * sum_i ||x_hat_i - target_i||^2: divide by the number of examples m, in the loss and so "
        "in its gradient dl/dx_hat_i = (x_hat_i - target_i) / m.",
        partial(_drift, bug="sum_loss")),
    Misconception(
        "dl/db averaged over the examples instead of summed",
        "b is shared by all m examples, so dl/db adds their terms: sum over i of dl/dx_i (the 1/m is already "
        "inside dl/dx_hat_i = (x_hat_i - target_i) / m).",
        partial(_drift, bug="mean_grad")),
    Misconception(
        "x_hat = x: the centring x - E[x] left out",
        "the layer normalizes: x = u + b, then x_hat = x - x.mean(axis=0) over the m examples, recomputed at "
        "every step with the current b.",
        partial(_drift, bug="no_centring")),
    Misconception(
        "the histories lack the starting point (b0 and its loss)",
        "row k holds b after k steps and the loss there, k = 0 .. steps: record b0 and its loss before the "
        "first step (steps + 1 rows).",
        partial(_drift, bug="no_start")),
    Misconception(
        "the histories stop one step early (nothing recorded after the last step)",
        "row k holds b after k steps, k = 0 .. steps: after the last update record the final b and its loss "
        "too (steps + 1 rows).",
        partial(_drift, bug="stop_early")),
]


def _experiment(seed, steps=100, lr=0.5, dims=(16, 64, 256), m=256, bug=None):
    """whitening_experiment with one switchable mistake (the reference's whitening inside)."""
    u, t = drift_problem(seed)
    results = {}
    for suffix, learn_beta in (("", False), ("_beta", True)):
        learn_beta = learn_beta and bug != "beta_frozen"
        b, beta = np.zeros(u.shape[1]), np.zeros(u.shape[1])
        W0, mu0 = ref.whitening_matrix(u)
        bs, losses = [], []
        for k in range(steps + 1):
            x = u + b
            W, mu = (W0, mu0) if bug == "statistics_once" else ref.whitening_matrix(x)
            residual = ref.whiten(x, W, mu) + beta - t
            bs.append(b)
            losses.append(0.5 * np.sum(residual ** 2) / len(u))
            if k == steps:
                break
            grad_z = residual / len(u)
            grad_b = grad_z - grad_z.mean(axis=0) if bug == "through_mu" else grad_z
            b = b - lr * (grad_b.sum(axis=0) if bug == "no_transpose" else W.T @ grad_b.sum(axis=0))
            if learn_beta:
                beta = beta - lr * grad_z.sum(axis=0)
        results["b" + suffix], results["loss" + suffix] = np.array(bs), np.array(losses)
        if suffix == "":
            results["W"] = W
    results["d"], times = list(dims), {"w": [], "s": []}
    for d in dims:
        X = cost_data(seed, m, d)
        times["w"].append(1e3 * cpu_time(lambda: ref.whiten(X, *ref.whitening_matrix(X))))
        times["s"].append(1e3 * cpu_time(lambda: (X - X.mean(axis=0)) / np.sqrt(X.var(axis=0) + 1e-5)))
    swap = bug == "swapped_timings"
    results["whitening_ms"], results["standardization_ms"] = (times["s"], times["w"]) if swap else (times["w"],
                                                                                                     times["s"])
    return results


EXPERIMENT_CATALOGUE = [
    Misconception(
        "W and mu computed once, before the loop, instead of from the current x = u + b at every step",
        "recompute (W, mu) = whitening_matrix(x) from the current x = u + b at every step, as a normalization "
        "layer does with each batch. Computed once, they turn the layer into a fixed affine map of b: the loss "
        "then depends on b, and b converges or diverges instead of drifting at a constant loss.",
        partial(_experiment, bug="statistics_once")),
    Misconception(
        "b never moves: the gradient flows through mu, although this experiment keeps the statistics outside "
        "the gradient step",
        "here W and mu are constants for the step: dl/db = W.T @ sum_i dl/dz_i, without subtracting the mean "
        "of dl/dz over the examples (that is what inside=True did in bias_drift).",
        partial(_experiment, bug="through_mu")),
    Misconception(
        "the step on b leaves out W.T (dl/db = sum_i dl/dz_i)",
        "z_i = W (x_i - mu) with x_i = u_i + b, so dz_i/db = W and dl/db = W.T @ sum_i dl/dz_i.",
        partial(_experiment, bug="no_transpose")),
    Misconception(
        "with learn_beta the bias keeps drifting: beta is never updated",
        "in the run with beta, update it too: beta = beta - lr * sum_i dl/dz_i. Once beta reaches the target, "
        "dl/dz sums to 0 and b stops.",
        partial(_experiment, bug="beta_frozen")),
    Misconception(
        "whitening is not slower than standardization: the two timings are swapped",
        "time the whitening (whitening_matrix, then whiten) into whitening_ms and the per-feature "
        "standardization into standardization_ms.",
        partial(_experiment, bug="swapped_timings")),
]


def _zca_derivative(sigma, d_sigma, bug=None):
    """zca_derivative with one switchable mistake."""
    lam, U = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
    s = np.sqrt(lam)
    inner = U @ d_sigma @ U.T if bug == "wrong_sandwich" else U.T @ d_sigma @ U
    if bug == "naive":
        with np.errstate(all="ignore"):
            K = (1 / s[:, None] - 1 / s[None, :]) / (lam[:, None] - lam[None, :])
        K[np.diag_indices_from(K)] = -0.5 * lam ** -1.5
    elif bug == "square_root":
        K = 1.0 / (s[:, None] + s[None, :])
    else:
        K = -1.0 / (np.outer(s, s) * (s[:, None] + s[None, :]))
    if bug == "no_diagonal":
        K[np.diag_indices_from(K)] = 0.0
    if bug == "eigenvalues_only":
        K = np.diag(np.diag(K))
    return U @ (K * inner) @ U.T


ZCA_DERIVATIVE_CATALOGUE = [
    Misconception(
        "the divided difference computed as written, (f(lambda_i) - f(lambda_j)) / (lambda_i - lambda_j): wrong "
        "where two eigenvalues meet",
        "when lambda_i and lambda_j are equal or close, both differences are rounding errors, and 0/0 or a "
        "ratio of rounding errors comes out. Simplify first: with s = sqrt(lambda), "
        "(1/s_i - 1/s_j) / (s_i^2 - s_j^2) = -1 / (s_i s_j (s_i + s_j)), finite and exact for every pair "
        "(and equal to f'(lambda_i) on the diagonal).",
        partial(_zca_derivative, bug="naive")),
    Misconception(
        "the eigenvectors' change left out (only the eigenvalue terms, K off the diagonal set to 0)",
        "dW = dU Lambda^(-1/2) U^T + U d(Lambda^(-1/2)) U^T + U Lambda^(-1/2) dU^T: the eigenvectors move too, "
        "and their terms fill the off-diagonal of K with divided differences.",
        partial(_zca_derivative, bug="eigenvalues_only")),
    Misconception(
        "the diagonal of K left at 0 (the eigenvalues' own change dropped)",
        "K_ii = f'(lambda_i) = -1/2 lambda_i^(-3/2): when Sigma changes along u_i, the i-th eigenvalue moves by "
        "u_i^T dSigma u_i.",
        partial(_zca_derivative, bug="no_diagonal")),
    Misconception(
        "the derivative of Sigma^(1/2) instead of Sigma^(-1/2)",
        "f(lambda) = lambda^(-1/2) here, so its divided differences are -1 / (s_i s_j (s_i + s_j)) with "
        "s = sqrt(lambda); 1 / (s_i + s_j) belongs to the square root itself.",
        partial(_zca_derivative, bug="square_root")),
    Misconception(
        "U dSigma U^T instead of U^T dSigma U",
        "move dSigma into the eigenbasis first: U.T @ d_sigma @ U (U's columns are the eigenvectors), apply K "
        "there, then back with U @ (...) @ U.T.",
        partial(_zca_derivative, bug="wrong_sandwich")),
]

CATALOGUE = {
    "whitening_matrix": WHITENING_CATALOGUE,
    "whiten": WHITEN_CATALOGUE,
    "bn_identity_parameters": IDENTITY_CATALOGUE,
    "bias_drift": BIAS_DRIFT_CATALOGUE,
    "whitening_experiment": EXPERIMENT_CATALOGUE,
    "zca_derivative": ZCA_DERIVATIVE_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible case streams are seeded 0..; hidden ones from the course's secret
# (case_rng, hidden_seed). Every parameter takes non-default values in some case.

def _correlated(rng, m, d, dtype=np.float64, scales=(0.5, 3.0)):
    """m examples of d correlated features: N(0, 1) rows mixed by a random rotation with scales drawn
    from ``scales`` (distinct eigenvalues), shifted by means in [-3, 3]."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = q * rng.uniform(*scales, size=d)
    return (rng.normal(size=(m, d)) @ mix.T + rng.uniform(-3, 3, size=d)).astype(dtype)


def _with_spectrum(rng, m, lam):
    """m examples whose biased covariance has exactly the eigenvalues ``lam`` (in random
    directions), shifted by means in [-3, 3]."""
    d = len(lam)
    Z = rng.normal(size=(m, d))
    Z -= Z.mean(axis=0)
    Z = Z @ np.linalg.inv(np.linalg.cholesky(Z.T @ Z / m)).T   # biased covariance exactly I
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return Z * np.sqrt(np.asarray(lam, dtype=np.float64)) @ q.T + rng.uniform(-3, 3, size=d)


def _ill_conditioned(rng, m, d):
    """float32 data whose covariance has a condition number near 1e5 (standard deviations
    from 1 down to about 3e-3) and means near 10: float32 arithmetic loses 3 or more digits."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = q * np.geomspace(1.0, 10 ** -2.5, d)
    return (rng.normal(size=(m, d)) @ mix.T + rng.uniform(8, 12, size=d)).astype(np.float32)


def _whitening_case(label, X, method=None, eps=None):
    args = "the defaults" if method is None else f"method={method!r}" + ("" if eps is None else f", eps={eps:g}")
    return Case(f"X {' x '.join(map(str, X.shape))} {X.dtype.name}{label}, {args}",
                {"X": X, "method": method, "eps": eps})


def _whitening_cases(hidden: bool):
    """The first case (ZCA with an eps between the covariance's eigenvalues) tells every entry
    that shows on ZCA apart; the PCA and Cholesky ones follow on the same data."""
    rng = case_rng(hidden, 0)
    spectrum = [rng.uniform(2, 5), rng.uniform(0.8, 1.5), rng.uniform(0.4, 0.7), rng.uniform(0.05, 0.2)]
    X = _with_spectrum(rng, 40 if hidden else 30, spectrum[1:] if hidden else spectrum)
    # eps = 0.3 lies between the eigenvalues: a floor max(lambda, eps) changes only the smallest, and
    # shrinkage (1 - eps) Sigma + eps I stays positive definite
    cases = [_whitening_case(" (covariance eigenvalues on both sides of eps)", X, "zca", 0.3),
             _whitening_case("", X, "pca", 0.05),
             _whitening_case("", X, "cholesky", 0.05), _whitening_case("", _correlated(rng, 50, 3), None),
             _whitening_case(" (a batch of 2: the covariance has rank 1)", _correlated(rng, 2, 2), "pca", 1e-3)]
    X = _correlated(rng, 12, 3)
    X[:, 1] = 2.5  # a constant feature: its variance is exactly 0
    cases.append(_whitening_case(" whose 2nd feature is constant", X, "cholesky", 1e-3))
    cases.append(_whitening_case(" (m < d: the covariance is singular)", _correlated(rng, 5, 8), "zca", 0.1))
    cases.append(_whitening_case(" (m < d: d - m + 1 eigenvalues equal eps, any basis of theirs is right)",
                                 _correlated(rng, 4, 6), "pca", 0.2))
    cases.append(_whitening_case(" with a condition number near 1e5 (work in float64)",
                                 _ill_conditioned(rng, 60, 4), "zca", 1e-7))
    cases.append(_whitening_case(" (one feature: every whitening is BN's x_hat)", _correlated(rng, 20, 1),
                                 "cholesky", 0.5))
    if hidden:
        cases.append(_whitening_case("", _correlated(rng, 100, 6), "pca", 0.2))
        cases.append(_whitening_case(" (a batch of 2)", _correlated(rng, 2, 3), "zca", 1e-2))
        cases.append(_whitening_case(" (m < d)", _correlated(rng, 3, 6), "cholesky", 0.3))
        cases.append(_whitening_case("", _ill_conditioned(rng, 64, 5), "pca", 1e-7))
    return cases


def check_whitening_matrix(whitening_matrix, hidden=False):
    """Check whitening_matrix(X, method="zca", eps=1e-5) -> (W, mu) for PCA (rows up to sign),
    ZCA and covariance-Cholesky whitening."""
    __tracebackhide__ = True
    report_pass("whitening_matrix", run_check(
        "whitening_matrix", whitening_matrix, ref.whitening_matrix, _whitening_cases(hidden), _run_whitening,
        WHITENING_CATALOGUE, rtol=1e-6, atol=1e-9, hidden=hidden))


def _whiten_cases(hidden: bool):
    """New data X and a (W, mu) fitted on another batch, so mu is not X's own mean."""
    rng = case_rng(hidden, 1)
    cases = []
    specs = [("zca", (20, 3), ""), ("pca", (20, 3), ""), ("cholesky", (2, 3, 4, 3),
             " (a (N, H, W, C) map: features last)"), ("pca", (2, 4), " (a batch of 2)")]
    if hidden:
        specs += [("cholesky", (7, 5), ""), ("zca", (3, 2, 2), " (3-D)")]
    for method, shape, note in specs:
        d = shape[-1]
        W, mu = ref.whitening_matrix(_correlated(rng, 50, d), method, 0.01)
        X = _correlated(rng, int(np.prod(shape[:-1])), d).reshape(shape)
        cases.append(Case(f"X of shape {shape}{note}, W and mu from {method.upper()} whitening of another batch",
                          {"X": X, "W": W, "mu": mu}))
    W, mu = ref.whitening_matrix(_correlated(rng, 50, 4), "pca", 1e-5)
    cases.append(Case("X 16 x 4 float32, W = the top 2 rows of a PCA whitening (2 x 4: a reduction to 2-D)",
                      {"X": _correlated(rng, 16, 4, np.float32), "W": W[:2], "mu": mu, "rtol": 1e-4, "atol": 1e-5}))
    return cases


def check_whiten(whiten, hidden=False):
    """Check whiten(X, W, mu) -> (X - mu) @ W.T for X (..., d)."""
    __tracebackhide__ = True
    report_pass("whiten", run_check("whiten", whiten, ref.whiten, _whiten_cases(hidden), _run_whiten,
                                    WHITEN_CATALOGUE, rtol=1e-7, atol=1e-9, hidden=hidden))


def _bn_input(rng, shape, dtype=np.float64, spread=None):
    """x with channels on axis 1, each of its own mean and spread."""
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    scale = rng.uniform(0.3, 3, size=c) if spread is None else np.full(c, spread)
    return (rng.normal(size=shape) * scale.reshape(bshape) + rng.uniform(-3, 3, size=c).reshape(bshape)).astype(dtype)


def _identity_cases(hidden: bool):
    rng = case_rng(hidden, 2)
    cases = [Case("x 16 x 4 float64, default eps", {"x": _bn_input(rng, (16, 4)), "eps": None}),
             Case("x 2 x 3 (a batch of 2), eps=0.1", {"x": _bn_input(rng, (2, 3)), "eps": 0.1}),
             Case("x 20 x 3 with a tiny spread (std 0.003), default eps",
                  {"x": _bn_input(rng, (20, 3), spread=0.003), "eps": None})]
    x = _bn_input(rng, (10, 3))
    x[:, 1] = 2.5
    cases.append(Case("x 10 x 3 whose 2nd feature is constant, eps=1e-3", {"x": x, "eps": 1e-3}))
    cases.append(Case("x of shape (4, 3, 5, 5) (N, C, H, W), eps=0.01", {"x": _bn_input(rng, (4, 3, 5, 5)), "eps": 0.01}))
    cases.append(Case("x of shape (2, 3, 2, 3, 4) (N, C, D, H, W), eps=0.05",
                      {"x": _bn_input(rng, (2, 3, 2, 3, 4)), "eps": 0.05}))
    cases.append(Case("x 32 x 5 float32, default eps", {"x": _bn_input(rng, (32, 5), np.float32), "eps": None,
                                                          "rtol": 1e-5, "atol": 1e-6}))
    if hidden:
        cases.append(Case("x of shape (2, 4, 3) (N, C, L), eps=0.5", {"x": _bn_input(rng, (2, 4, 3)), "eps": 0.5}))
        cases.append(Case("x 64 x 6, eps=1e-4", {"x": _bn_input(rng, (64, 6)), "eps": 1e-4}))
        cases.append(Case("x of shape (3, 2, 2, 2, 2) (N, C, D, H, W), eps=1e-3",
                          {"x": _bn_input(rng, (3, 2, 2, 2, 2)), "eps": 1e-3}))
    return cases


def check_bn_identity_parameters(bn_identity_parameters, hidden=False):
    """Check bn_identity_parameters(x, eps=1e-5) -> (gamma, beta), per channel (axis 1)."""
    __tracebackhide__ = True
    report_pass("bn_identity_parameters", run_check(
        "bn_identity_parameters", bn_identity_parameters, ref.bn_identity_parameters, _identity_cases(hidden),
        _run_identity, IDENTITY_CATALOGUE, rtol=1e-9, atol=1e-12, hidden=hidden))


def _drift_cases(hidden: bool):
    rng = case_rng(hidden, 3)

    def case(m, d, lr, steps, inside, target=None, dtype=np.float64, note=""):
        t = "" if target is None else f", target of shape {np.shape(target)}" if np.ndim(target) else f", target={target:g}"
        return Case(f"u {m} x {d} {np.dtype(dtype).name}{note}, lr={lr:g}, steps={steps}, inside={inside}{t}",
                    {"u": _bn_input(rng, (m, d), dtype), "b0": rng.normal(size=d), "lr": lr, "steps": steps,
                     "inside": inside, "target": target})

    cases = [case(8, 2, 0.1, 20, False), case(8, 2, 0.1, 20, True),
             case(2, 3, 0.5, 5, False, rng.normal(size=3), note=" (a batch of 2)"),
             case(6, 1, 0.05, 10, True, rng.normal(size=(6, 1))),
             case(10, 2, 1.0, 7, False, rng.normal(size=(10, 2))),
             case(16, 3, 0.2, 0, False, -0.5),
             case(12, 3, 0.3, 4, True, 2.0, np.float32)]
    if hidden:
        cases += [case(5, 4, 0.7, 12, False, rng.normal(size=4)), case(3, 2, 0.01, 30, True, rng.normal(size=(3, 2)))]
    return cases


def check_bias_drift(bias_drift, hidden=False):
    """Check bias_drift(u, b0, lr, steps, inside, target=1.0) -> (b_history, loss_history)."""
    __tracebackhide__ = True
    # float32 u: the loss is computed from float32 data by some learners, in float64 by others
    report_pass("bias_drift", run_check("bias_drift", bias_drift, ref.bias_drift, _drift_cases(hidden), _run_drift,
                                        BIAS_DRIFT_CATALOGUE, rtol=1e-6, atol=1e-9, hidden=hidden))


def _experiment_cases(hidden: bool):
    """One case each (the experiment is the slowest check): the notebook's own run (seed 0, the
    defaults) for the visible check; every parameter changed, and a seed drawn from the
    course's secret, for the hidden one."""
    if hidden:
        return [Case("a hidden seed, steps=60, lr=0.3, dims=(16, 256), m=200",
                     {"seed": hidden_seed(40), "steps": 60, "lr": 0.3, "dims": (16, 256), "m": 200})]
    return [Case("seed=0, the defaults", {"seed": 0, "steps": None, "lr": None, "dims": None, "m": None})]


def check_whitening_experiment(whitening_experiment, hidden=False):
    """Check whitening_experiment(seed, steps=100, lr=0.5, dims=(16, 64, 256), m=256) -> dict: the
    phenomena it must show (with wide margins) and b after the last step (exactly)."""
    __tracebackhide__ = True
    report_pass("whitening_experiment", run_check(
        "whitening_experiment", whitening_experiment, ref.whitening_experiment, _experiment_cases(hidden),
        _run_experiment, EXPERIMENT_CATALOGUE, rtol=1e-6, atol=1e-9, hidden=hidden))


def _spd_with_eigenvalues(rng, lam):
    """Q diag(lam) Q^T for a random rotation Q."""
    q, _ = np.linalg.qr(rng.normal(size=(len(lam), len(lam))))
    return (q * np.asarray(lam, dtype=np.float64)) @ q.T


def _symmetric(rng, d):
    a = rng.normal(size=(d, d))
    return (a + a.T) / 2


def _derivative_cases(hidden: bool):
    rng = case_rng(hidden, 5)
    specs = [("", [4.0, 2.0, 1.0, 0.25]), ("", [9.0, 3.0, 0.5]),
             (" with two equal eigenvalues (2, 2)", [5.0, 2.0, 2.0, 0.5]),
             (" with two eigenvalues 1e-9 apart", [3.0, 1.0 + 1e-9, 1.0, 0.2]),
             ("", rng.uniform(0.1, 5.0, size=6))]
    if hidden:
        specs += [(" with three equal eigenvalues", [1.5, 1.5, 1.5, 4.0, 0.3]),
                  ("", rng.uniform(0.05, 10.0, size=8))]
    cases = []
    for note, lam in specs:
        lam = np.asarray(lam, dtype=np.float64)
        cases.append(Case(f"sigma {len(lam)} x {len(lam)}{note}, a random symmetric d_sigma",
                          {"sigma": _spd_with_eigenvalues(rng, lam), "d_sigma": _symmetric(rng, len(lam))}))
    return cases


def check_zca_derivative(zca_derivative, hidden=False):
    """Check zca_derivative(sigma, d_sigma) -> dW, the first-order change of sigma^(-1/2)."""
    __tracebackhide__ = True
    report_pass("zca_derivative", run_check(
        "zca_derivative", zca_derivative, ref.zca_derivative, _derivative_cases(hidden), _run_zca_derivative,
        ZCA_DERIVATIVE_CATALOGUE, rtol=1e-7, atol=1e-10, hidden=hidden))
