"""Chapter 2 - internal covariate shift: the reference against its oracles
(numpy.percentile of values computed by a manual forward pass; gradients from
autograd on deep copies of the model; nn.BatchNorm1d plus noise drawn by hand
from the same generator; a first-order Taylor expansion of the loss;
scikit-learn's StandardScaler), and the grading checks against the
misconception catalogue."""

import contextlib
import copy
import io
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

import alt_ch2_covariate_shift as alt
import bn_exercises.covariate_shift as learner
from chapter_suite import CatalogueSuite, CycleSuite
from bn_reference import covariate_shift as ref
from bn_reference.grading import CheckFailed, use_secret
from bn_reference.grading import covariate_shift as grading


def _mlp(bn=False, seed=0, dtype=torch.float64, hidden=(9, 7)):
    """A small Fig. 1-style network (6 inputs, 4 classes) with BN gamma, beta and running
    statistics away from their defaults."""
    model = ref.make_mlp(nn.BatchNorm1d if bn else None, seed=seed, hidden=hidden, n_in=6, n_out=4, init_scale=2.0)
    model = model.to(dtype)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.weight.copy_(1 + 0.5 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.uniform_(0.5, 2.0, generator=gen)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.3 * torch.randn(m.out_features, generator=gen))
    return model


def _batch(seed, n, dtype=torch.float64, features=6, classes=4):
    gen = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(n, features, generator=gen) + 0.2).to(dtype), torch.randint(classes, (n,), generator=gen)


def _snapshot(model):
    return (copy.deepcopy(model.state_dict()), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()])


def _assert_unchanged(model, snapshot):
    state, grads, modes = snapshot
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in model.modules()] == modes


# --- ActivationRecorder against np.percentile of a manual forward pass ---------

@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("unit, percentiles", [(0, None), (6, (5, 25, 50, 75, 95)), (3, [0, 100]), (2, (50,))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recorder_matches_numpy_percentile_of_a_manual_forward_pass(bn, unit, percentiles, dtype):
    model = _mlp(bn=bn, dtype=dtype)
    index = [i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid)][-1]
    kwargs = {} if percentiles is None else {"percentiles": percentiles}
    batches = [_batch(s, n, dtype)[0] for s, n in [(1, 11), (2, 2), (3, 30)]]
    with ref.ActivationRecorder(model[index], unit, **kwargs) as recorder:
        for x in batches:
            model(x)
    q = (15, 50, 85) if percentiles is None else percentiles
    with torch.no_grad():
        expected = [np.percentile(model[:index](x)[:, unit].double().numpy(), q) for x in batches]
    np.testing.assert_allclose(recorder.history, np.array(expected), rtol=1e-12, atol=1e-12)
    assert recorder.history.shape == (3, len(q))


def test_recorder_on_a_feature_map_takes_the_channel_over_n_h_w():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU()).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    with ref.ActivationRecorder(model[1], 2, percentiles=(10, 90)) as recorder:
        model(x)
    with torch.no_grad():
        values = model[0](x)[:, 2].reshape(-1).numpy()
    assert values.size == 4 * 4 * 4
    np.testing.assert_allclose(recorder.records[0], np.percentile(values, [10, 90]), rtol=1e-12)


def test_recorder_removes_only_its_own_hook():
    model = _mlp()
    calls = []
    model[1].register_forward_hook(lambda *args: calls.append(1))
    x = _batch(0, 8)[0]
    recorder = ref.ActivationRecorder(model[1], 0)
    model(x)
    with recorder:
        model(x)
    model(x)
    assert len(recorder.records) == 2 and len(calls) == 3
    assert len(model[1]._forward_hooks) == 1  # the other hook stays
    recorder.remove()  # a second removal does nothing


def test_recorder_records_every_call_of_a_shared_module():
    model = learner._model(0, kind="twice")
    with ref.ActivationRecorder(model.act, 1) as recorder:
        model(torch.randn(5, 5, dtype=torch.float64))
    assert len(recorder.records) == 2


# --- gradient_shift against autograd on deep copies ---------------------------

def _layer_names(model):
    return [name for name, m in model.named_modules() if len(m._parameters)]


def _oracle_gradient_shift(model, x, y, loss_fn, lr):
    """G and G' with .backward() on deep copies of the model in training mode, the
    earlier layers moved by hand."""
    def grads(m):
        m.train()
        m.zero_grad()
        loss_fn(m(x), y).backward()
        return {name: p.grad.clone() for name, p in m.named_parameters()}

    base = grads(copy.deepcopy(model))
    names = _layer_names(model)
    distances, cosines = [], []
    for i, layer in enumerate(names):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if name.rsplit(".", 1)[0] in names[:i]:
                    p -= lr * base[name]
        after = grads(moved)
        g, g2 = base[f"{layer}.weight"].flatten(), after[f"{layer}.weight"].flatten()
        distances.append(float((g - g2).norm()))
        cosines.append(float(F.cosine_similarity(g, g2, dim=0)))
    return np.array(distances), np.array(cosines)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("lr", [0.05, 0.7])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_shift_matches_autograd_on_copies(bn, lr, mode):
    model = _mlp(bn=bn).train(mode == "train")
    x, y = _batch(5, 12)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model)
    distances, cosines = ref.gradient_shift(model, x, y, F.cross_entropy, lr)
    _assert_unchanged(model, before)
    expected_d, expected_c = _oracle_gradient_shift(model, x, y, F.cross_entropy, lr)
    assert len(distances) == len(_layer_names(model)) == (5 if bn else 3)
    np.testing.assert_allclose(distances, expected_d, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(cosines, expected_c, rtol=1e-12)
    assert distances[0] == 0 and cosines[0] == pytest.approx(1.0)


def test_gradient_shift_of_a_cnn_with_mse():
    model = learner._model(3, kind="cnn")
    x, target = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ours = ref.gradient_shift(model, x, target, F.mse_loss, 0.2)
    for a, b in zip(ours, _oracle_gradient_shift(model, x, target, F.mse_loss, 0.2)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


def test_gradient_shift_is_zero_without_a_step_and_first_order_in_lr():
    """lr = 0 moves nothing; for a small lr, G' - G is linear in lr (a first-order Taylor
    expansion of the gradient), so the distance doubles with lr."""
    model, (x, y) = _mlp(bn=True), _batch(7, 16)
    d0, c0 = ref.gradient_shift(model, x, y, F.cross_entropy, 0.0)
    assert np.all(d0 == 0) and np.allclose(c0, 1.0)
    d1, _ = ref.gradient_shift(model, x, y, F.cross_entropy, 1e-5)
    d2, _ = ref.gradient_shift(model, x, y, F.cross_entropy, 2e-5)
    np.testing.assert_allclose(d2[1:], 2 * d1[1:], rtol=1e-3)


# --- NoisyBatchNorm1d against nn.BatchNorm1d plus noise drawn by hand ---------

@pytest.mark.parametrize("shape", [(8, 4), (2, 3), (5, 3, 6)])
@pytest.mark.parametrize("kwargs", [{}, {"noise_mean": 0.5, "noise_std": 2.0, "eps": 1e-3, "momentum": 0.3},
                                    {"noise_mean": 0.0, "noise_std": 0.0, "momentum": None}])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_noisy_batchnorm_is_batchnorm_plus_the_specified_noise(shape, kwargs, dtype):
    c = shape[1]
    bn_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("noise")}
    noisy = ref.NoisyBatchNorm1d(c, torch.Generator().manual_seed(3), **kwargs, dtype=dtype)
    plain = nn.BatchNorm1d(c, **bn_kwargs, dtype=dtype)
    with torch.no_grad():
        for layer in (noisy, plain):
            layer.weight.copy_(torch.linspace(0.5, 2.0, c))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, c))
    hand = torch.Generator().manual_seed(3)
    a, b = kwargs.get("noise_mean", 1.0), kwargs.get("noise_std", 1.0)
    view = (1, c) + (1,) * (len(shape) - 2)
    for step, mode in enumerate(["train", "train", "eval", "train"]):
        noisy.train(mode == "train")
        plain.train(mode == "train")
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = noisy(x1), plain(x2)
        if mode == "train":  # the draws of the docstring, in order
            mean = a * (2 * torch.rand(c, generator=hand, dtype=dtype) - 1)
            std = b * torch.rand(c, generator=hand, dtype=dtype)
            expected = expected + mean.view(view) + std.view(view) * torch.randn(shape, generator=hand, dtype=dtype)
        torch.testing.assert_close(out, expected)
        dout = torch.randn(shape, dtype=dtype)
        (out * dout).sum().backward()
        (expected * dout).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
        torch.testing.assert_close(noisy.weight.grad, plain.weight.grad)
        torch.testing.assert_close(noisy.running_var, plain.running_var)
        noisy.zero_grad()
        plain.zero_grad()
    assert torch.equal(noisy.generator.get_state(), hand.get_state())  # eval drew nothing


def test_noisy_batchnorm_noise_has_the_drawn_mean_and_spread_and_changes_every_step():
    gen = torch.Generator().manual_seed(0)
    layer = ref.NoisyBatchNorm1d(3, gen, noise_mean=2.0, noise_std=3.0, dtype=torch.float64)
    x = torch.randn(200000, 3, dtype=torch.float64)
    state = gen.get_state()
    noise = layer(x) - F.batch_norm(x, None, None, training=True)
    probe = torch.Generator().manual_seed(0)
    probe.set_state(state)
    mean = 2.0 * (2 * torch.rand(3, generator=probe, dtype=torch.float64) - 1)
    std = 3.0 * torch.rand(3, generator=probe, dtype=torch.float64)
    torch.testing.assert_close(noise.mean(dim=0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(noise.std(dim=0), std, atol=0.03, rtol=0)
    assert not torch.allclose(layer(x[:10]), layer(x[:10]))
    assert "noise_mean=2.0, noise_std=3.0" in repr(layer)


def test_activation_noise_is_noisy_batchnorms_noise_without_the_normalization():
    """Santurkar et al.'s control: the same draws from the same generator, added to the input."""
    x = torch.randn(9, 4, dtype=torch.float64) * 3 + 1
    noise = ref.ActivationNoise(4, torch.Generator().manual_seed(5), noise_mean=0.5, noise_std=2.0)
    noisy_bn = ref.NoisyBatchNorm1d(4, torch.Generator().manual_seed(5), noise_mean=0.5, noise_std=2.0,
                                    dtype=torch.float64)
    added = noise(x) - x
    torch.testing.assert_close(added, noisy_bn(x) - F.batch_norm(x, None, None, training=True))
    assert not torch.equal(noise(x) - x, added)  # a new distribution at every call
    assert torch.equal(noise.eval()(x), x) and "noise_mean=0.5" in repr(noise)
    with pytest.raises(ValueError, match=r"ActivationNoise\(4\) got an input of shape \(9, 3\)"):
        noise.train()(x[:, :3])


# --- loss_along_gradient against copies and a Taylor expansion ----------------

def _oracle_along(model, x, y, loss_fn, step_sizes):
    base = copy.deepcopy(model).train()
    loss_fn(base(x), y).backward()
    losses, norms = [], []
    for eta in step_sizes:
        probe = copy.deepcopy(base)
        with torch.no_grad():
            for p, q in zip(probe.parameters(), base.parameters()):
                p -= eta * q.grad
        probe.zero_grad()
        loss = loss_fn(probe(x), y)
        loss.backward()
        losses.append(loss.item())
        norms.append(float(torch.cat([p.grad.flatten() for p in probe.parameters()]).norm()))
    return np.array(losses), np.array(norms)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("step_sizes", [[0.0, 0.1, 1.0, 3.0], [2.0, 0.5]])
def test_loss_along_gradient_matches_copies(bn, step_sizes):
    model = _mlp(bn=bn).eval()
    x, y = _batch(11, 10)
    before = _snapshot(model)
    losses, norms = ref.loss_along_gradient(model, x, y, F.cross_entropy, step_sizes)
    _assert_unchanged(model, before)
    expected = _oracle_along(model, x, y, F.cross_entropy, step_sizes)
    np.testing.assert_allclose(losses, expected[0], rtol=1e-12)
    np.testing.assert_allclose(norms, expected[1], rtol=1e-10)


def test_loss_along_gradient_first_order_slope_is_minus_the_squared_gradient_norm():
    """L(w - eta g) = L(w) - eta ||g||^2 + O(eta^2)."""
    model, (x, y) = _mlp(bn=True), _batch(12, 20)
    eta = 1e-6
    (l0, l1), (g0, _) = ref.loss_along_gradient(model, x, y, F.cross_entropy, [0.0, eta])
    assert (l1 - l0) / eta == pytest.approx(-g0 ** 2, rel=1e-4)
    landscape = ref.landscape_along_gradient(model, x, y, F.cross_entropy, [0.0, 0.5])
    assert landscape["grad_change"][0] == 0 and landscape["step"][1] == pytest.approx(0.5 * g0)


# --- data, networks and training ----------------------------------------------

def test_digits_split_is_stratified_and_standardized_like_sklearn():
    X_train, y_train, X_test, y_test = ref.load_digits_split()
    assert X_train.shape == (1257, 64) and X_test.shape == (540, 64)
    assert X_train.dtype == torch.float32 and y_train.dtype == torch.int64
    X, y = load_digits(return_X_y=True)
    a, b, _, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(a)
    np.testing.assert_allclose(X_train.numpy(), scaler.transform(a), atol=1e-5)
    np.testing.assert_allclose(X_test.numpy(), scaler.transform(b), atol=1e-5)
    assert np.abs(np.bincount(y_test.numpy()) - 0.3 * np.bincount(y)).max() <= 1  # stratified


def test_make_mlp_is_the_paper_network_with_the_same_weights_with_and_without_bn():
    plain, with_bn = ref.make_mlp(), ref.make_mlp(nn.BatchNorm1d)
    kinds = [type(m).__name__ for m in with_bn]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert [type(m).__name__ for m in plain] == ["Linear", "Sigmoid"] * 3 + ["Linear"]
    for a, b in zip([m for m in plain if isinstance(m, nn.Linear)], [m for m in with_bn if isinstance(m, nn.Linear)]):
        assert torch.equal(a.weight, b.weight) and not b.bias.any()
    big = ref.make_mlp(init_scale=10.0)
    assert big[0].weight.std().item() == pytest.approx(10 / 8, rel=0.05)  # 10 / sqrt(64)


def test_training_is_seeded_and_measuring_changes_nothing():
    data = ref.load_digits_split()
    measured = []

    def measure(model, x, y):
        measured.append(ref.gradient_shift(model, x, y, F.cross_entropy, 0.1)[0])
        return ref.landscape_along_gradient(model, x, y, F.cross_entropy, [0.1])["loss"][0]

    runs = []
    for with_measure in (False, True):
        model = ref.make_mlp(nn.BatchNorm1d, hidden=(20, 20))
        runs.append(ref.train(model, data, 60, 0.1, eval_every=20, record=(model[-2], 3),
                              measure=measure if with_measure else None, measure_every=25))
        assert _hook_free(model)
    plain, watched = runs
    np.testing.assert_array_equal(plain["train_loss"], watched["train_loss"])
    np.testing.assert_array_equal(plain["percentiles"], watched["percentiles"])
    assert plain["percentiles"].shape == (60, 3) and list(plain["eval_steps"]) == [0, 20, 40, 60]
    assert list(watched["measure_steps"]) == [0, 25, 50] and len(measured) == 3
    assert ref.steps_to_accuracy(plain, 0.0) == 0 and ref.steps_to_accuracy(plain, 1.01) is None


def _hook_free(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_outputs_across_batches_depend_on_the_batch_only_with_bn():
    data = ref.load_digits_split()
    x, pool = data[2][0], data[0][:100]
    with_bn = ref.make_mlp(nn.BatchNorm1d, hidden=(16,)).eval()
    before = _snapshot(with_bn)
    out = ref.outputs_across_batches(with_bn, x, pool, 5, 7, seed=3)
    _assert_unchanged(with_bn, before)
    gen = torch.Generator().manual_seed(3)
    mates = pool[torch.randperm(len(pool), generator=gen)[:4]]
    with torch.no_grad():
        torch.testing.assert_close(out[0], copy.deepcopy(with_bn).train()(torch.cat([x[None], mates]))[0])
    assert out.shape == (7, 10) and out.std(dim=0).max() > 0
    plain = ref.outputs_across_batches(ref.make_mlp(hidden=(16,)), x, pool, 5, 7)
    assert plain.std(dim=0).max() == 0


def test_the_case_models_nested_and_mixed():
    nested = learner._model(0, kind="nested", bn=True)
    assert [type(m).__name__ for m in nested.children()] == ["Sequential", "Sequential", "Linear"]
    assert len(ref.parameterized_layers(nested)) == 5
    mixed = learner._model(0, bn=True, mode="mixed")
    assert learner._modes(mixed) == "4" and not mixed.training


def test_the_reference_experiment_is_the_plain_training_loop():
    """ics_experiment (through train()) against the same experiment written as a plain loop
    (the catalogue's, without a mistake), and against the second implementation at step 0."""
    ours, loop = ref.ics_experiment(3), grading._experiment(3)
    for name in ("no BN", "BN"):
        for key in ("percentiles", "distances", "cosines"):
            np.testing.assert_allclose(ours[name][key], loop[name][key], rtol=1e-6, atol=1e-9, err_msg=key)
        assert ours[name]["test_accuracy"] == loop[name]["test_accuracy"]
        assert ours[name]["percentiles"].shape == (300, 3) and ours[name]["distances"].shape == (12, 4)
        assert ours[name]["distances"][0, 0] == 0 and ours[name]["cosines"][0, 0] == pytest.approx(1.0)


#: Seeds on which the graded experiment's margins are proven (the check's hidden seed is any seed).
MARGIN_SEEDS = (0, 1, 2, 3, 4, 11)


def _slack(result):
    """How far each of the graded experiment's margins is from failing (> 0: it holds)."""
    (p0, d0, c0, a0), (p1, d1, c1, a1) = [
        (np.asarray(result[n]["percentiles"]), np.asarray(result[n]["distances"]), np.asarray(result[n]["cosines"]),
         result[n]["test_accuracy"]) for n in ("no BN", "BN")]
    return {"drift (no BN / BN - 1)": learner.percentile_drift(p0) / learner.percentile_drift(p1) - 1,
            "shift (median ratio - 1)": np.median(d1[:, 1:].mean(1) / d0[:, 1:].mean(1)) - learner.SHIFT_FACTOR,
            "turn (median ratio - 2)": np.median((1 - c1[:, 1:]).mean(1) / (1 - c0[:, 1:]).mean(1))
            - learner.TURN_FACTOR,
            "accuracy (BN - no BN)": a1 - a0}


@pytest.mark.parametrize("impl", ["reference", "second implementation"])
def test_the_experiments_margins_hold_on_every_seed(impl):
    """The graded experiment's phenomenon, with its margins, for two independently written
    correct experiments on several seeds; prints the smallest slack of each margin."""
    fn = ref.ics_experiment if impl == "reference" else alt.ics_experiment
    slacks = []
    for seed in MARGIN_SEEDS:
        result = fn(seed)
        out = learner._run_experiment(lambda s: result, grading.Case("", {"seed": seed, "steps": 300,
                                                                          "measure_every": 25}))
        assert all(v for k, v in out.items() if isinstance(v, bool)), (seed, out)
        slacks.append(_slack(result))
    smallest = {k: min(s[k] for s in slacks) for k in slacks[0]}
    print(f"{impl}, seeds {MARGIN_SEEDS}: smallest slack {smallest}")
    assert all(v > 0 for v in smallest.values())


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: ref.ActivationRecorder("not a module", 0), "torch.nn.Module"),
    (lambda: ref.ActivationRecorder(nn.Sigmoid(), -1), "non-negative integer"),
    (lambda: ref.ActivationRecorder(nn.Sigmoid(), 0, percentiles=(50, 101)), r"\[0, 100\]"),
    (lambda: ref.ActivationRecorder(nn.Sigmoid(), 0, percentiles=()), "non-empty"),
    (lambda: _record_missing_unit(), "unit 6 does not exist"),
    (lambda: ref.gradient_shift(_mlp(), *_batch(0, 4), F.cross_entropy, -0.1), "lr must be >= 0"),
    (lambda: ref.gradient_shift(nn.Sigmoid(), *_batch(0, 4), F.cross_entropy, 0.1), "no layer with parameters"),
    (lambda: ref.gradient_shift(nn.Sequential(nn.GRUCell(2, 2)), *_batch(0, 4), F.cross_entropy, 0.1),
     "none named 'weight'"),
    (lambda: ref.loss_along_gradient(_mlp(), *_batch(0, 4), F.cross_entropy, []), "non-empty"),
    (lambda: ref.loss_along_gradient(_mlp(), *_batch(0, 4), "mse", [0.1]), "loss_fn must be callable"),
    (lambda: ref.NoisyBatchNorm1d(3, 0), "torch.Generator"),
    (lambda: ref.NoisyBatchNorm1d(3, torch.Generator(), noise_std=-1), ">= 0"),
    (lambda: ref.make_mlp(init_scale=0), "init_scale must be > 0"),
    (lambda: ref.train(_mlp(), ref.load_digits_split(), 0, 0.1), "steps must be >= 1"),
    (lambda: ref.outputs_across_batches(_mlp(), torch.zeros(6), torch.zeros(3, 6), 5, 2), r"\[2, 4\]"),
])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _record_missing_unit():
    model = _mlp()
    with ref.ActivationRecorder(model[0], 6):  # model[0]'s input has 6 units, 0 to 5
        model(_batch(0, 3)[0])


# --- grading: every check fails each catalogue entry with its own name -------

class TestGrading(CatalogueSuite):
    checks = {
        "ActivationRecorder": grading.check_activation_recorder,
        "gradient_shift": grading.check_gradient_shift,
        "NoisyBatchNorm1d": grading.check_noisy_batchnorm,
        "loss_along_gradient": grading.check_loss_along_gradient,
        "ics_experiment": grading.check_ics_experiment,
    }
    catalogue = grading.CATALOGUE
    alt = alt
    reference = ref
    learner = learner


def test_the_notebook_helpers_are_the_learner_packages():
    """One implementation: the reference and the page use the learner package's helpers."""
    assert ref.load_digits_split is learner.load_digits_split and ref.make_mlp is learner.make_mlp


def test_a_recorder_that_stores_tensors_passes(capsys):
    class TensorRecorder(alt.ActivationRecorder):
        def _pre(self, module, args):
            values = args[0].detach()[:, self.unit].flatten().double()
            self.records.append(torch.quantile(values, self.q))
    grading.check_activation_recorder(TensorRecorder)
    assert "agree" in capsys.readouterr().out


def test_structural_mistakes_get_clear_messages():
    class NoSelf(alt.ActivationRecorder):
        def __enter__(self):
            pass
    with pytest.raises(CheckFailed, match="__enter__ must return self"):
        grading.check_activation_recorder(NoSelf)

    class Composed(nn.Module):
        def __init__(self, num_features, generator, **kwargs):
            super().__init__()
            self.bn = nn.BatchNorm1d(num_features, **{k: v for k, v in kwargs.items() if "noise" not in k})
    with pytest.raises(CheckFailed, match="must subclass nn.BatchNorm1d"):
        grading.check_noisy_batchnorm(Composed)
    with pytest.raises(CheckFailed, match=r"must return a pair \(distances \|\|G - G'\|\| \(one per layer\), cosines"):
        grading.check_gradient_shift(lambda model, x, y, loss_fn, lr: {"distances": [0.0]})


def test_unknown_bug_reports_where_outputs_differ():
    def a_bit_off(model, x, y, loss_fn, step_sizes):
        losses, norms = alt.loss_along_gradient(model, x, y, loss_fn, step_sizes)
        return [v * 1.001 for v in losses], norms
    with pytest.raises(CheckFailed, match=r"losses L\(w - eta \* g\): \d+ of \d+ values differ") as failure:
        grading.check_loss_along_gradient(a_bit_off)
    assert failure.value.misconception is None


def test_stub_and_crash_get_clear_messages():
    def stub(model, x, y, loss_fn, lr):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        grading.check_gradient_shift(stub)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        grading.check_gradient_shift(lambda model, x, y, loss_fn, lr: 1 / 0)


# --- real code: the model answers with one realistic change each -----------------

SOLUTION = Path(__file__).resolve().parents[1] / "solutions" / "ch2_covariate_shift" / "ch2_covariate_shift.ipynb"
_TASK_CELLS = ("activation_recorder", "gradient_shift", "noisy_batchnorm", "loss_along_gradient",
               "experiment_settings", "ics_experiment")
_NO_FINALLY = [("    try:\n        model.train()", "    if True:\n        model.train()"),
               ("    finally:\n", "    if True:\n"),
               ("            m.training = mode\n", "            m.training = mode\n    return RESULT\n")]
_ONE_FLAG = [("    saved_modes = [m.training for m in model.modules()]\n", "    was_training = model.training\n"),
             ("        for m, mode in zip(model.modules(), saved_modes):\n            m.training = mode\n",
              "        model.train(was_training)\n")]
_MEASURE = ("            if step % MEASURE_EVERY == 0:\n"
            "                d, c = gradient_shift(model, x, y, F.cross_entropy, LR)\n"
            "                distances.append(np.asarray(d)[linear])\n"
            "                cosines.append(np.asarray(c)[linear])\n")

#: (task, cell, patches, the misconception the grader must name: None for none, "passed" for a pass)
MUTANTS = {
    "recorder in float32 (torch.quantile)": ("ActivationRecorder", "activation_recorder", [(
        "values = inputs[0].detach()[:, self.unit].flatten().double().numpy()\n"
        "        self.records.append(np.percentile(values, self.percentiles))",
        "values = inputs[0].detach()[:, self.unit].flatten()\n        self.records.append(torch.quantile("
        "values, torch.tensor(self.percentiles, dtype=values.dtype) / 100).numpy())")],
        "percentiles computed in the input's dtype (float32 for a float32 model) instead of float64"),
    "recorder whose remove() does nothing": ("ActivationRecorder", "activation_recorder", [
        ("    def remove(self):\n        ### BEGIN SOLUTION\n        self.handle.remove()",
         "    def remove(self):\n        ### BEGIN SOLUTION\n        pass"),
        ("    def __exit__(self, *exc_info):\n        ### BEGIN SOLUTION\n        self.remove()",
         "    def __exit__(self, *exc_info):\n        ### BEGIN SOLUTION\n        self.handle.remove()")],
        "remove() does not remove the hook (only leaving the with block does)"),
    "recorder removing its hook on a normal exit only": ("ActivationRecorder", "activation_recorder", [(
        "    def __exit__(self, *exc_info):\n        ### BEGIN SOLUTION\n        self.remove()",
        "    def __exit__(self, exc_type, *rest):\n        ### BEGIN SOLUTION\n        if exc_type is None:\n"
        "            self.remove()")],
        "the hook is removed only when the with block ends normally: an error inside it leaves the hook behind"),
    "recorder whose __exit__ returns True": ("ActivationRecorder", "activation_recorder", [(
        "        self.remove()\n        ### END SOLUTION", "        self.remove()\n        return True\n"
        "        ### END SOLUTION")], "__exit__ returns True: it swallows the errors raised inside the with block"),
    "recorder of the module's output": ("ActivationRecorder", "activation_recorder", [(
        "values = inputs[0].detach()", "values = output.detach()")],
        "percentiles of the unit's output (after the module) instead of its input"),
    "recorder with 'lower' interpolation": ("ActivationRecorder", "activation_recorder", [(
        "np.percentile(values, self.percentiles)", "np.percentile(values, self.percentiles, method='lower')")],
        None),
    "gradient_shift never zeroing .grad": ("gradient_shift", "gradient_shift", [(
        "        model.zero_grad(set_to_none=True)\n", "")],
        "gradients accumulated between G and G' (.grad not zeroed)"),
    "gradient_shift never zeroing .grad, G'_1 = G_1 without a backward pass": ("gradient_shift", "gradient_shift", [
        ("        model.zero_grad(set_to_none=True)\n", ""),
        ("        for i, layer in enumerate(layers):\n",
         "        for i, layer in enumerate(layers):\n            if i == 0:\n                distances.append(0.0)\n"
         "                cosines.append(1.0)\n                continue\n")],
        "gradients accumulated from one layer's G' to the next (.grad not zeroed; G'_1 = G_1 taken without a "
        "backward pass)"),
    "gradient_shift with G'_1 = G_1 without a backward pass (right)": ("gradient_shift", "gradient_shift", [(
        "        for i, layer in enumerate(layers):\n",
        "        for i, layer in enumerate(layers):\n            if i == 0:\n                distances.append(0.0)\n"
        "                cosines.append(1.0)\n                continue\n")], "passed"),
    "gradient_shift over model.children()": ("gradient_shift", "gradient_shift", [(
        "layers = [m for m in model.modules()", "layers = [m for m in model.children()")],
        "layers taken from model.children() (the top level only) instead of model.modules()"),
    "gradient_shift restoring one mode flag": ("gradient_shift", "gradient_shift", _ONE_FLAG,
        "train/eval mode restored with one flag for the whole model (model.train(was_training)), not per module"),
    "gradient_shift restoring on the normal path only": ("gradient_shift", "gradient_shift", [
        *_NO_FINALLY[:2], ("        return np.array(distances), np.array(cosines)\n",
                           "        RESULT = np.array(distances), np.array(cosines)\n"), _NO_FINALLY[2]],
        "the model is restored only when the measurement ends normally: an error in loss_fn leaves it changed"),
    "gradient_shift stepping layer i too": ("gradient_shift", "gradient_shift", [(
        "for earlier in layers[:i]:", "for earlier in layers[:i + 1]:")],
        "G' computed after updating every layer (layer i included) instead of layers 1..i-1"),
    "noisy BN drawing in the default dtype": ("NoisyBatchNorm1d", "noisy_batchnorm", [
        ("generator=self.generator, dtype=y.dtype) * 2", "generator=self.generator) * 2"),
        ("generator=self.generator, dtype=y.dtype) * self", "generator=self.generator) * self"),
        ("generator=self.generator, dtype=y.dtype)\n", "generator=self.generator)\n")],
        "random numbers drawn in the default dtype (float32) instead of the layer's dtype"),
    "noisy BN drawing in the default dtype, y + (mean + std * z)": ("NoisyBatchNorm1d", "noisy_batchnorm", [
        ("generator=self.generator, dtype=y.dtype) * 2", "generator=self.generator) * 2"),
        ("generator=self.generator, dtype=y.dtype) * self", "generator=self.generator) * self"),
        ("generator=self.generator, dtype=y.dtype)\n", "generator=self.generator)\n"),
        ("return y + mean.reshape(shape) + std.reshape(shape) * z",
         "return y + (mean.reshape(shape) + std.reshape(shape) * z)")],
        "random numbers drawn in the default dtype (float32) instead of the layer's dtype"),
    "noisy BN in eval mode too": ("NoisyBatchNorm1d", "noisy_batchnorm", [(
        "        if not self.training:\n            return y\n", "")], "noise applied in eval mode too"),
    "loss_along_gradient restoring one mode flag": ("loss_along_gradient", "loss_along_gradient", _ONE_FLAG,
        "train/eval mode restored with one flag for the whole model (model.train(was_training)), not per module"),
    "loss_along_gradient restoring on the normal path only": ("loss_along_gradient", "loss_along_gradient", [
        *_NO_FINALLY[:2], ("        return losses, grad_norms\n", "        RESULT = losses, grad_norms\n"),
        _NO_FINALLY[2]],
        "the model is restored only when the measurement ends normally: an error in loss_fn leaves it changed"),
    "loss_along_gradient stepping from the previous point": ("loss_along_gradient", "loss_along_gradient", [(
        "p.copy_(w - eta * gp)", "p.sub_(eta * gp)")],
        "steps taken one after the other: each from the previous point instead of from the starting weights"),
    "experiment recording after the last hidden Linear": ("ics_experiment", "ics_experiment", [(
        "sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]",
        "sigmoid = model[[i for i, m in enumerate(model) if isinstance(m, nn.Linear)][-2] + 1]")],
        "with BN, the recorder is on the BatchNorm1d layer - whose input is the Linear layer's output, not yet "
        "normalized - instead of on the last Sigmoid"),
    "experiment recording model[-1]": ("ics_experiment", "ics_experiment", [(
        "sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]", "sigmoid = model[-1]")],
        "the recorder is on the output layer - whose input is the last Sigmoid's output, in (0, 1) - instead of "
        "on the last Sigmoid"),
    "experiment measuring after the step": ("ics_experiment", "ics_experiment", [
        (_MEASURE, ""), ("            optimizer.step()\n", "            optimizer.step()\n" + _MEASURE)],
        "gradient_shift measured after the SGD step instead of before it"),
    "experiment measuring at steps 24, 49, ...": ("ics_experiment", "ics_experiment", [(
        "if step % MEASURE_EVERY == 0:", "if (step + 1) % MEASURE_EVERY == 0:")], None),
    "experiment with lr=0.1 for gradient_shift": ("ics_experiment", "ics_experiment", [(
        "gradient_shift(model, x, y, F.cross_entropy, LR)", "gradient_shift(model, x, y, F.cross_entropy, 0.1)")],
        "gradient_shift called with another lr than the training learning rate"),
    "experiment with one recorder for the whole run": ("ics_experiment", "ics_experiment", [
        ("        for step in range(STEPS):\n",
         "        recorder = ActivationRecorder(sigmoid, UNIT)\n        for step in range(STEPS):\n"),
        ("            with ActivationRecorder(sigmoid, UNIT) as recorder:\n"
         "                loss = F.cross_entropy(model(x), y)\n            percentiles += recorder.records\n",
         "            loss = F.cross_entropy(model(x), y)\n"),
        ("        model.eval()\n", "        recorder.remove()\n        percentiles = recorder.records\n"
                                 "        model.eval()\n")],
        "the recorder stays open while gradient_shift runs, so it also records gradient_shift's forward passes"),
    "experiment with one generator for both networks": ("ics_experiment", "ics_experiment", [
        ("    results = {}\n", "    results = {}\n    gen = torch.Generator().manual_seed(seed)\n"),
        ("        gen = torch.Generator().manual_seed(seed)\n", "")],
        "one batch generator for both networks: the BN network trains on other batches than the plain one"),
    "experiment without the seed in make_mlp": ("ics_experiment", "ics_experiment", [(
        "make_mlp(norm_layer, seed=seed)", "make_mlp(norm_layer)")],
        "the networks are not built from the seed (make_mlp(..., seed=seed))"),
    "experiment keeping every layer's values": ("ics_experiment", "ics_experiment", [
        ("distances.append(np.asarray(d)[linear])", "distances.append(np.asarray(d))"),
        ("cosines.append(np.asarray(c)[linear])", "cosines.append(np.asarray(c))")],
        "distances and cosines of every layer with parameters (BN layers included) instead of the 4 Linear layers"),
}


def _notebook_namespace(cell=None, patches=()):
    """The model answers' task cells, run in a fresh namespace, with ``patches`` applied to ``cell``."""
    nb = nbformat.read(SOLUTION, as_version=4)
    namespace = {"np": np, "torch": torch, "nn": nn, "F": F, "load_digits_split": learner.load_digits_split,
                 "make_mlp": learner.make_mlp}
    threads = torch.get_num_threads()
    for c in nb.cells:
        grade_id = c.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id not in _TASK_CELLS:
            continue
        source = c.source
        for old, new in patches if grade_id == cell else ():
            assert source.count(old) == 1, (grade_id, old)
            source = source.replace(old, new)
        exec(compile(source, f"<notebook cell {grade_id}>", "exec"), namespace)
    torch.set_num_threads(threads)
    return namespace


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_real_code_gets_the_right_name_or_none(mutant):
    """Each realistic change of the model answers is named with its own misconception (or, when
    no entry reproduces it, with none - never with a wrong one); the unchanged answers pass."""
    task, cell, patches, expected = MUTANTS[mutant]
    student = _notebook_namespace(cell, patches)[task]
    assert _verdict_of(TestGrading.checks[task], student) == expected


def _verdict_of(check, student):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check(student)
    except CheckFailed as failure:
        return failure.misconception
    return "passed"


def test_the_model_answers_pass_every_check():
    namespace = _notebook_namespace()
    for task, check in TestGrading.checks.items():
        assert _verdict_of(check, namespace[task]) == "passed", task


# --- the nbgrader cycle -------------------------------------------------------

class TestNbgraderCycle(CycleSuite):
    slug = "ch2_covariate_shift"
    full_score = 12
    stubs = 9
    buggy = {  # student -> patches of the model answers, and the misconception the grader must name
        "recorder_output": (
            [("values = inputs[0].detach()[:, self.unit]", "values = output.detach()[:, self.unit]")],
            "percentiles of the unit's output (after the module) instead of its input"),
        "all_layers": (
            [("for earlier in layers[:i]:", "for earlier in layers[:i + 1]:")],
            "G' computed after updating every layer (layer i included) instead of layers 1..i-1"),
        "noise_in_eval": (
            [("        if not self.training:\n            return y\n", "")],
            "noise applied in eval mode too"),
        "cumulative_steps": (
            [("p.copy_(w - eta * gp)", "p.sub_(eta * gp)")],
            "steps taken one after the other: each from the previous point instead of from the starting weights"),
        "recorder_on_output_layer": (
            [("        sigmoid = [m for m in model if isinstance(m, nn.Sigmoid)][-1]", "        sigmoid = model[-1]")],
            "the recorder is on the output layer - whose input is the last Sigmoid's output, in (0, 1) - instead of "
            "on the last Sigmoid"),
    }
