"""Chapter 3 - whitening versus batch normalization: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's function, runs it and the reference
(``bn_reference.whitening``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more shapes).

The ``_run_*`` functions are the only code that touches the learner's function
(the class grader runs them in its sandbox): they pass the case's arrays to it
unchanged and return plain data. PCA whitening is defined only up to the sign
of each row, so ``_run_whitening`` compares PCA rows after making each row's
largest-magnitude entry positive: every valid sign passes. The order of the
rows (descending eigenvalues) is fixed.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from .. import whitening as ref
from . import Case, CheckFailed, Misconception, report_pass, run_check

__all__ = [
    "check_whitening_matrix",
    "check_whiten",
    "check_bn_identity_parameters",
    "check_bias_drift",
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


def _whitening(X, method="zca", eps=1e-5, bug=None):
    """whitening_matrix with one switchable mistake; bug=None is right. Returns (W, mu)."""
    X = np.asarray(X, dtype=np.float64)
    m, d = X.shape
    mu = X.mean(axis=0)
    Xc = X if bug == "uncentred" else X - mu
    S = Xc.T @ Xc / (m - 1 if bug == "unbiased" else m)
    if bug == "standardize":
        return np.diag(1.0 / np.sqrt(np.diag(S) + eps)), mu
    if bug in ("eps_after_sqrt", "no_eps"):
        S_eps = S
    elif bug == "eps_everywhere":
        S_eps = S + eps
    else:
        S_eps = S + eps * np.eye(d)
    if method == "cholesky":
        L = np.linalg.cholesky(S_eps)
        W = np.linalg.inv(L + eps * np.eye(d) if bug == "eps_after_sqrt" else L)
        return (W.T if bug == "transposed" else W), mu
    if method == "zca" and bug == "elementwise":
        return S_eps ** -0.5, mu
    if method != "cholesky" and bug == "reduced_svd":   # min(m, d) directions only
        _, s, Vt = np.linalg.svd(Xc / np.sqrt(m), full_matrices=False)
        W = Vt / np.sqrt(s ** 2 + eps)[:, None]
        return (Vt.T @ W if method == "zca" else _largest_entry_positive(W)), mu
    lam, U = np.linalg.eigh(S_eps)                      # ascending
    if bug != "ascending":
        lam, U = lam[::-1], U[:, ::-1]
    if bug == "rows":
        U = U.T
    scale = lam if bug == "inverse" else (np.sqrt(lam) + eps if bug == "eps_after_sqrt" else np.sqrt(lam))
    W = U.T / scale[:, None]                            # the PCA rows
    if method == "zca" and bug != "pca_for_zca":
        W = U @ W
    else:
        W = _largest_entry_positive(W)
    return (W.T if bug == "transposed" else W), mu


WHITENING_CATALOGUE = [
    Misconception(
        "per-feature standardization returned as whitening (the correlations are kept)",
        "dividing each feature by its own standard deviation, W = diag(1 / sqrt(var + eps)), is what BN does; "
        "it leaves the off-diagonal covariances in place. Whitening uses the whole covariance matrix: "
        "W = Sigma_eps^(-1/2) (ZCA), Lambda^(-1/2) U^T (PCA) or L^(-1) (Cholesky).",
        partial(_whitening, bug="standardize")),
    Misconception(
        "the mean not subtracted (the covariance is computed from X instead of X - mu)",
        "center first: Xc = X - X.mean(axis=0), then Sigma = Xc.T @ Xc / m. X.T @ X / m is the second "
        "moment, not the covariance, unless the mean is 0.",
        partial(_whitening, bug="uncentred")),
    Misconception(
        "the unbiased (m - 1) covariance instead of the biased one (m)",
        "this notebook divides by m, as BN's Algorithm 1 does for the variance: Sigma = Xc.T @ Xc / m "
        "(np.cov(X, rowvar=False, bias=True)). np.cov's default divides by m - 1.",
        partial(_whitening, bug="unbiased")),
    Misconception(
        "eps added after the square root (to sqrt(lambda) or to the Cholesky factor) instead of to Sigma",
        "add eps to the covariance's diagonal first, Sigma_eps = Sigma + eps * I, then take the eigenvalues "
        "(or the Cholesky factor) of Sigma_eps - as BN uses sqrt(var + eps), not sqrt(var) + eps.",
        partial(_whitening, bug="eps_after_sqrt")),
    Misconception(
        "eps added to every entry of Sigma (Sigma + eps) instead of to its diagonal (Sigma + eps * I)",
        "NumPy broadcasts a number to every entry: write Sigma + eps * np.eye(d) to add it to the "
        "variances only.",
        partial(_whitening, bug="eps_everywhere")),
    Misconception(
        "eps not used (W computed from Sigma itself)",
        "add eps * I to the covariance before the eigen-decomposition or the Cholesky factorization: it "
        "keeps W finite when the covariance is singular (m <= d, a constant feature).",
        partial(_whitening, bug="no_eps")),
    Misconception(
        "W transposed (the whitened data are (X - mu) @ W, not (X - mu) @ W.T)",
        "return W with one row per output coordinate, so that W @ Sigma_eps @ W.T = I: for PCA the rows "
        "are the eigenvectors, Lambda^(-1/2) U^T; for Cholesky W = L^(-1) with Sigma_eps = L @ L.T and L "
        "lower triangular (np.linalg.cholesky returns L; scipy.linalg.cholesky returns L.T unless lower=True).",
        partial(_whitening, bug="transposed")),
    Misconception(
        "PCA whitening returned where ZCA was asked (W is not symmetric)",
        "ZCA rotates back after scaling: W = U @ diag(lambda^(-1/2)) @ U.T, which is symmetric and equals "
        "Sigma_eps^(-1/2). diag(lambda^(-1/2)) @ U.T alone is PCA whitening.",
        partial(_whitening, bug="pca_for_zca")),
    Misconception(
        "eigenvalues in ascending order (np.linalg.eigh's order) for PCA",
        "np.linalg.eigh returns the eigenvalues in ascending order: reverse them and the eigenvector "
        "columns, lam[::-1] and U[:, ::-1], so that the first row of W belongs to the largest eigenvalue.",
        partial(_whitening, bug="ascending")),
    Misconception(
        "eigenvectors taken from the rows of U instead of its columns",
        "np.linalg.eigh(S) returns U with the eigenvectors as columns, U[:, k]; the PCA matrix has them as "
        "rows, U.T.",
        partial(_whitening, bug="rows")),
    Misconception(
        "Sigma ** -0.5 taken entry by entry (NumPy's ** is not a matrix power)",
        "the matrix inverse square root is U @ diag(lambda^(-1/2)) @ U.T from np.linalg.eigh; "
        "Sigma ** -0.5 raises each entry to the power -0.5 (nan for negative covariances).",
        partial(_whitening, bug="elementwise")),
    Misconception(
        "the directions the batch does not span are dropped (a reduced SVD of the centred data when m <= d)",
        "with m <= d examples the centred data span at most m - 1 directions, but W must act on all d: the "
        "others have variance 0, so Sigma_eps = Sigma + eps * I gives them 1 / sqrt(eps). Decompose the d x d "
        "matrix Sigma + eps * I with np.linalg.eigh (or use np.linalg.svd(..., full_matrices=True)).",
        partial(_whitening, bug="reduced_svd")),
    Misconception(
        "the inverse covariance (lambda^-1) used instead of its inverse square root (lambda^-1/2)",
        "whitening divides each eigen-direction by its standard deviation sqrt(lambda), not by its "
        "variance: W = diag(lambda^(-1/2)) @ U.T (PCA), so that W @ Sigma_eps @ W.T = I.",
        partial(_whitening, bug="inverse")),
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
    axes = 0 if bug == "per_activation" else (0, *range(2, x.ndim))
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
        "BN divides by sqrt(var + eps), so undoing it needs gamma = sqrt(var + eps). The paper's "
        "gamma = sqrt(Var[x]) (Sec. 3) leaves out eps; it is exact only when eps = 0.",
        partial(_identity, bug="no_eps")),
    Misconception(
        "the unbiased (N - 1) variance instead of the batch's biased variance",
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
        "statistics per activation instead of per channel for 4-D input",
        "for (N, C, H, W) input BN has one gamma and one beta per channel, and the statistics run over "
        "N, H and W together (axis=(0, 2, 3)), Sec. 3.2 of the paper.",
        partial(_identity, bug="per_activation")),
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

CATALOGUE = {
    "whitening_matrix": WHITENING_CATALOGUE,
    "whiten": WHITEN_CATALOGUE,
    "bn_identity_parameters": IDENTITY_CATALOGUE,
    "bias_drift": BIAS_DRIFT_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible seeds are 0..; hidden seeds start at 1000 and add shapes.

_F32 = {"rtol": 1e-4, "atol": 1e-5}  # float32 resolves about 1e-7; whitening amplifies it by sqrt(kappa)


def _correlated(rng, m, d, dtype=np.float64):
    """m examples of d correlated features: N(0, 1) rows mixed by a random rotation with scales in
    [0.5, 3] (distinct eigenvalues, condition number below 36), shifted by means in [-3, 3]."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = q * rng.uniform(0.5, 3.0, size=d)
    return (rng.normal(size=(m, d)) @ mix.T + rng.uniform(-3, 3, size=d)).astype(dtype)


def _whitening_case(label, X, method=None, eps=None, **tol):
    args = "the defaults" if method is None else f"method={method!r}" + ("" if eps is None else f", eps={eps:g}")
    return Case(f"X {' x '.join(map(str, X.shape))} {X.dtype.name}{label}, {args}",
                {"X": X, "method": method, "eps": eps, **tol})


def _whitening_cases(hidden: bool):
    rng = np.random.default_rng(1000 if hidden else 0)
    X = _correlated(rng, 40 if hidden else 30, 3 if hidden else 4)
    cases = [_whitening_case("", X, method, 0.05) for method in ("zca", "pca", "cholesky")]
    cases.append(_whitening_case("", _correlated(rng, 50, 3), None))
    cases.append(_whitening_case(" (a batch of 2: the covariance has rank 1)", _correlated(rng, 2, 2), "pca", 1e-3))
    X = _correlated(rng, 12, 3)
    X[:, 1] = 2.5  # a constant feature: its variance is exactly 0
    cases.append(_whitening_case(" whose 2nd feature is constant", X, "cholesky", 1e-3))
    cases.append(_whitening_case(" (m < d: the covariance is singular)", _correlated(rng, 5, 8), "zca", 0.1))
    cases.append(_whitening_case("", _correlated(rng, 40, 5, np.float32), "pca", None, **_F32))
    cases.append(_whitening_case(" (one feature: every whitening is BN's x_hat)", _correlated(rng, 20, 1),
                                 "cholesky", 0.5))
    if hidden:
        cases.append(_whitening_case("", _correlated(rng, 100, 6), "pca", 0.2))
        cases.append(_whitening_case(" (a batch of 2)", _correlated(rng, 2, 3), "zca", 1e-2))
        cases.append(_whitening_case(" (m < d)", _correlated(rng, 3, 6), "cholesky", 0.3))
        cases.append(_whitening_case("", _correlated(rng, 64, 8, np.float32), "zca", 1e-3, **_F32))
    return cases


def _as_float_array(x):
    """x as a float64 array when it is numeric (lists, tensors, arrays), else x unchanged."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return x


def _pair(result, what):
    """The two parts of a returned pair, or a CheckFailed that says what came back."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        size = f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""
        raise CheckFailed(f"{what}, got a {type(result).__name__}{size}.")
    return [_as_float_array(r) for r in result]


def _run_whitening(fn, case):
    d = case.data
    args = [d["X"]] + ([] if d["method"] is None else [d["method"]]) + ([] if d["eps"] is None else [d["eps"]])
    W, mu = _pair(fn(*args), "whitening_matrix must return a pair (W, mu)")
    if d["method"] == "pca" and isinstance(W, np.ndarray) and W.ndim == 2 and W.size:
        W = _largest_entry_positive(W)  # every valid sign of a PCA row passes
    return {"W": W, "mu": mu}


def check_whitening_matrix(whitening_matrix, hidden=False):
    """Check whitening_matrix(X, method="zca", eps=1e-5) -> (W, mu) for PCA (rows up to sign),
    ZCA and Cholesky whitening."""
    __tracebackhide__ = True
    report_pass("whitening_matrix", run_check(
        "whitening_matrix", whitening_matrix, ref.whitening_matrix, _whitening_cases(hidden), _run_whitening,
        WHITENING_CATALOGUE, rtol=1e-6, atol=1e-9, hidden=hidden))


def _whiten_cases(hidden: bool):
    """New data X and a (W, mu) fitted on another batch, so mu is not X's own mean."""
    rng = np.random.default_rng(1001 if hidden else 1)
    cases = []
    specs = [("zca", (20, 3), ""), ("pca", (20, 3), ""), ("cholesky", (2, 3, 4, 3),
             " (a (N, H, W, C) map: features last)"), ("pca", (2, 4), " (a batch of 2)")]
    if hidden:
        specs += [("cholesky", (7, 5), ""), ("zca", (3, 2, 2), " (3-D)")]
    for method, shape, note in specs:
        d = shape[-1]
        W, mu = _whitening(_correlated(rng, 50, d), method, 0.01)
        X = _correlated(rng, int(np.prod(shape[:-1])), d).reshape(shape)
        cases.append(Case(f"X of shape {shape}{note}, W and mu from {method.upper()} whitening of another batch",
                          {"X": X, "W": W, "mu": mu}))
    W, mu = _whitening(_correlated(rng, 50, 4), "pca", 1e-5)
    cases.append(Case("X 16 x 4 float32, W = the top 2 rows of a PCA whitening (2 x 4: a reduction to 2-D)",
                      {"X": _correlated(rng, 16, 4, np.float32), "W": W[:2], "mu": mu, **_F32}))
    return cases


def _run_whiten(fn, case):
    d = case.data
    return {"whitened": _as_float_array(fn(d["X"], d["W"], d["mu"]))}


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
    rng = np.random.default_rng(1002 if hidden else 2)
    cases = [Case("x 16 x 4 float64, default eps", {"x": _bn_input(rng, (16, 4)), "eps": None}),
             Case("x 2 x 3 (a batch of 2), eps=0.1", {"x": _bn_input(rng, (2, 3)), "eps": 0.1}),
             Case("x 20 x 3 with a tiny spread (std 0.003), default eps",
                  {"x": _bn_input(rng, (20, 3), spread=0.003), "eps": None})]
    x = _bn_input(rng, (10, 3))
    x[:, 1] = 2.5
    cases.append(Case("x 10 x 3 whose 2nd feature is constant, eps=1e-3", {"x": x, "eps": 1e-3}))
    cases.append(Case("x of shape (4, 3, 5, 5) (N, C, H, W), eps=0.01", {"x": _bn_input(rng, (4, 3, 5, 5)), "eps": 0.01}))
    cases.append(Case("x 32 x 5 float32, default eps", {"x": _bn_input(rng, (32, 5), np.float32), "eps": None,
                                                          "rtol": 1e-5, "atol": 1e-6}))
    if hidden:
        cases.append(Case("x of shape (2, 4, 3) (N, C, L), eps=0.5", {"x": _bn_input(rng, (2, 4, 3)), "eps": 0.5}))
        cases.append(Case("x 64 x 6, eps=1e-4", {"x": _bn_input(rng, (64, 6)), "eps": 1e-4}))
    return cases


def _run_identity(fn, case):
    d = case.data
    result = fn(d["x"]) if d["eps"] is None else fn(d["x"], d["eps"])
    gamma, beta = _pair(result, "bn_identity_parameters must return a pair (gamma, beta)")
    return {"gamma": gamma, "beta": beta}


def check_bn_identity_parameters(bn_identity_parameters, hidden=False):
    """Check bn_identity_parameters(x, eps=1e-5) -> (gamma, beta), per channel (axis 1)."""
    __tracebackhide__ = True
    report_pass("bn_identity_parameters", run_check(
        "bn_identity_parameters", bn_identity_parameters, ref.bn_identity_parameters, _identity_cases(hidden),
        _run_identity, IDENTITY_CATALOGUE, rtol=1e-9, atol=1e-12, hidden=hidden))


def _drift_cases(hidden: bool):
    rng = np.random.default_rng(1003 if hidden else 3)

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


def _run_drift(fn, case):
    d = case.data
    args = [d["u"], d["b0"], d["lr"], d["steps"], d["inside"]] + ([] if d["target"] is None else [d["target"]])
    b, loss = _pair(fn(*args), "bias_drift must return a pair (b_history, loss_history)")
    return {"b_history": b, "loss_history": loss}


def check_bias_drift(bias_drift, hidden=False):
    """Check bias_drift(u, b0, lr, steps, inside, target=1.0) -> (b_history, loss_history)."""
    __tracebackhide__ = True
    # float32 u: the loss is computed from float32 data by some learners, in float64 by others
    report_pass("bias_drift", run_check("bias_drift", bias_drift, ref.bias_drift, _drift_cases(hidden), _run_drift,
                                        BIAS_DRIFT_CATALOGUE, rtol=1e-6, atol=1e-9, hidden=hidden))
