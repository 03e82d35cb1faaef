"""Chapter 3 - whitening versus batch normalization: the reference against its
oracles (SciPy's matrix square root and power, Sylvester solver and Cholesky,
scikit-learn's PCA and StandardScaler, NumPy's Cholesky, PyTorch's batch norm
and autograd, numerical integration and differentiation, Kessy et al.'s
characterization of whitening, the closed form of the drift), the experiment's
margins on several seeds, and the grading checks against the misconception
catalogue."""

import functools
import pickle

import matplotlib
import nbformat
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.special
import sklearn.decomposition
import sklearn.preprocessing
import torch
import torch.nn.functional as F

import alt_ch3_whitening as alt
import bn_exercises.whitening as learner
from chapter_suite import CatalogueSuite, CycleSuite
from nbgrader_cycle import ROOT
from bn_reference import whitening as ref
from bn_reference.backprop import batchnorm_forward
from bn_reference.benchmarks import whitening as bench
from bn_reference.grading import INPUT_CHANGED, CheckFailed
from bn_reference.grading import whitening as grading

matplotlib.use("Agg")

SHAPES = [(50, 3), (200, 6), (9, 2), (30, 1)]


def _data(seed, shape, dtype=np.float64):
    """Correlated features with different scales and means (distinct eigenvalues)."""
    rng = np.random.default_rng(seed)
    m, d = shape
    mix = rng.normal(size=(d, d)) + 2 * np.eye(d)
    return (rng.normal(size=shape) @ mix.T * rng.uniform(0.5, 5, size=d) + rng.uniform(-5, 5, size=d)).astype(dtype)


def _biased_cov(X):
    return np.atleast_2d(np.cov(X, rowvar=False, bias=True))


# --- whitening matrices against their oracles --------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ref.METHODS)
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.3])
def test_whitened_covariance_is_the_identity_up_to_eps(shape, method, eps):
    """W Sigma W^T = I - eps W W^T, which is I for eps = 0 (np.cov as the oracle of Sigma)."""
    X = _data(sum(shape), shape)
    W, mu = ref.whitening_matrix(X, method, eps)
    C = _biased_cov(ref.whiten(X, W, mu))
    np.testing.assert_allclose(C, np.eye(shape[1]) - eps * W @ W.T, atol=1e-10)
    np.testing.assert_allclose(mu, X.mean(axis=0), rtol=1e-12)
    assert W.shape == (shape[1],) * 2 and W.dtype == mu.dtype == np.float64


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_zca_is_scipys_inverse_matrix_square_root(shape, eps):
    X = _data(10 + sum(shape), shape)
    S = _biased_cov(X) + eps * np.eye(shape[1])
    W = ref.whitening_matrix(X, "zca", eps)[0]
    np.testing.assert_allclose(W, scipy.linalg.fractional_matrix_power(S, -0.5).real, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(W, np.linalg.inv(scipy.linalg.sqrtm(S).real), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(W, W.T) if shape[1] == 1 else np.testing.assert_allclose(W, W.T, atol=1e-14)


@pytest.mark.parametrize("shape", [(50, 3), (200, 6), (9, 2), (1000, 10)])
def test_pca_matches_sklearn_whitening_with_its_m_minus_1_convention(shape):
    """scikit-learn's PCA(whiten=True) divides by sqrt(explained_variance_), the m - 1 variance:
    its components over sqrt(explained_variance_ (m - 1) / m) are our rows, sign rule included."""
    X = _data(20 + sum(shape), shape)
    m = shape[0]
    sk = sklearn.decomposition.PCA(whiten=True).fit(X)
    W, mu = ref.whitening_matrix(X, "pca", eps=0.0)
    np.testing.assert_allclose(W, sk.components_ / np.sqrt(sk.explained_variance_ * (m - 1) / m)[:, None],
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ref.whiten(X, W, mu), sk.transform(X) * np.sqrt(m / (m - 1)), rtol=1e-8, atol=1e-10)


def test_pca_rows_come_in_descending_eigenvalue_order_with_the_sign_rule():
    X = _data(5, (100, 5))
    W = ref.whitening_matrix(X, "pca", 1e-2)[0]
    variances = 1 / np.sum(W ** 2, axis=1)  # row k is u_k / sqrt(lambda_k)
    assert np.all(np.diff(variances) < 0)
    np.testing.assert_allclose(variances, np.linalg.eigvalsh(_biased_cov(X) + 1e-2 * np.eye(5))[::-1], rtol=1e-10)
    rows = np.arange(5)
    assert np.all(W[rows, np.argmax(np.abs(W), axis=1)] > 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_cholesky_is_the_inverse_of_numpys_lower_factor(shape):
    X = _data(30 + sum(shape), shape)
    W = ref.whitening_matrix(X, "cholesky", 1e-4)[0]
    L = np.linalg.cholesky(_biased_cov(X) + 1e-4 * np.eye(shape[1]))
    np.testing.assert_allclose(W, np.linalg.inv(L), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(np.triu(W, 1), 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_kessy_cholesky_is_the_transposed_cholesky_factor_of_the_precision_matrix(shape):
    """Kessy et al. (2018): W = L^T with L L^T = Sigma^-1 - SciPy's upper factor of inv(Sigma)
    (R's chol(solve(Sigma))) - upper triangular, whitening, and not the covariance Cholesky L^-1."""
    X = _data(35 + sum(shape), shape)
    S = _biased_cov(X) + 1e-4 * np.eye(shape[1])
    W, mu = ref.kessy_cholesky_matrix(X, 1e-4)
    np.testing.assert_allclose(W, scipy.linalg.cholesky(scipy.linalg.inv(S), lower=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(np.tril(W, -1), 0.0)
    np.testing.assert_allclose(W @ S @ W.T, np.eye(shape[1]), atol=1e-9)
    if shape[1] > 1:
        assert not np.allclose(W, ref.whitening_matrix(X, "cholesky", 1e-4)[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_every_whitening_is_an_orthogonal_matrix_times_zca_and_zca_moves_the_data_least(shape):
    """Kessy, Lewin & Strimmer (2018): W = Q Sigma^(-1/2) with Q orthogonal; ZCA (Q = I) minimizes
    the mean squared distance between the centred and the whitened data."""
    X = _data(40 + sum(shape), shape)
    d = shape[1]
    root = scipy.linalg.sqrtm(_biased_cov(X) + 1e-5 * np.eye(d)).real
    distances = {}
    for method in ref.METHODS:
        W, mu = ref.whitening_matrix(X, method)
        Q = W @ root
        np.testing.assert_allclose(Q @ Q.T, np.eye(d), atol=1e-9)
        distances[method] = np.mean(np.sum((X - mu - ref.whiten(X, W, mu)) ** 2, axis=1))
    Q = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    W_zca, mu = ref.whitening_matrix(X, "zca")
    random = np.mean(np.sum((X - mu - ref.whiten(X, Q @ W_zca, mu)) ** 2, axis=1))
    assert distances["zca"] <= min(distances["pca"], distances["cholesky"], random) + 1e-9


@pytest.mark.parametrize("method", ref.METHODS)
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_one_feature_whitening_is_batch_norms_x_hat(method, eps):
    X = _data(50, (40, 1))
    x_hat = batchnorm_forward(X, 1.0, 0.0, eps)[0]
    np.testing.assert_allclose(ref.whiten(X, *ref.whitening_matrix(X, method, eps)), x_hat, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_standardization_is_batch_norms_x_hat_and_keeps_the_correlations(shape, eps):
    X = _data(60 + sum(shape), shape)
    D, mu = ref.standardization_matrix(X, eps)
    Z = ref.whiten(X, D, mu)
    np.testing.assert_allclose(Z, batchnorm_forward(X, 1.0, 0.0, eps)[0], rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(ref.whiten(X, *ref.standardization_matrix(X, 0.0)),
                               sklearn.preprocessing.StandardScaler().fit_transform(X), rtol=1e-10, atol=1e-12)
    corr = np.corrcoef(X, rowvar=False)
    np.testing.assert_allclose(np.corrcoef(Z, rowvar=False), corr, atol=1e-12)


@pytest.mark.parametrize("m, d", [(16, 32), (5, 8), (2, 3), (4, 4)])
def test_a_batch_of_m_le_d_has_a_singular_covariance_that_eps_makes_invertible(m, d):
    X = _data(70 + m + d, (m, d))
    S, _ = ref.covariance(X)
    assert np.linalg.matrix_rank(S) == m - 1
    for method in ("zca", "cholesky"):
        W, mu = ref.whitening_matrix(X, method, 1e-3)
        assert np.isfinite(W).all()
        eigenvalues = np.linalg.eigvalsh(_biased_cov(ref.whiten(X, W, mu)))
        assert np.sum(eigenvalues > 0.5) == m - 1 and np.sum(np.abs(eigenvalues) < 1e-6) == d - m + 1
    W = ref.whitening_matrix(X, "zca", 1e-4)[0]
    np.testing.assert_allclose(np.linalg.eigvalsh(W).max(), 1 / np.sqrt(1e-4), rtol=1e-6)  # the unseen directions
    with pytest.raises(ValueError, match=r"singular \(rank .* use eps > 0"):
        ref.whitening_matrix(X, "zca", eps=0.0)


def test_a_constant_feature_is_handled_by_eps():
    X = _data(80, (12, 3))
    X[:, 1] = 2.5
    for method in ref.METHODS:
        W, mu = ref.whitening_matrix(X, method, 1e-3)
        Z = ref.whiten(X, W, mu)
        assert np.isfinite(Z).all()
        np.testing.assert_allclose(_biased_cov(Z), np.eye(3) - 1e-3 * W @ W.T, atol=1e-10)


def test_float32_input_is_whitened_in_float64():
    X = _data(85, (60, 4), np.float32)
    W, mu = ref.whitening_matrix(X, "zca")
    W64, mu64 = ref.whitening_matrix(X.astype(np.float64), "zca")
    np.testing.assert_array_equal(W, W64)
    np.testing.assert_array_equal(mu, mu64)


# --- whiten ------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(20, 3), (2, 3, 4, 3), (3, 2, 3), (3,)])
def test_whiten_applies_w_to_the_last_axis_with_the_given_mean(shape):
    rng = np.random.default_rng(90)
    W, mu = ref.whitening_matrix(_data(91, (50, 3)), "pca", 0.01)
    X = rng.normal(size=shape) * 3 + 1
    expected = np.einsum("kj,...j->...k", W, X - mu)
    np.testing.assert_allclose(ref.whiten(X, W, mu), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.whiten(X, W[:2], mu), expected[..., :2], rtol=1e-12, atol=1e-12)


# --- bn_identity_parameters against PyTorch's batch norm --------------------------

@pytest.mark.parametrize("shape", [(16, 4), (2, 3), (4, 3, 5, 5), (2, 4, 3), (1, 2, 3, 3)])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_identity_parameters_make_torch_batch_norm_return_its_input(shape, eps):
    rng = np.random.default_rng(100 + sum(shape))
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    x = rng.normal(size=shape) * rng.uniform(0.01, 3, size=bshape) + rng.uniform(-3, 3, size=bshape)
    gamma, beta = ref.bn_identity_parameters(x, eps)
    assert gamma.shape == beta.shape == (c,)
    y = F.batch_norm(torch.tensor(x), None, None, torch.tensor(gamma), torch.tensor(beta), training=True, eps=eps)
    np.testing.assert_allclose(y.numpy(), x, rtol=1e-12, atol=1e-12)


def test_identity_parameters_make_the_course_bn_forward_return_its_input_and_the_papers_formula_does_not():
    rng = np.random.default_rng(110)
    x = rng.normal(size=(256, 3)) * np.sqrt([1.0, 1e-2, 1e-4]) + [0.5, -1.0, 2.0]
    y, _ = batchnorm_forward(x, *ref.bn_identity_parameters(x))
    np.testing.assert_allclose(y, x, rtol=1e-13, atol=1e-14)
    y_paper, _ = batchnorm_forward(x, x.std(axis=0), x.mean(axis=0))  # gamma = sqrt(Var[x]), Sec. 3
    relative = np.abs(y_paper - x).max(axis=0) / np.abs(x - x.mean(axis=0)).max(axis=0)
    np.testing.assert_allclose(relative, 1 - np.sqrt(x.var(axis=0) / (x.var(axis=0) + 1e-5)), rtol=1e-6)
    assert relative[2] > 0.04  # eps / (2 var) = 5% for var = 1e-4


# --- bias_drift against PyTorch autograd and the closed form -----------------------

def _torch_drift(u, b0, lr, steps, inside, target):
    """The same simulation with autograd; E[x] detached when the normalization is outside."""
    u_t, t = torch.tensor(u, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=True)
    bs, losses = [], []
    for k in range(steps + 1):
        x = u_t + b
        mean = x.mean(dim=0) if inside else x.mean(dim=0).detach()
        loss = 0.5 * ((x - mean - t) ** 2).sum() / len(u)
        bs.append(b.detach().clone().numpy())
        losses.append(loss.item())
        if k < steps:
            (grad,) = torch.autograd.grad(loss, b)
            b = (b - lr * grad).detach().requires_grad_()
    return np.array(bs), np.array(losses)


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("m, d, target", [(8, 2, 1.0), (2, 3, [1.0, -2.0, 0.5]), (6, 1, "per-example")])
def test_bias_drift_matches_autograd(inside, m, d, target):
    rng = np.random.default_rng(120 + m + d)
    u, b0 = rng.normal(size=(m, d)) * 2 + 1, rng.normal(size=d)
    target = rng.normal(size=(m, d)) if isinstance(target, str) else np.asarray(target)
    ours = ref.bias_drift(u, b0, 0.3, 15, inside, target)
    theirs = _torch_drift(u, b0, 0.3, 15, inside, target)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_bias_drifts_linearly_outside_and_stays_inside_while_the_loss_never_moves():
    """Sec. 2: outside, b_k = b0 + k lr mean_i(t_i) and the loss is fixed; inside, dl/db = 0."""
    rng = np.random.default_rng(130)
    u, b0, t = rng.normal(size=(64, 3)), rng.normal(size=3), rng.normal(size=(64, 3)) + [1.0, -2.0, 0.5]
    bs, losses = ref.bias_drift(u, b0, 0.5, 200, False, t)
    np.testing.assert_allclose(bs, b0 + 0.5 * np.arange(201)[:, None] * t.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(losses, losses[0], rtol=1e-12)
    bs_in, losses_in = ref.bias_drift(u, b0, 0.5, 200, True, t)
    np.testing.assert_allclose(bs_in, np.broadcast_to(b0, bs_in.shape), atol=1e-12)
    np.testing.assert_allclose(losses_in, losses[0], rtol=1e-12)
    assert bs.shape == (201, 3) and losses.shape == (201,)
    b, loss = ref.bias_drift(u, b0, 0.5, 0, False)
    assert b.shape == (1, 3) and loss.shape == (1,)


# --- the sigmoid's linear region ------------------------------------------------

@pytest.mark.parametrize("a", [0.5, 1.0, 2.0, 3.0])
def test_sigmoid_tangent_gap_against_a_grid_and_the_normal_cdf(a):
    gap, share = ref.sigmoid_tangent_gap(a)
    z = np.linspace(-a, a, 200001)
    assert gap == pytest.approx(np.max(np.abs(1 / (1 + np.exp(-z)) - (0.5 + z / 4))), rel=1e-12)
    assert share == pytest.approx(scipy.integrate.quad(lambda s: np.exp(-s * s / 2) / np.sqrt(2 * np.pi), -a, a)[0],
                                  rel=1e-10)


@pytest.mark.parametrize("gamma, beta", [(1.0, 0.0), (3.0, 0.0), (8.0, 0.0), (1.0, 2.0), (0.1, -1.0)])
def test_sigmoid_linearity_against_adaptive_quadrature(gamma, beta):
    """R^2 = Cov[z, s]^2 / Var[s] with the expectations from scipy.integrate.quad."""
    def expect(f):
        return scipy.integrate.quad(lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -np.inf, np.inf,
                                    epsabs=1e-13, epsrel=1e-12)[0]
    s = lambda z: scipy.special.expit(gamma * z + beta)  # noqa: E731
    mean = expect(s)
    r2 = expect(lambda z: z * s(z)) ** 2 / expect(lambda z: (s(z) - mean) ** 2)
    assert ref.sigmoid_linearity(gamma, beta) == pytest.approx(r2, rel=1e-9)


# --- the PyTorch versions -----------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 4), (10, 3), (256, 16)])
def test_torch_whitening_and_bn_match_the_numpy_reference_and_pytorch(shape):
    X = _data(140 + sum(shape), shape)
    xt = torch.tensor(X)
    for method, fn in (("zca", ref.zca_whiten_torch), ("pca", ref.pca_whiten_torch)):
        expected = ref.whiten(X, *ref.whitening_matrix(X, method, 1e-3))
        np.testing.assert_allclose(fn(xt, 1e-3).numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ref.batchnorm_torch(xt, 1e-3).numpy(),
                               F.batch_norm(xt, None, None, training=True, eps=1e-3).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [ref.zca_whiten_torch, ref.pca_whiten_torch, ref.batchnorm_torch])
def test_torch_versions_pass_gradcheck_when_the_eigenvalues_are_distinct(fn):
    x = torch.tensor(_data(150, (12, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: fn(z, 1e-3), (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_pcas_gradient_grows_like_one_over_the_eigen_gap_and_zcas_does_not():
    rng = np.random.default_rng(160)
    white = rng.normal(size=(64, 4))
    white -= white.mean(axis=0)
    lam, U = np.linalg.eigh(_biased_cov(white))
    white = white @ U @ np.diag(lam ** -0.5) @ U.T
    dout = torch.tensor(rng.normal(size=(64, 4)))
    norms = {}
    for delta in (1e-2, 1e-4):
        x = torch.tensor(white * [1.0, np.sqrt(1 + delta), 0.5, 2.0], requires_grad=True)
        norms[delta] = [torch.autograd.grad(fn(x), x, dout)[0].norm().item()
                        for fn in (ref.pca_whiten_torch, ref.zca_whiten_torch)]
    assert norms[1e-4][0] / norms[1e-2][0] == pytest.approx(100, rel=0.05)
    assert norms[1e-4][1] == pytest.approx(norms[1e-2][1], rel=0.05)


# --- the experiment: the drift under a whitening outside the gradient, and the cost ------

def _drift_closed_form(seed, steps, lr):
    """Without beta z does not depend on b: b_k = k lr W^T t at a constant loss. With beta,
    beta_k = t (1 - (1 - lr)^k) and b_k = W^T t (1 - (1 - lr)^k)."""
    u, t = learner.drift_problem(seed)
    W, _ = ref.whitening_matrix(u)
    k = np.arange(steps + 1)[:, None]
    return k * lr * (W.T @ t), (1 - (1 - lr) ** k) * (W.T @ t)


def _torch_drift_under_whitening(seed, steps, lr, learn_beta):
    """The same training with autograd: W and mu computed from the current x, detached."""
    u, t = (torch.tensor(a) for a in learner.drift_problem(seed))
    b = torch.zeros(u.shape[1], dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(u.shape[1], dtype=torch.float64, requires_grad=True)
    bs = []
    for _ in range(steps + 1):
        x = u + b
        W, mu = (torch.tensor(a) for a in ref.whitening_matrix(x.detach().numpy()))
        loss = 0.5 * (((x - mu) @ W.T + beta - t) ** 2).sum() / len(u)
        bs.append(b.detach().clone().numpy())
        gb, gbeta = torch.autograd.grad(loss, (b, beta))
        b = (b - lr * gb).detach().requires_grad_()
        beta = (beta - lr * gbeta if learn_beta else beta).detach().requires_grad_()
    return np.array(bs)


@pytest.mark.parametrize("seed, steps, lr", [(0, 100, 0.5), (3, 40, 0.3)])
def test_the_experiments_drift_matches_autograd_and_the_closed_form(seed, steps, lr):
    result = ref.whitening_experiment(seed, steps=steps, lr=lr, dims=(4, 8), m=32)
    drift, settle = _drift_closed_form(seed, steps, lr)
    np.testing.assert_allclose(result["b"], drift, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["b_beta"], settle, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["b"], _torch_drift_under_whitening(seed, steps, lr, False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["b_beta"], _torch_drift_under_whitening(seed, steps, lr, True), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(result["loss"], result["loss"][0], rtol=1e-12)
    u, t = learner.drift_problem(seed)
    d = u.shape[1]  # the whitened data have covariance I - eps W W^T, trace about d
    assert result["loss"][0] == pytest.approx((d + t @ t) / 2, rel=1e-4)
    assert result["loss_beta"][-1] == pytest.approx(d / 2, rel=1e-4)
    assert result["d"] == [4, 8] and all(x > 0 for x in result["whitening_ms"] + result["standardization_ms"])


def _experiment_slack(result, seed, steps=100, lr=0.5):
    """Each phenomenon the check asserts, as (measured / threshold): above 1 means it holds."""
    b, loss, b_beta, loss_beta, W = (np.asarray(result[k]) for k in ("b", "loss", "b_beta", "loss_beta", "W"))
    t = learner.drift_problem(seed)[1]
    norm = np.linalg.norm
    ratio = np.asarray(result["whitening_ms"]) / np.asarray(result["standardization_ms"])

    def exact(a, b):  # the check allows 1e-6 of b's size
        return 1e-6 * np.abs(b).max() / max(np.abs(a - b).max(), 1e-300)

    return {
        "first step lr W^T t": exact(b[1] - b[0], lr * W.T @ t),
        "b drifts": norm(b[-1] - b[0]) / max(steps / 2 * norm(b[1] - b[0]), 1.0),
        "loss fixed": 1e-6 * abs(loss[0]) / max(np.abs(loss - loss[0]).max(), 1e-300),
        "b settles": (1e-3 * norm(b_beta[-1]) + 1e-9) / max(norm(b_beta[-1] - b_beta[steps // 2]), 1e-300),
        "loss falls": 0.9 * loss[-1] / loss_beta[-1],
        "b ratio": exact(b[-1], steps * lr / (1 - (1 - lr) ** steps) * b_beta[-1]),
        "ratio at the largest d": ratio[-1] / 10,
        "ratio grows": ratio[-1] / (4 * ratio[0]),
    }


@pytest.mark.parametrize("implementation", ["reference", "second implementation"])
def test_the_experiments_margins_hold_on_six_seeds(implementation):
    """The phenomena the check asserts hold, with room to spare, for both correct
    implementations on six seeds of each setting the check uses; the smallest slack is printed."""
    fn = ref.whitening_experiment if implementation == "reference" else alt.whitening_experiment
    slack = {}
    for seed in range(10, 16):
        for setting in ({}, {"steps": 60, "lr": 0.3, "dims": (16, 256), "m": 200}):
            result = fn(seed, **setting)
            kw = {k: setting[k] for k in ("steps", "lr") if k in setting}
            for name, value in _experiment_slack(result, seed, **kw).items():
                slack[name] = min(slack.get(name, np.inf), value)
    print(implementation, {k: float(f"{v:.3g}") for k, v in slack.items()})
    assert all(v > 1 for v in slack.values()), slack


def test_the_experiment_does_not_charge_a_wrong_whitening_again(monkeypatch, capsys):
    """An experiment built on a wrong whitening_matrix (the m - 1 covariance) still shows every
    phenomenon: the mistake costs its own task only."""
    def sample_covariance_zca(X, method="zca", eps=1e-5):
        X = np.asarray(X, dtype=np.float64)
        lam, U = np.linalg.eigh(np.cov(X, rowvar=False) + eps * np.eye(X.shape[1]))
        return (U / np.sqrt(lam)) @ U.T, X.mean(axis=0)
    monkeypatch.setattr(alt, "whitening_matrix", sample_covariance_zca)
    grading.check_whitening_experiment(alt.whitening_experiment)
    assert "agree" in capsys.readouterr().out


def test_cpu_time_pins_blas_and_refuses_what_it_cannot_call():
    from threadpoolctl import threadpool_info

    seen = []
    assert learner.cpu_time(lambda: seen.append([p["num_threads"] for p in threadpool_info()]), repeats=3) >= 0
    assert all(n == 1 for threads in seen for n in threads)
    with pytest.raises(TypeError, match="pass a function of no arguments"):
        learner.cpu_time(np.zeros(3))


def test_drift_problem_and_cost_data_are_seeded():
    u, t = learner.drift_problem(4)
    np.testing.assert_array_equal(u, learner.drift_problem(4)[0])
    assert u.shape == (128, 8) and t.shape == (8,) and not np.array_equal(u, learner.drift_problem(5)[0])
    np.testing.assert_array_equal(learner.cost_data(1, 16, 4), learner.cost_data(1, 16, 4))
    assert np.linalg.matrix_rank(learner.cost_data(1, 256, 64)) == 64


# --- the derivative of ZCA's matrix -------------------------------------------------

def _spd(seed, lam):
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(lam), len(lam))))[0]
    return (q * np.asarray(lam, dtype=np.float64)) @ q.T


@pytest.mark.parametrize("lam", [[4.0, 2.0, 1.0, 0.25], [9.0, 3.0, 0.5], [5.0, 2.0, 2.0, 0.5], [1.5, 1.5, 1.5],
                                 [3.0, 1.0 + 1e-9, 1.0, 0.2]])
def test_zca_derivative_matches_central_differences_and_the_sylvester_route(lam):
    rng = np.random.default_rng(len(lam))
    S, dS = _spd(7, lam), rng.normal(size=(len(lam),) * 2)
    dS = (dS + dS.T) / 2
    dW = ref.zca_derivative(S, dS)
    h = 1e-5
    power = scipy.linalg.fractional_matrix_power
    numeric = (power(S + h * dS, -0.5).real - power(S - h * dS, -0.5).real) / (2 * h)
    np.testing.assert_allclose(dW, numeric, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dW, alt.zca_derivative(S, dS), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dW, dW.T, atol=1e-12)


def test_zca_derivative_matches_torch_jvp_through_eigh():
    S = torch.tensor(_spd(8, [4.0, 2.0, 1.0, 0.3]))
    dS = torch.tensor(_spd(9, [1.0, -0.5, 0.2, 2.0]))

    def inverse_root(s):
        lam, U = torch.linalg.eigh(s)
        return (U * lam.rsqrt()) @ U.T

    _, jvp = torch.func.jvp(inverse_root, (S,), (dS,))
    np.testing.assert_allclose(ref.zca_derivative(S.numpy(), dS.numpy()), jvp.numpy(), rtol=1e-9, atol=1e-12)


def test_the_eigenvector_derivative_blows_up_as_two_eigenvalues_meet_and_zcas_does_not():
    """du_k grows like 1 / gap (checked against a central difference of the eigenvector); dW stays put."""
    dS = _spd(11, [1.0, 0.5, -0.3, 0.8])
    sizes = {}
    for gap in (1e-2, 1e-4):
        S = _spd(10, [4.0, 1.0 + gap, 1.0, 0.25])
        du = learner.eigenvector_derivative(S, dS, 1)
        h = gap * 1e-4
        vectors = [np.linalg.eigh(S + sign * h * dS)[1][:, ::-1][:, 1] for sign in (1, -1)]
        vectors = [v * np.sign(v @ np.linalg.eigh(S)[1][:, ::-1][:, 1]) for v in vectors]
        np.testing.assert_allclose(du, (vectors[0] - vectors[1]) / (2 * h), rtol=1e-3, atol=1e-6)
        sizes[gap] = (np.linalg.norm(du), np.linalg.norm(ref.zca_derivative(S, dS)))
    assert sizes[1e-4][0] / sizes[1e-2][0] == pytest.approx(100, rel=0.05)
    assert sizes[1e-4][1] == pytest.approx(sizes[1e-2][1], rel=0.05)


# --- bad input ---------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: ref.whitening_matrix(np.ones(5)), "2-D"),
    (lambda: ref.whitening_matrix(np.ones((1, 3))), "m >= 2"),
    (lambda: ref.whitening_matrix(np.array([["a", "b"], ["c", "d"]])), "real numbers"),
    (lambda: ref.whitening_matrix(_data(1, (10, 2)), "svd"), "method must be one of"),
    (lambda: ref.whitening_matrix(_data(1, (10, 2)), "zca", -1.0), "eps must be a number >= 0"),
    (lambda: ref.whitening_matrix(_data(1, (3, 5)), "cholesky", 0.0), "use eps > 0"),
    (lambda: ref.whitening_matrix(_data(1, (3, 5)) * 1e12, "zca", 1e-30), "use a larger eps"),
    (lambda: ref.kessy_cholesky_matrix(_data(1, (3, 5)), 0.0), "use eps > 0"),
    (lambda: ref.zca_derivative(np.eye(3), np.eye(2)), "square matrices of one shape"),
    (lambda: ref.zca_derivative(-np.eye(2), np.eye(2)), "positive definite"),
    (lambda: ref.whiten(np.ones((4, 3)), np.eye(2), np.zeros(2)), "features on the last axis"),
    (lambda: ref.whiten(np.ones((4, 3)), np.ones(3), np.zeros(3)), "W must be a 2-D"),
    (lambda: ref.whiten(np.ones((4, 3)), np.eye(3), np.zeros(2)), "mu must have shape"),
    (lambda: ref.bn_identity_parameters(np.ones(5)), "at least 2 values per channel"),
    (lambda: ref.bn_identity_parameters(np.ones((1, 3))), "at least 2 values per channel"),
    (lambda: ref.bn_identity_parameters(np.ones((4, 3)), eps=-1.0), "eps must be"),
    (lambda: ref.bias_drift(np.ones(4), np.zeros(1), 0.1, 3, False), "u must be 2-D"),
    (lambda: ref.bias_drift(np.ones((4, 2)), np.zeros(3), 0.1, 3, False), "b0 must have shape"),
    (lambda: ref.bias_drift(np.ones((4, 2)), np.zeros(2), 0.1, 3, False, np.ones(3)), "target must be"),
    (lambda: ref.bias_drift(np.ones((4, 2)), np.zeros(2), 0.1, -1, False), "steps must be"),
    (lambda: ref.sigmoid_tangent_gap(-1.0), "a must be >= 0"),
    (lambda: bench.run(dims=(4,), repeats=0), "repeats"),
    (lambda: bench.growth_exponent([{"d": 4, "seconds": {"BN forward": 1.0}}], "BN forward"), "at least two"),
])
def test_bad_input_is_rejected_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- grading: every check fails each catalogue entry with its own name -------------

class TestGrading(CatalogueSuite):
    checks = {
        "whitening_matrix": grading.check_whitening_matrix,
        "whiten": grading.check_whiten,
        "bn_identity_parameters": grading.check_bn_identity_parameters,
        "bias_drift": grading.check_bias_drift,
        "whitening_experiment": grading.check_whitening_experiment,
        "zca_derivative": grading.check_zca_derivative,
    }
    catalogue = grading.CATALOGUE
    alt = alt
    reference = ref
    learner = learner



def _signs(n, seed=0):
    return np.where(np.random.default_rng(seed).random(n) < 0.5, -1.0, 1.0)


@pytest.mark.parametrize("hidden", [False, True])
@pytest.mark.parametrize("side", ["grader", "learner"])
def test_any_sign_of_each_pca_row_and_any_basis_of_a_repeated_eigenvalue_passes(hidden, side, capsys):
    """PCA's W is fixed only up to the sign of each row and, for the d - m + 1 equal eigenvalues of
    a batch with m <= d, up to a rotation of their rows: every such choice passes."""
    def other_choice(X, method="zca", eps=1e-5):
        W, mu = alt.whitening_matrix(X, method, eps)
        if method != "pca":
            return W, mu
        lam = 1 / np.sum(W ** 2, axis=1)
        tied = np.flatnonzero(np.isclose(lam, lam.min(), rtol=1e-9))
        if len(tied) > 1:  # rotate the rows of the repeated eigenvalue among themselves
            Q = np.linalg.qr(np.random.default_rng(1).normal(size=(len(tied),) * 2))[0]
            W = W.copy()
            W[tied] = Q @ W[tied]
        return W * _signs(len(W))[:, None], mu
    if side == "learner" and hidden:
        pytest.skip("the learner package has no hidden cases")
    (grading if side == "grader" else learner).check_whitening_matrix(other_choice, hidden=hidden)
    assert "agree" in capsys.readouterr().out


def test_a_sign_flipped_zca_row_is_not_accepted():
    def flipped(X, method="zca", eps=1e-5):
        W, mu = alt.whitening_matrix(X, method, eps)
        return np.vstack([-W[:1], W[1:]]), mu
    with pytest.raises(CheckFailed, match=r"whitening_matrix is wrong on case: X 30 x 4 float64 \(covariance eigenvalues on both sides of eps\), method='zca'") as f:
        grading.check_whitening_matrix(flipped)
    assert f.value.misconception is None
    assert "W is symmetric positive definite: expected 'yes', got 'no'" in str(f.value)


@pytest.mark.parametrize("side", ["grader", "learner"])
def test_pca_mistakes_are_named_whatever_the_signs_of_the_rows(side):
    """'W transposed' and 'PCA returned for ZCA' name a learner whose rows have other signs than
    the reference's (the sign of an eigenvector from np.linalg.eigh is arbitrary)."""
    check = (grading if side == "grader" else learner).check_whitening_matrix

    def pca(X, eps):
        W, mu = alt.whitening_matrix(X, "pca", eps)
        return W * _signs(len(W), 3)[:, None], mu

    def transposed(X, method="zca", eps=1e-5):
        return (pca(X, eps)[0].T, pca(X, eps)[1]) if method == "pca" else alt.whitening_matrix(X, method, eps)

    def pca_for_zca(X, method="zca", eps=1e-5):
        return pca(X, eps) if method in ("pca", "zca") else alt.whitening_matrix(X, method, eps)

    for impl, name in ((transposed, "W transposed"), (pca_for_zca, "PCA whitening returned where ZCA")):
        with pytest.raises(CheckFailed) as failure:
            check(impl)
        assert failure.value.misconception.startswith(name)


def test_kessys_cholesky_convention_is_named():
    def kessy(X, method="zca", eps=1e-5):
        if method != "cholesky":
            return alt.whitening_matrix(X, method, eps)
        X = np.asarray(X, dtype=np.float64)
        S = np.cov(X, rowvar=False, bias=True).reshape(X.shape[1], -1) + eps * np.eye(X.shape[1])
        return scipy.linalg.cholesky(scipy.linalg.inv(S)), X.mean(axis=0)  # R's chol(solve(Sigma))
    with pytest.raises(CheckFailed, match="you computed Kessy et al.'s upper-triangular W") as failure:
        grading.check_whitening_matrix(kessy)
    assert failure.value.misconception.startswith("Kessy et al.'s Cholesky whitening")


def test_float32_arithmetic_fails_on_the_ill_conditioned_case():
    """The notebook's "work in float64" is enforced: ZCA computed in the input's dtype fails on the
    float32 case whose covariance has a condition number near 1e5."""
    def in_input_dtype(X, method="zca", eps=1e-5):
        X = np.asarray(X)
        if X.dtype == np.float64 or method != "zca":
            return alt.whitening_matrix(X, method, eps)
        centred = X - X.mean(axis=0)
        S = centred.T @ centred / len(X) + np.float32(eps) * np.eye(X.shape[1], dtype=np.float32)
        lam, U = np.linalg.eigh(S)
        return (U / np.sqrt(lam)) @ U.T, X.mean(axis=0)
    with pytest.raises(CheckFailed, match="condition number near 1e5") as failure:
        grading.check_whitening_matrix(in_input_dtype)
    assert "W @ W.T" in str(failure.value)


def test_a_nan_in_w_is_shown_where_it_is_not_spread_by_the_products():
    def one_nan(X, method="zca", eps=1e-5):
        W, mu = alt.whitening_matrix(X, method, eps)
        W = W.copy()
        W[0, 1] = np.nan
        return W, mu
    with pytest.raises(CheckFailed, match=r"entries of W that are nan or inf: expected 'none', got '\(0, 1\)'") as failure:
        grading.check_whitening_matrix(one_nan)
    assert failure.value.misconception is None


def test_hidden_cases_keep_their_labels_hidden():
    with pytest.raises(CheckFailed) as failure:
        grading.check_whitening_matrix(grading.WHITENING_CATALOGUE[2].impl, hidden=True)
    assert "hidden case 1 of" in str(failure.value) and "method=" not in str(failure.value)
    with pytest.raises(CheckFailed) as failure:
        grading.check_whitening_experiment(grading.EXPERIMENT_CATALOGUE[2].impl, hidden=True)
    assert "hidden case 1 of" in str(failure.value) and "seed" not in str(failure.value)


def test_structural_problems_are_named():
    with pytest.raises(CheckFailed, match=r"must return a pair \(W, mu\), got a ndarray"):
        grading.check_whitening_matrix(lambda X, method="zca", eps=1e-5: alt.whitening_matrix(X, method, eps)[0])
    with pytest.raises(CheckFailed, match=r"must return a pair \(gamma, beta\), got a tuple of length 3"):
        grading.check_bn_identity_parameters(lambda x, eps=1e-5: (*alt.bn_identity_parameters(x, eps), 0))
    with pytest.raises(CheckFailed, match=r"b_history: expected shape \(21, 2\), got shape \(21, 1, 2\)"):
        grading.check_bias_drift(lambda *a: (alt.bias_drift(*a)[0][:, None], alt.bias_drift(*a)[1]))
    with pytest.raises(CheckFailed, match=r"shape of W: expected '\(4, 4\)', got '\(3, 4\)'"):
        grading.check_whitening_matrix(lambda X, method="zca", eps=1e-5: (alt.whitening_matrix(X, method, eps)[0][:3],
                                                                          np.mean(X, axis=0)))
    with pytest.raises(CheckFailed, match=r"lacks 'loss_beta' \(the loss at each step with beta"):
        grading.check_whitening_experiment(lambda seed, **kw: {k: v for k, v in alt.whitening_experiment(
            seed, **{**kw, "dims": (4, 8)}).items() if k != "loss_beta"})
    with pytest.raises(CheckFailed, match=r"must return a dict"):
        grading.check_whitening_experiment(lambda seed, **kw: [1, 2])


def test_changing_the_input_in_place_is_named():
    def centres_in_place(X, method="zca", eps=1e-5):
        mu = X.mean(axis=0)
        X -= mu
        return alt.whitening_matrix(X + mu, method, eps)
    with pytest.raises(CheckFailed) as failure:
        grading.check_whitening_matrix(centres_in_place)
    assert failure.value.misconception == INPUT_CHANGED


def test_unknown_bug_reports_every_output_that_differs():
    def off(X, method="zca", eps=1e-5):
        W, mu = alt.whitening_matrix(X, method, eps)
        return W * 1.001, mu + 1e-3
    with pytest.raises(CheckFailed, match=r"(?s)Outputs that differ:.*- W @ W.T: 16 of 16 values differ.*"
                                          r"- W.T @ W: 16 of 16.*- mu: 4 of 4") as f:
        grading.check_whitening_matrix(off)
    assert f.value.misconception is None


def test_stub_and_crash_get_clear_messages():
    def stub(x, eps=1e-5):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        grading.check_bn_identity_parameters(stub)
    def refuses_m_le_d(X, method="zca", eps=1e-5):
        if X.shape[0] <= X.shape[1]:
            raise ValueError("whitening needs more examples than features")
        return alt.whitening_matrix(X, method, eps)
    with pytest.raises(CheckFailed, match=r"raised ValueError: whitening needs more examples than features\n"
                                          r"  on case: X 2 x 2 float64 \(a batch of 2") as failure:
        grading.check_whitening_matrix(refuses_m_le_d)
    assert 'raise ValueError("whitening needs' in str(failure.value)  # the learner's own line


_RUNS = {"_run_whitening": ("_whitening_cases", "whitening_matrix"), "_run_whiten": ("_whiten_cases", "whiten"),
         "_run_identity": ("_identity_cases", "bn_identity_parameters"), "_run_drift": ("_drift_cases", "bias_drift"),
         "_run_experiment": ("_experiment_cases", "whitening_experiment"),
         "_run_zca_derivative": ("_derivative_cases", "zca_derivative")}


@pytest.mark.parametrize("hidden", [False, True])
@pytest.mark.parametrize("run", sorted(_RUNS))
def test_cases_and_run_functions_travel_to_the_sandbox(hidden, run):
    """The class grader ships run and each case's data with cloudpickle; plain pickle is stricter."""
    cases_of, task = _RUNS[run]
    cases, run_fn = getattr(grading, cases_of)(hidden), getattr(learner, run)
    pickle.loads(pickle.dumps((run_fn, cases)))
    impl = getattr(alt, task)
    if task == "whitening_experiment":  # its timings are not what this test is about
        impl = functools.partial(impl, dims=(16, 256))
        cases = cases[:1]
    for case in cases:  # run returns plain data
        out = run_fn(impl, case)
        assert isinstance(out, dict) and all(isinstance(v, (np.ndarray, str)) for v in out.values())


# --- the benchmark runs (its timings are reported, never asserted) -------------------

def test_benchmark_runs_and_draws():
    rows = bench.run(m=32, dims=(4, 8), repeats=1)
    assert [r["d"] for r in rows] == [4, 8]
    assert all(set(r["seconds"]) == set(bench.VARIANTS) and min(r["seconds"].values()) > 0 for r in rows)
    assert all(r[k] > 0 for r in rows for k in bench.RATIOS)
    assert "f+b ratio" in bench.format_table(rows)
    assert np.isfinite(bench.growth_exponent(rows, "ZCA forward"))
    cubic = [{"d": d, "seconds": {"ZCA forward": 2e-9 * d ** 3}} for d in (16, 32, 64, 128)]
    assert bench.growth_exponent(cubic, "ZCA forward") == pytest.approx(3.0)
    assert len(bench.plot(rows).axes) == 2


# --- the notebook ---------------------------------------------------------------------

def test_every_code_cell_of_the_solution_notebook_compiles():
    """Ungraded cells too (the cycle only scores the graded ones), as IPython would run them."""
    from IPython.core.inputtransformer2 import TransformerManager

    nb = nbformat.read(ROOT / "solutions" / "ch3_whitening" / "ch3_whitening.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(TransformerManager().transform_cell(cell.source), cell.metadata["nbgrader"]["grade_id"], "exec")


# --- the nbgrader cycle ----------------------------------------------------------------

class TestNbgraderCycle(CycleSuite):
    slug = "ch3_whitening"
    full_score = 14
    stubs = 6
    buggy = {  # student -> patches of the model answers, and the misconception the grader must name
        "unbiased": ([("sigma = centred.T @ centred / m + eps", "sigma = centred.T @ centred / (m - 1) + eps")],
                     "the sample covariance (divided by m - 1, Bessel-corrected) instead of the biased one (m)"),
        "untransposed": ([("np.matmul(np.asarray(X) - mu, np.transpose(W))", "np.matmul(np.asarray(X) - mu, W)")],
                         "W applied without transposing ((X - mu) @ W)"),
        "no_eps": ([(".mean(axis=others) + eps)", ".mean(axis=others))")],
                   "identity parameters without eps (gamma = sqrt(var))"),
        "always_inside": ([("        if inside:\n", "        if True:\n")],
                          "the gradient flows through E[x] although inside=False, so b never drifts"),
        "beta_frozen": ([("            if learn_beta:\n", "            if False:\n")],
                        "with learn_beta the bias keeps drifting: beta is never updated"),
        "eigenvalues_only": ([("K = -1 / (s[:, None] * s[None, :] * (s[:, None] + s[None, :]))",
                               "K = np.diag(-0.5 * lam ** -1.5)")],
                             "the eigenvectors' change left out (only the eigenvalue terms, K off the diagonal set to 0)"),
    }

    def test_each_mistake_costs_only_its_own_task(self, cycle):
        """The experiment uses the learner's whitening, yet a wrong whitening_matrix or whiten
        costs only its own points: the experiment's check does not depend on them being right."""
        points = {"unbiased": 4, "untransposed": 1, "no_eps": 2, "always_inside": 2, "beta_frozen": 3,
                  "eigenvalues_only": 2}
        for student, lost in points.items():
            assert cycle.scores[student][0] == self.full_score - lost, (student, cycle.scores[student])
