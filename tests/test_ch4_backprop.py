"""Chapter 4 - the backward pass of batch normalization: the reference against
its oracles (PyTorch's F.batch_norm and autograd, torch.autograd.gradcheck's
finite differences), the properties the page proves, and the grading checks
against the misconception catalogue."""

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import alt_ch4_backprop as alt
import bn_exercises.backprop as learner
import nbformat
from chapter_suite import CatalogueSuite, CycleSuite
from bn_reference import backprop as ref
from bn_reference.benchmarks import backprop as bench
from bn_reference.grading import ALSO, INPUT_CHANGED, CheckFailed
from bn_reference.grading import backprop as grading

matplotlib.use("Agg")

SHAPES = [(2, 3), (16, 5), (64, 8), (7, 1)]
BACKWARDS = [ref.batchnorm_backward, ref.batchnorm_backward_compact]
RTOL = {np.float64: 1e-10, np.float32: 1e-4}


def _layer(seed, shape, dtype=np.float64):
    """x with features of different means and spreads, gamma away from 1 (both signs), beta, random dout."""
    rng = np.random.default_rng(seed)
    n, d = shape
    x = rng.normal(size=shape) * rng.uniform(0.3, 3, size=d) + rng.uniform(-3, 3, size=d)
    gamma = rng.uniform(0.5, 2, size=d) * rng.choice([-1.0, 1.0], size=d)
    beta, dout = rng.normal(size=d), rng.normal(size=shape) + rng.normal(size=d)
    return [a.astype(dtype) for a in (x, gamma, beta, dout)]


def _torch(x, gamma, beta, eps):
    """F.batch_norm in training mode with autograd on x, gamma and beta."""
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    return (xt, gt, bt), F.batch_norm(xt, None, None, gt, bt, training=True, eps=eps)


def _close(ours, theirs, rtol, scale=0.0):
    """Agreement relative to the larger of the array's scale and ``scale``, the size of the
    terms it was computed from (dx of a batch of 2 is a tiny difference of O(1) terms)."""
    theirs = np.asarray(theirs, dtype=np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * max(np.abs(theirs).max(), scale))


# --- forward and backward against PyTorch -----------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_forward_matches_torch_batch_norm(shape, dtype, eps):
    x, gamma, beta, _ = _layer(sum(shape), shape, dtype)
    out, cache = ref.batchnorm_forward(x, gamma, beta, eps)
    _, out_t = _torch(x, gamma, beta, eps)
    _close(out, out_t.detach().numpy(), RTOL[dtype])
    var_t, mu_t = torch.var_mean(torch.tensor(x), dim=0, unbiased=False)
    _close(cache["mu"], mu_t.numpy(), RTOL[dtype])
    _close(cache["var"], var_t.numpy(), RTOL[dtype])
    assert out.dtype == dtype


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_matches_autograd(backward, shape, dtype):
    x, gamma, beta, dout = _layer(10 + sum(shape), shape, dtype)
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    inputs, out_t = _torch(x, gamma, beta, 1e-5)
    grads_t = torch.autograd.grad(out_t, inputs, torch.tensor(dout))
    terms = np.abs(gamma * cache["inv_std"] * dout).max()
    for ours, theirs in zip(backward(dout, cache), grads_t):
        _close(ours, theirs.numpy(), RTOL[dtype], terms)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_constant_feature_matches_autograd(backward):
    """var = 0: x_hat = 0 and dx = gamma / sqrt(eps) * (dout - mean(dout)) for that feature."""
    x, gamma, beta, dout = _layer(15, (12, 3))
    x[:, 1] = 2.5
    out, cache = ref.batchnorm_forward(x, gamma, beta)
    inputs, out_t = _torch(x, gamma, beta, 1e-5)
    _close(out, out_t.detach().numpy(), 1e-10)
    for ours, theirs in zip(backward(dout, cache), torch.autograd.grad(out_t, inputs, torch.tensor(dout))):
        _close(ours, theirs.numpy(), 1e-10)
    expected = gamma[1] / np.sqrt(1e-5) * (dout[:, 1] - dout[:, 1].mean())
    _close(backward(dout, cache)[0][:, 1], expected, 1e-10)


class _NumpyBatchNorm(torch.autograd.Function):
    """The reference forward and a reference backward as one autograd node, for gradcheck."""

    @staticmethod
    def forward(ctx, x, gamma, beta, backward):
        out, ctx.cache = ref.batchnorm_forward(x.numpy(), gamma.numpy(), beta.numpy())
        ctx.backward = backward
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, dout):
        return (*(torch.from_numpy(g) for g in ctx.backward(dout.numpy(), ctx.cache)), None)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("shape", [(2, 3), (5, 4), (9, 2)])
def test_backward_passes_torch_gradcheck(backward, shape):
    """torch.autograd.gradcheck compares our backward with its own central differences."""
    x, gamma, beta, _ = (torch.tensor(a, requires_grad=True) for a in _layer(20 + sum(shape), shape))
    assert torch.autograd.gradcheck(lambda *a: _NumpyBatchNorm.apply(*a, backward), (x, gamma, beta),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


# --- what the page proves ---------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_staged_equals_compact(shape):
    x, gamma, beta, dout = _layer(30 + sum(shape), shape)
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    terms = np.abs(gamma * cache["inv_std"] * dout).max()
    for a, b in zip(*(backward(dout, cache) for backward in BACKWARDS)):
        _close(a, b, 1e-12, terms)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.3])
def test_dx_sums_to_zero_and_is_orthogonal_to_x_hat_up_to_eps(shape, eps):
    """Per feature, sum_i dx_i = 0 for any eps, and
    sum_i dx_i x_hat_i = gamma * eps / sigma^3 * sum_i dout_i x_hat_i, which is 0 only when eps = 0."""
    x, gamma, beta, dout = _layer(40 + sum(shape), shape)
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps)
    dx, dgamma, _ = ref.batchnorm_backward_compact(dout, cache)
    terms = np.abs(gamma * cache["inv_std"] * dout).sum(axis=0) * (1 + np.abs(cache["x_hat"]).max())
    np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-14 * terms.max())
    expected = gamma * eps * cache["inv_std"] ** 3 * dgamma
    np.testing.assert_allclose((dx * cache["x_hat"]).sum(axis=0), expected, rtol=1e-8, atol=1e-14 * terms.max())


@pytest.mark.parametrize("backward", BACKWARDS)
def test_dout_constant_per_feature_gives_zero_dx(backward):
    """Why dout = ones proves nothing: dx is 0 while dgamma, dbeta are not."""
    x, gamma, beta, _ = _layer(50, (16, 4))
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    for dout in (np.ones_like(x), np.broadcast_to([2.0, -1.0, 0.5, 3.0], x.shape)):
        dx, dgamma, dbeta = backward(dout, cache)
        assert np.abs(dx).max() < 1e-14 * np.abs(gamma * cache["inv_std"]).max() * 16
        np.testing.assert_allclose(dbeta, dout.sum(axis=0))


def test_a_batch_of_two_passes_no_gradient_when_eps_is_zero():
    """With N = 2, x_hat = (+1, -1) whatever x is, so dx = 0 (and only O(eps / var) with eps > 0)."""
    x, gamma, beta, dout = _layer(60, (2, 5))
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps=0.0)
    dx, _, _ = ref.batchnorm_backward_compact(dout, cache)
    assert np.abs(dx).max() < 1e-12
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    dx, _, _ = ref.batchnorm_backward_compact(dout, cache)
    assert 0 < np.abs(dx).max() < 1e-3


def test_constant_statistics_gradient_moves_the_batch_mean():
    """dx = gamma * dout / sigma (mu, sigma held constant) has a non-zero batch sum: a step
    along it shifts the batch, which the normalization then undoes (paper, Sec. 2)."""
    x, gamma, beta, dout = _layer(70, (32, 3))
    _, cache = ref.batchnorm_forward(x, gamma, beta)
    naive = gamma * dout * cache["inv_std"]
    assert np.all(np.abs(naive.sum(axis=0)) > 1e-3)
    out_before, _ = ref.batchnorm_forward(x, gamma, beta)
    out_after, _ = ref.batchnorm_forward(x - 0.1 * naive.mean(axis=0), gamma, beta)
    np.testing.assert_allclose(out_after, out_before, rtol=1e-12, atol=1e-12)


# --- the spatial case (N, C, H, W) against PyTorch -----------------------------

SPATIAL_SHAPES = [(2, 3, 4, 5), (1, 2, 3, 3), (8, 4, 2, 2), (3, 1, 1, 2)]


def _spatial_layer(seed, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.normal(size=shape) * rng.uniform(0.3, 3, size=(1, c, 1, 1)) + rng.uniform(-3, 3, size=(1, c, 1, 1))
    gamma = rng.uniform(0.5, 2, size=c) * rng.choice([-1.0, 1.0], size=c)
    beta, dout = rng.normal(size=c), rng.normal(size=shape)
    return [a.astype(dtype) for a in (x, gamma, beta, dout)]


@pytest.mark.parametrize("shape", SPATIAL_SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_spatial_forward_and_backward_match_torch(shape, dtype, eps):
    """F.batch_norm on a 4-D input normalizes per channel over (N, H, W); autograd gives the gradients."""
    x, gamma, beta, dout = _spatial_layer(sum(shape), shape, dtype)
    out, cache = ref.spatial_batchnorm_forward(x, gamma, beta, eps)
    inputs, out_t = _torch(x, gamma, beta, eps)
    _close(out, out_t.detach().numpy(), RTOL[dtype])
    var_t, mu_t = torch.var_mean(torch.tensor(x), dim=(0, 2, 3), unbiased=False)
    _close(cache["mu"], mu_t.numpy(), RTOL[dtype])
    _close(cache["var"], var_t.numpy(), RTOL[dtype])
    assert cache["x_hat"].shape == x.shape and cache["mu"].shape == (shape[1],) and out.dtype == dtype
    terms = np.abs(gamma[None, :, None, None] * cache["inv_std"][None, :, None, None] * dout).max()
    grads = ref.spatial_batchnorm_backward(dout, cache)
    for ours, theirs in zip(grads, torch.autograd.grad(out_t, inputs, torch.tensor(dout))):
        _close(ours, theirs.numpy(), RTOL[dtype], terms)


def test_spatial_forward_matches_batchnorm2d_and_accepts_a_batch_of_one():
    """nn.BatchNorm2d in training mode takes (1, C, H, W) when H*W > 1 and refuses N*H*W == 1."""
    x, gamma, beta, _ = _spatial_layer(3, (1, 3, 4, 2))
    layer = torch.nn.BatchNorm2d(3, eps=1e-3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(gamma))
        layer.bias.copy_(torch.tensor(beta))
    _close(ref.spatial_batchnorm_forward(x, gamma, beta, 1e-3)[0], layer(torch.tensor(x)).detach().numpy(), 1e-10)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.ones((1, 3, 1, 1), dtype=torch.float64))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref.spatial_batchnorm_forward(np.ones((1, 3, 1, 1)), gamma, beta)


@pytest.mark.parametrize("shape", [(2, 2, 2, 2), (1, 3, 2, 3)])
def test_spatial_backward_passes_torch_gradcheck(shape):
    class Spatial(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, gamma, beta):
            out, ctx.cache = ref.spatial_batchnorm_forward(x.numpy(), gamma.numpy(), beta.numpy())
            return torch.from_numpy(out)

        @staticmethod
        def backward(ctx, dout):
            return tuple(torch.from_numpy(g) for g in ref.spatial_batchnorm_backward(dout.numpy(), ctx.cache))

    x, gamma, beta, _ = (torch.tensor(a, requires_grad=True) for a in _spatial_layer(7 + sum(shape), shape))
    assert torch.autograd.gradcheck(Spatial.apply, (x, gamma, beta), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- the projection view of dx ------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.3])
def test_dx_is_gamma_s_times_the_matrix_p_applied_to_dout(eps):
    """dx = gamma * s * P g per feature, P = I - 11^T/N - x_hat x_hat^T/N: P kills 1 for any eps;
    on x_hat its eigenvalue is eps * s^2; with eps = 0 it is the orthogonal projection onto the
    complement of span{1, x_hat}."""
    x, gamma, beta, dout = _layer(77, (9, 3))
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps)
    dx = ref.batchnorm_backward_compact(dout, cache)[0]
    n = len(x)
    for j in range(3):
        x_hat, s = cache["x_hat"][:, j], cache["inv_std"][j]
        P = np.eye(n) - np.ones((n, n)) / n - np.outer(x_hat, x_hat) / n
        _close(dx[:, j], gamma[j] * s * P @ dout[:, j], 1e-12, np.abs(gamma[j] * s * dout[:, j]).max())
        np.testing.assert_allclose(P @ np.ones(n), 0.0, atol=1e-14)
        np.testing.assert_allclose(P @ x_hat, eps * s ** 2 * x_hat, atol=1e-13)
        np.testing.assert_allclose(P, P.T)
        if eps == 0.0:
            np.testing.assert_allclose(P @ P, P, atol=1e-13)


def test_a_small_step_keeps_the_mean_and_changes_the_spread_only_at_second_order():
    """With eps = 0, x - lr * dx has the same mean (any lr) and a variance larger by lr^2 * var(dx)."""
    x, gamma, beta, dout = _layer(78, (12, 2))
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps=0.0)
    dx = ref.batchnorm_backward_compact(dout, cache)[0]
    for lr in (1e-3, 1e-1, 1.0):
        stepped = x - lr * dx
        np.testing.assert_allclose(stepped.mean(axis=0), x.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stepped.var(axis=0) - x.var(axis=0), lr ** 2 * dx.var(axis=0), rtol=1e-8)


# --- numerical gradient and rel_error ------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3), (5, 4)])
def test_numerical_gradient_matches_autograd(shape):
    x, gamma, beta, dout = _layer(80 + sum(shape), shape)
    inputs, out_t = _torch(x, gamma, beta, 1e-5)
    dx_t, = torch.autograd.grad(out_t, inputs[0], torch.tensor(dout))
    x_before = x.copy()
    numeric = ref.numerical_gradient(lambda z: ref.batchnorm_forward(z, gamma, beta)[0], x, dout)
    np.testing.assert_allclose(numeric, dx_t.numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(x, x_before)
    assert numeric.dtype == np.float64


def test_numerical_gradient_of_a_non_square_map_and_a_float32_input():
    rng = np.random.default_rng(90)
    x, w, dout = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.tanh(xt @ torch.tensor(w)).backward(torch.tensor(dout))
    numeric = ref.numerical_gradient(lambda z: np.tanh(z @ w), x, dout, h=1e-4)
    np.testing.assert_allclose(numeric, xt.grad.numpy(), rtol=1e-7, atol=1e-9)


def test_rel_error_values():
    assert ref.rel_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert ref.rel_error([0.0, 1.0], [0.0, 1.0]) == 0.0
    assert ref.rel_error([1.0, 100.0], [3.0, 100.0]) == pytest.approx(0.5)
    assert ref.rel_error([0.0], [1e-9]) == pytest.approx(0.1)
    a, b = np.random.default_rng(0).normal(size=(2, 7))
    assert ref.rel_error(a, b) == ref.rel_error(b, a)
    assert isinstance(ref.rel_error(a, b), float)


# --- contract and bad input -------------------------------------------------

def test_cache_holds_the_documented_keys():
    x, gamma, beta, _ = _layer(95, (6, 3))
    _, cache = ref.batchnorm_forward(x, gamma, beta, eps=1e-3)
    assert set(cache) == set(ref.CACHE_KEYS)
    assert {"x_hat", "mu", "var", "inv_std", "gamma", "eps"} <= set(cache)  # Chapter 5 reads these
    np.testing.assert_allclose(cache["var"], x.var(axis=0, ddof=0))
    np.testing.assert_allclose(cache["inv_std"], 1 / np.sqrt(x.var(axis=0) + 1e-3))
    np.testing.assert_allclose(cache["x_centered"], x - x.mean(axis=0))
    assert cache["eps"] == 1e-3
    assert ref.CACHE_KEYS is learner.CACHE_KEYS  # one definition, in the learner package the checks run from


@pytest.mark.parametrize("call, message", [
    (lambda: ref.batchnorm_forward(np.ones(5), 1.0, 0.0), "2-D"),
    (lambda: ref.batchnorm_forward(np.ones((1, 3)), np.ones(3), np.zeros(3)), "N >= 2"),
    (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(2), np.zeros(3)), "gamma must have shape"),
    (lambda: ref.batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3), eps=-1.0), "eps"),
    (lambda: ref.batchnorm_backward(np.ones((3, 3)), ref.batchnorm_forward(np.eye(4, 3), 1.0, 0.0)[1]), "dout"),
    (lambda: ref.batchnorm_backward_compact(np.ones(3), ref.batchnorm_forward(np.eye(4, 3), 1.0, 0.0)[1]), "dout"),
    (lambda: ref.batchnorm_forward(np.ones((2, 3, 4, 4)), np.ones(3), np.zeros(3)), "spatial_batchnorm_forward"),
    (lambda: ref.spatial_batchnorm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3)), "4-D"),
    (lambda: ref.spatial_batchnorm_forward(np.ones((2, 3, 2, 2)), np.ones(2), np.zeros(3)), "gamma must have shape"),
    (lambda: ref.spatial_batchnorm_backward(np.ones((2, 3, 2, 1)),
                                            ref.spatial_batchnorm_forward(np.eye(4).reshape(2, 2, 2, 2), 1.0, 0.0)[1]),
     "dout"),
    (lambda: ref.numerical_gradient(np.tanh, np.ones(3), np.ones(3), h=0.0), "h must be > 0"),
    (lambda: ref.numerical_gradient(np.tanh, np.ones(3), np.ones(4)), "shape of f"),
    (lambda: ref.rel_error(np.ones(3), np.ones(4)), "same shape"),
])
def test_bad_input_is_rejected_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- grading: every check fails each catalogue entry with its own name -------

class TestGrading(CatalogueSuite):
    checks = {
        "batchnorm_forward": grading.check_batchnorm_forward,
        "batchnorm_backward": grading.check_batchnorm_backward,
        "batchnorm_backward_compact": grading.check_batchnorm_backward_compact,
        "spatial_batchnorm_forward": grading.check_spatial_batchnorm_forward,
        "spatial_batchnorm_backward": grading.check_spatial_batchnorm_backward,
        "numerical_gradient": grading.check_numerical_gradient,
        "rel_error": grading.check_rel_error,
        "backprop_experiment": grading.check_backprop_experiment,
    }
    catalogue = grading.CATALOGUE
    alt = alt
    reference = ref
    learner = learner



def test_the_learners_own_cache_feeds_the_learners_backward():
    """The notebook's design: a forward that passes its check makes a cache the backward
    functions read exactly like the reference's."""
    x, gamma, beta, dout = _layer(99, (8, 3))
    theirs = alt.batchnorm_backward(dout, alt.batchnorm_forward(x, gamma, beta)[1])
    for a, b in zip(theirs, ref.batchnorm_backward(dout, ref.batchnorm_forward(x, gamma, beta)[1])):
        _close(a, b, 1e-12)


def test_forward_cache_problems_are_named():
    def no_cache_keys(x, gamma, beta, eps=1e-5):
        return alt.batchnorm_forward(x, gamma, beta, eps)[0], {"x_hat": 0}

    def keepdims_mu(x, gamma, beta, eps=1e-5):
        out, cache = alt.batchnorm_forward(x, gamma, beta, eps)
        return out, {**cache, "mu": cache["mu"][None, :]}

    with pytest.raises(CheckFailed, match="cache lacks 'x_centered', 'mu'"):
        grading.check_batchnorm_forward(no_cache_keys)
    with pytest.raises(CheckFailed, match=r"cache\['mu'\]: expected shape \(4,\), got shape \(1, 4\)"):
        grading.check_batchnorm_forward(keepdims_mu)
    with pytest.raises(CheckFailed, match="must return a pair"):
        grading.check_batchnorm_forward(lambda x, gamma, beta, eps=1e-5: gamma * x + beta)


def _looping_compact(dout, cache):
    dx = np.empty_like(dout)
    for j in range(dout.shape[1]):
        column = {k: v[..., j:j + 1] if np.ndim(v) else v for k, v in cache.items()}
        dx[:, j] = alt.batchnorm_backward_compact(dout[:, j:j + 1], column)[0][:, 0]
    return dx, (dout * cache["x_hat"]).sum(axis=0), dout.sum(axis=0)


def _builtin_sum_compact(dout, cache):
    dx = alt.batchnorm_backward_compact(dout, cache)[0]
    return dx, sum(dout * cache["x_hat"]), dout.sum(axis=0)


def _comprehension_compact(dout, cache):
    dx, dgamma, _ = alt.batchnorm_backward_compact(dout, cache)
    return dx, dgamma, np.array([column.sum() for column in dout.T])


@pytest.mark.parametrize("impl, what", [(_looping_compact, "a for loop"), (_builtin_sum_compact, "built-in sum"),
                                        (_comprehension_compact, "a list comprehension")])
def test_compact_backward_with_a_python_loop_is_refused(impl, what):
    grading.check_batchnorm_backward(impl)  # correct values ...
    with pytest.raises(CheckFailed, match=what) as failure:  # ... but not the closed form
        grading.check_batchnorm_backward_compact(impl)
    assert failure.value.misconception == learner.LOOP_MISCONCEPTION


def test_the_loop_check_reads_compiled_code_so_it_needs_no_source():
    source = "def compact(dout, cache):\n    i = 0\n    while i < 0:\n        i += 1\n    return dout, dout, dout\n"
    namespace = {}
    exec(compile(source, "<no file>", "exec"), namespace)  # inspect.getsource would fail on it
    assert learner._python_loop(namespace["compact"]) == "a while loop"
    assert learner._python_loop(alt.batchnorm_backward_compact) is None
    assert learner._python_loop(ref.batchnorm_backward_compact) is None


def test_every_wrong_output_is_reported_and_two_unrelated_mistakes_get_no_name():
    """dgamma and dbeta of shape (1, D) and dx without gamma: no entry reproduces all three
    wrong outputs, so none is named (a wrong name is worse than none), and all are listed,
    the shape mismatches first."""
    def keepdims_and_no_gamma(dout, cache):
        dx, dgamma, dbeta = alt.batchnorm_backward(dout, {**cache, "gamma": np.ones_like(cache["gamma"])})
        return dx, dgamma[None, :], dbeta[None, :]
    with pytest.raises(CheckFailed) as failure:
        grading.check_batchnorm_backward(keepdims_and_no_gamma)
    message = str(failure.value)
    assert failure.value.misconception is None and "known mistake" not in message
    assert message.index("- dgamma: expected shape (4,), got shape (1, 4)") < message.index("- dx:")
    assert "- dbeta: expected shape (4,), got shape (1, 4)" in message


@pytest.mark.parametrize("task, names", [
    ("batchnorm_forward", ("unbiased (N-1) batch variance in the forward pass", "eps added outside the square root")),
    ("batchnorm_forward", ("unbiased (N-1) batch variance in the forward pass",
                           "the eps argument is ignored (a fixed 1e-5 is used)")),
    ("batchnorm_backward", ("the path through the variance is missing its 1/N",
                            "the path through the mean is missing its 1/N")),
])
def test_realistic_pairs_of_mistakes_are_named_together(task, names):
    """A learner who makes two mistakes at once is told both (the entries combined), and the
    class report can count each; a learner who makes one of them is told that one alone."""
    entry = next(m for m in grading.CATALOGUE[task] if all(n in m.name for n in names) and ALSO in m.name)
    check = TestGrading.checks[task]
    for side in (check, getattr(learner, check.__name__)):
        with pytest.raises(CheckFailed) as failure:
            side(entry.impl)
        assert failure.value.misconception == entry.name
    for name in names:
        single = next(m for m in grading.CATALOGUE[task] if m.name.startswith(name) and ALSO not in m.name)
        with pytest.raises(CheckFailed) as failure:
            check(single.impl)
        assert failure.value.misconception == single.name


def test_unknown_bug_reports_where_outputs_differ():
    def off_by_a_bit(dout, cache):
        dx, dgamma, dbeta = alt.batchnorm_backward(dout, cache)
        return dx * 1.001, dgamma, dbeta
    with pytest.raises(CheckFailed, match=r"batchnorm_backward is wrong on case.*\n.*\n +- dx: \d+ of \d+ values "
                                          r"differ; worst at index \(\d+, \d+\): expected \S+, got \S+ "
                                          r"\(relative error 1.0e-03\)") as failure:
        grading.check_batchnorm_backward(off_by_a_bit)
    assert failure.value.misconception is None


def test_stub_and_crash_get_clear_messages():
    def stub(dout, cache):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="batchnorm_backward is not implemented yet: the function"):
        grading.check_batchnorm_backward(stub)
    with pytest.raises(CheckFailed, match="^batchnorm_backward raised KeyError") as failure:  # the function, not dbeta
        grading.check_batchnorm_backward(lambda dout, cache: cache["x"])
    assert 'cache["x"]' in str(failure.value)  # the learner's own line


def test_changing_the_cache_in_place_is_named():
    def scales_x_hat_in_place(dout, cache):
        grads = alt.batchnorm_backward(dout, cache)
        cache["x_hat"] *= 2.0
        return grads
    with pytest.raises(CheckFailed, match=r"changed its input cache\['x_hat'\] in place") as failure:
        grading.check_batchnorm_backward(scales_x_hat_in_place)
    assert failure.value.misconception == INPUT_CHANGED


def test_spatial_forward_rejecting_a_batch_of_one_fails():
    def no_single_example(x, gamma, beta, eps=1e-5):
        if x.shape[0] == 1:
            raise ValueError("Expected more than 1 value per channel when training")
        return alt.spatial_batchnorm_forward(x, gamma, beta, eps)
    with pytest.raises(CheckFailed, match=r"raised ValueError.*\n  on case: x of shape \(1, 3, 4, 4\)"):
        grading.check_spatial_batchnorm_forward(no_single_example)


def test_hidden_cases_keep_their_labels_hidden():
    with pytest.raises(CheckFailed) as failure:
        grading.check_spatial_batchnorm_backward(grading.SPATIAL_BACKWARD_CATALOGUE[3].impl, hidden=True)
    assert "hidden case" in str(failure.value) and "shape" not in str(failure.value).split("\n")[0]


def test_the_visible_numerical_gradient_cases_compute_no_batch_norm():
    """The learner package ships the visible cases' functions: none of them may be the BN
    forward pass the exercise asks for. The grader's hidden cases use it."""
    from bn_reference.grading import record

    def functions(hidden):
        calls = []
        token = record._recording.set(calls)
        try:
            grading.check_numerical_gradient(None, hidden=hidden)
        finally:
            record._recording.reset(token)
        return [getattr(c.data["f"], "func", c.data["f"]) for c in calls[0]["cases"]]

    assert set(functions(False)) <= set(learner.CASE_HELPERS.values())
    assert grading._bn_output in functions(True)


def test_the_case_helpers_match_their_oracles():
    import scipy.special

    x = np.random.default_rng(8).normal(size=(5, 3))
    np.testing.assert_allclose(learner._softmax_over_batch(x, 1.5), scipy.special.softmax(1.5 * x, axis=0), rtol=1e-14)
    np.testing.assert_allclose(learner._tanh_linear(x, np.eye(3)), np.tanh(x), rtol=1e-15)
    np.testing.assert_allclose(learner._tanh_scaled(x, 2.0), np.tanh(2 * x), rtol=1e-15)


# --- the graded experiment -------------------------------------------------------

def test_softmax_cross_entropy_matches_torch():
    rng = np.random.default_rng(7)
    scores, labels = rng.normal(size=(9, 10)) * 3, rng.integers(0, 10, size=9)
    loss, dscores = learner.softmax_cross_entropy(scores, labels)
    st = torch.tensor(scores, requires_grad=True)
    lt = F.cross_entropy(st, torch.tensor(labels))
    lt.backward()
    assert isinstance(loss, float)
    np.testing.assert_allclose(loss, lt.item(), rtol=1e-13)
    np.testing.assert_allclose(dscores, st.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_the_experiments_helpers_are_seeded_and_leave_nothing_shared():
    X, y = learner.digits_data()
    assert X.shape == (1797, 64) and X.dtype == np.float64 and 0 <= X.min() and X.max() == 1.0
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    X[:] = -1.0
    assert learner.digits_data()[0].min() == 0.0  # a learner's in-place change does not stick
    a, b = learner.init_mlp(3), learner.init_mlp(3)
    assert all(np.array_equal(a[k], b[k]) for k in a) and not np.array_equal(a["W1"], learner.init_mlp(4)["W1"])
    assert {k: v.shape for k, v in a.items()} == {"W1": (64, 32), "gamma": (32,), "beta": (32,), "W2": (32, 10),
                                                   "b2": (10,)}
    batches = learner.minibatches(3, 1797, 16, 50)
    assert len(batches) == 50 and all(len(set(b)) == 16 and b.max() < 1797 for b in batches)
    assert all(np.array_equal(u, v) for u, v in zip(batches, learner.minibatches(3, 1797, 16, 50)))


def test_one_thread_restores_the_thread_settings():
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the tests run on one thread (conftest.py): start from two
    try:
        with threadpool_limits(2):
            before = (torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()])
            assert before[0] == 2 and 2 in before[1]
            with learner.one_thread():
                assert torch.get_num_threads() == 1 and all(i["num_threads"] == 1 for i in threadpool_info())
            assert (torch.get_num_threads(), [i["num_threads"] for i in threadpool_info()]) == before
    finally:
        torch.set_num_threads(threads)


EXPERIMENT_SETTINGS = [{}, {"n_steps": 120, "batch_size": 16, "lr": 0.2}, {"n_steps": 200, "batch_size": 24, "lr": 0.3},
                       {"n_steps": 150, "batch_size": 8, "lr": 0.1}]


@pytest.fixture(scope="module")
def margins():
    """The reference's and the second implementation's experiment on 6 seeds and 4 settings
    (those of the visible and hidden cases, and a batch of 8): the slack of every margin."""
    rows = []
    with learner.one_thread():
        for seed in range(6):
            for kwargs in EXPERIMENT_SETTINGS:
                for name, experiment in (("reference", ref.backprop_experiment), ("alt", alt.backprop_experiment)):
                    curves = {k: np.asarray(v, dtype=float) for k, v in experiment(seed, **kwargs).items()}
                    tenth = max(1, len(curves["numpy"]) // 10)
                    rows.append({"who": name, "seed": seed, **kwargs,
                                 "gap": np.abs(curves["numpy"] - curves["autograd"]).max(),
                                 "departure": np.abs(curves["constant statistics"] - curves["autograd"]).max(),
                                 "trained": curves["numpy"][-tenth:].mean() / curves["numpy"][0]})
    return rows


def test_the_experiments_margins_hold_on_every_seed_with_room(margins):
    """Every correct experiment: NumPy within 1e-10 of autograd (it is within about 1e-15),
    the constant-statistics curve more than 0.01 away, the last tenth below a quarter of the
    first loss - on every seed, for both implementations, with the slack printed."""
    gap = max(r["gap"] for r in margins)
    departure = min(r["departure"] for r in margins)
    trained = max(r["trained"] for r in margins)
    print(f"{len(margins)} runs: largest gap {gap:.1e} (tolerance {learner.TRACKING_TOLERANCE:g}, slack "
          f"{learner.TRACKING_TOLERANCE / gap:.0f}x); smallest departure {departure:.3f} (threshold "
          f"{learner.DEPARTURE:g}, slack {departure / learner.DEPARTURE:.0f}x); largest last-tenth/first loss "
          f"{trained:.3f} (threshold {learner.TRAINED_FRACTION:g}, slack {learner.TRAINED_FRACTION / trained:.2f}x)")
    assert gap < learner.TRACKING_TOLERANCE / 1e4
    assert departure > 10 * learner.DEPARTURE
    assert trained < learner.TRAINED_FRACTION / 1.5


def test_the_reference_experiment_is_autograd_in_numpy():
    """The oracle: the reference's NumPy training run, with the right backward pass, follows
    PyTorch's autograd (F.batch_norm, F.cross_entropy) to float64 rounding for 300 steps,
    and starts from the same loss as a network built from nn modules."""
    curves = ref.backprop_experiment(5)
    assert all(len(c) == 300 for c in curves.values())
    np.testing.assert_allclose(curves["numpy"], curves["autograd"], rtol=0, atol=1e-13)
    np.testing.assert_allclose(curves["numpy"][0], alt.backprop_experiment(5, n_steps=1)["autograd"][0], rtol=1e-14)


def test_the_experiment_leaves_its_parameters_alone():
    params = learner.init_mlp(0)
    X, y = learner.digits_data()
    batches = learner.minibatches(0, len(X), 8, 5)
    copies = {k: v.copy() for k, v in params.items()}
    ref.mlp_losses_numpy(params, X, y, batches, 0.5)
    ref.mlp_losses_autograd(params, X, y, batches, 0.5)
    assert all(np.array_equal(params[k], copies[k]) for k in params)


def test_the_experiments_return_value_is_checked_with_a_clear_message():
    with pytest.raises(CheckFailed, match="must return a dict with the keys 'numpy', 'constant statistics', "
                                          "'autograd'"):
        grading.check_backprop_experiment(lambda seed, **kw: [1.0, 2.0])
    with pytest.raises(CheckFailed, match="'autograd' curve must be a list of losses"):
        grading.check_backprop_experiment(lambda seed, **kw: {"numpy": [1.0], "constant statistics": [1.0],
                                                              "autograd": ["a"]})


def test_an_experiment_with_a_wrong_backward_pass_fails_the_tracking():
    """The experiment is graded on the learner's own functions: a backward pass with a
    mistake the backward check names (here the missing 1/N of the variance path) makes
    the NumPy curve leave autograd's."""
    wrong_backward = next(m.impl for m in grading.BACKWARD_CATALOGUE if m.name.startswith("the path through the var"))

    def experiment(seed, n_steps=300, batch_size=32, lr=0.5):
        X, y = learner.digits_data()
        params, batches = learner.init_mlp(seed), learner.minibatches(seed, len(X), batch_size, n_steps)
        return {"numpy": ref.mlp_losses_numpy(params, X, y, batches, lr, wrong_backward),
                "constant statistics": ref.mlp_losses_numpy(params, X, y, batches, lr,
                                                            ref.constant_statistics_backward),
                "autograd": ref.mlp_losses_autograd(params, X, y, batches, lr)}

    with pytest.raises(CheckFailed) as failure:
        learner.check_backprop_experiment(experiment)
    assert "numpy curve within 1e-10 of autograd's at every step: expected 1, got 0" in str(failure.value)


# --- the benchmark runs (its timings are reported, never asserted) ---------------

def test_benchmark_runs_and_draws():
    rows = bench.run(shapes=[(8, 4)], dtypes=("float32", "float64"), repeats=1)
    assert [r["dtype"] for r in rows] == ["float32", "float64"]
    assert all(set(r["seconds"]) == set(bench.VARIANTS) and min(r["seconds"].values()) > 0 for r in rows)
    assert "staged/compact" in bench.format_table(rows)
    fig = bench.plot(rows)
    assert len(fig.axes) == 2


# --- the nbgrader cycle -------------------------------------------------------

class TestNbgraderCycle(CycleSuite):
    slug = "ch4_backprop"
    full_score = 16
    stubs = 11
    buggy = {  # student -> patches of the model answers, and the misconception the grader must name
        "unbiased": ([("var = (x_centered ** 2).mean(axis=0)", "var = (x_centered ** 2).sum(axis=0) / (len(x) - 1)")],
                     "unbiased (N-1) batch variance in the forward pass"),
        "constants": ([("dx = dx_centered + dmu / n", "dx = dx_hat * inv_std")],
                      "dx computed with mu and sigma treated as constants (dx = gamma * dout / sigma)"),
        "var_no_n": ([("dx_centered = dx_hat * inv_std + dvar * 2 * x_centered / n",
                       "dx_centered = dx_hat * inv_std + dvar * 2 * x_centered")],
                     "the path through the variance is missing its 1/N (dsigma2/dx_c = 2 x_c instead of 2 x_c / N)"),
        "loop": ([("    dx = gamma * inv_std / n * (n * dout - dbeta - x_hat * dgamma)",
                   "    dx = np.empty_like(dout)\n"
                   "    for j in range(dout.shape[1]):\n"
                   "        dx[:, j] = gamma[j] * inv_std[j] / n * (n * dout[:, j] - dbeta[j] - x_hat[:, j] * dgamma[j])")],
                 "a Python loop in the compact backward pass"),
        "spatial_n": ([("m = dout.shape[0] * dout.shape[2] * dout.shape[3]", "m = dout.shape[0]")],
                      "dx uses the batch size N where a channel has N*H*W values"),
        "one_sided": ([("x[k] = old - h\n", "x[k] = old\n"), ("grad[k] = (plus - minus) / (2 * h)", "grad[k] = (plus - minus) / h")],
                      "a one-sided (forward) difference"),

        "float32": ([("weights = {k: torch.tensor(v, dtype=torch.float64", "weights = {k: torch.tensor(v, dtype=torch.float32"),
                     ("X, y = torch.tensor(X, dtype=torch.float64)", "X, y = torch.tensor(X, dtype=torch.float32)")],
                    "the autograd run computes in float32 (PyTorch's default dtype), so it cannot track float64 to 1e-10"),
    }

    def test_the_cache_contract_stays_visible_to_the_learner(self, cycle):
        cells = nbformat.read(cycle.release, as_version=4).cells
        forward = next(c.source for c in cells if "def batchnorm_forward" in c.source)
        assert '"x_centered": x_centered' in forward

    def test_a_wrong_forward_costs_the_forward_test_and_the_experiment_only(self, cycle):
        """The backward tests use the reference cache and the spatial answers stand alone, so the
        error costs no other implementation task; the experiment trains with the learner's own
        forward pass, and names the mistake there too."""
        assert cycle.scores["unbiased"][0] == self.full_score - 2 - 3
        named = {t.get("misconception") for t in cycle.results["unbiased"]["tasks"]}
        assert "the NumPy runs normalize with the unbiased (N-1) batch variance" in named

    def test_a_mistake_in_the_experiment_costs_the_experiment_only(self, cycle):
        assert cycle.scores["float32"][0] == self.full_score - 3

    def test_the_try_it_cell_explains_dout_ones(self, cycle):
        cells = nbformat.read(cycle.release, as_version=4).cells
        try_it = next(c.source for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == "try_it")
        assert "rel_error" in try_it and "rounding" in try_it
