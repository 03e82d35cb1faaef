"""Chapter 2 - internal covariate shift: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.covariate_shift``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more edge cases).

The ``_run_*`` functions are the only code that touches the learner's object
(the class grader runs them in its sandbox): they build the case's small model
from a seed with this module's factories, hand it to the learner's code, and
return plain data - the measured values, then whether the model was left as it
was found (parameters, buffers, ``.grad``, train/eval modes, hooks). Models are
tiny (a few dozen weights), float64 unless a case says float32.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import covariate_shift as ref
from . import Case, CheckFailed, Misconception, report_pass, run_check

__all__ = [
    "check_activation_recorder",
    "check_gradient_shift",
    "check_noisy_batchnorm",
    "check_loss_along_gradient",
    "CATALOGUE",
    "PROVIDED",
]

#: Helpers of ``bn_reference.covariate_shift`` that the exercise notebook imports.
PROVIDED = ("load_digits_split", "make_mlp")

_FLOAT32 = {"rtol": 1e-4, "atol": 1e-6}


# --------------------------------------------------------------------------
# The cases' models, built from a seed inside ``run`` (never shared between runs)

class _Twice(nn.Module):
    """Linear -> Sigmoid -> Linear -> the *same* Sigmoid -> Linear: one module, two calls."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.out(self.act(self.second(self.act(self.first(x)))))


def _randomize(model, gen, scale=1.0):
    """Random weights (N(0, scale^2 / fan_in)), biases, BN gamma (around 1), beta and
    running statistics away from their defaults, so nothing sits at 0 or 1."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype))
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * scale / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))


def _model(seed, kind="mlp", sizes=(5, 8, 6, 3), bn=False, bias=True, dtype="float64", mode="train",
           old_grads=False, dead_unit=None, scale=2.0):
    """A small seeded model: an MLP (Linear -> [BatchNorm1d] -> Sigmoid per hidden layer),
    a CNN (Conv2d(2, 3, 3) -> BatchNorm2d -> ReLU -> Flatten -> Linear(27, 4)) or ``_Twice``.
    ``mode`` is its train/eval mode; ``old_grads`` fills every ``.grad`` with random
    values; ``dead_unit`` zeroes that row of the first Linear (a constant unit)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    elif kind == "twice":
        model = _Twice()
    else:
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers += [nn.BatchNorm1d(b)] if bn else []
                layers.append(nn.Sigmoid())
        model = nn.Sequential(*layers)
    model = model.to(getattr(torch, dtype))
    _randomize(model, gen, scale)
    if dead_unit is not None:
        with torch.no_grad():
            model[0].weight[dead_unit] = 0.0
    model.train(mode == "train")
    if old_grads:
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    return model


def _batch(seed, shape, n_classes=3, dtype="float64", regression=False):
    """(x, y): a seeded input batch and targets (class labels, or (N, 4) regression targets)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 1.5 + 0.3).astype(dtype)
    y = rng.normal(size=(shape[0], 4)).astype(dtype) if regression else rng.integers(0, n_classes, size=shape[0])
    return x, y


def _cross_entropy(output, target):
    return F.cross_entropy(output, target)


def _mse(output, target):
    return F.mse_loss(output, target)


# --------------------------------------------------------------------------
# Observing a model: what run() reports besides the measured values

def _state(model):
    """Copies of everything a measurement must leave as it was."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
    }


def _same(a, b):
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and torch.equal(x, y))
        for x, y in zip(a, b))


def _left_as_found(before, model):
    after = _state(model)
    return {
        "parameters left unchanged": _same(before["params"], after["params"]),
        "buffers (BN running statistics) left unchanged": _same(before["buffers"], after["buffers"]),
        ".grad of every parameter left unchanged": _same(before["grads"], after["grads"]),
        "train/eval mode of every module left unchanged": before["modes"] == after["modes"],
    }


def _numbers(values, what):
    """A learner's sequence of numbers (list, array, tensor, list of 0-d tensors) as a
    float64 array, or a CheckFailed saying what was expected."""
    try:
        if isinstance(values, torch.Tensor):
            return values.detach().cpu().double().numpy()
        return np.array([float(v.detach()) if isinstance(v, torch.Tensor) else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"{what} must be a sequence of numbers (a list, a NumPy array or a 1-D tensor), "
                          f"got {type(values).__name__}: {exc}") from None


def _pair(result, task, names):
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise CheckFailed(f"{task} must return a pair ({names[0]}, {names[1]}), got {type(result).__name__}.")
    return [_numbers(v, f"{task}'s {name}") for v, name in zip(result, names)]


# --------------------------------------------------------------------------
# ActivationRecorder: wrong recorders, one switchable mistake each

class _WrongRecorder:
    """A percentile recorder with one switchable mistake."""

    def __init__(self, module, unit, percentiles=(15, 50, 85), bug=None):
        self.module, self.unit, self.q, self.bug = module, unit, list(percentiles), bug
        self.records = []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = (output if self.bug == "output" else inputs[0]).detach().double()
        if self.bug == "all_units":
            values = x.flatten()
        elif self.bug == "batch_means":
            values = x.mean(dim=0).flatten()
        elif self.bug == "example":
            values = x[self.unit].flatten()
        else:
            values = x[:, self.unit].flatten()
        method = {"nearest": "nearest", "nearest_rank": "inverted_cdf"}.get(self.bug, "linear")
        self.records.append(np.percentile(values.numpy(), self.q, method=method))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bug == "clear_all":
            self.module._forward_hooks.clear()
        elif self.bug != "kept":
            self.handle.remove()


RECORDER_CATALOGUE = [
    Misconception(
        "percentiles of the unit's output (after the module) instead of its input",
        "the paper's Fig. 1 shows the input of the sigmoid, before the nonlinearity: in a forward hook "
        "hook(module, inputs, output) use inputs[0], not output.",
        partial(_WrongRecorder, bug="output")),
    Misconception(
        "percentiles over all units instead of one unit's values",
        "take the values of the chosen unit only, x[:, unit] (for a (N, C, H, W) map, x[:, unit] holds the "
        "channel's N*H*W values), then np.percentile of those.",
        partial(_WrongRecorder, bug="all_units")),
    Misconception(
        "percentiles of the units' batch means (x.mean(axis=0)) instead of one unit's values",
        "the distribution of one unit's input over the batch is x[:, unit]: do not average over the batch first.",
        partial(_WrongRecorder, bug="batch_means")),
    Misconception(
        "x[unit] (one example's values) instead of x[:, unit] (one unit's values over the batch)",
        "axis 0 is the batch, axis 1 the units: the values of unit j are x[:, j].",
        partial(_WrongRecorder, bug="example")),
    Misconception(
        "hooks not removed: the recorder keeps recording after the with block",
        "keep the handle that register_forward_hook returns and call handle.remove() in __exit__ "
        "(and in remove()).",
        partial(_WrongRecorder, bug="kept")),
    Misconception(
        "every forward hook of the module removed, not only the recorder's own",
        "module._forward_hooks.clear() also removes other code's hooks: remove only your own, "
        "with the handle that register_forward_hook returned.",
        partial(_WrongRecorder, bug="clear_all")),
    Misconception(
        "percentiles by interpolation 'nearest' instead of NumPy's default (linear)",
        "use np.percentile(values, percentiles) with its default method='linear' (torch.quantile's default "
        "interpolation='linear' agrees), as the checks and the chapter do.",
        partial(_WrongRecorder, bug="nearest")),
    Misconception(
        "nearest-rank percentiles (the sorted value at rank ceil(q/100 * n)) instead of NumPy's default "
        "(linear interpolation)",
        "np.percentile(values, percentiles) interpolates linearly between the two nearest sorted values; "
        "the textbook nearest-rank definition is NumPy's method='inverted_cdf'.",
        partial(_WrongRecorder, bug="nearest_rank")),
]


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _rows(records, n_percentiles):
    """The learner's ``records`` as a (calls, P) float64 array."""
    if not isinstance(records, (list, tuple)):
        raise CheckFailed(f"ActivationRecorder's records must be a list (one entry per call), "
                          f"got {type(records).__name__}.")
    rows = [_numbers(np.atleast_1d(r) if not isinstance(r, torch.Tensor) else r.reshape(-1),
                     "each entry of records") for r in records]
    if any(r.shape != (n_percentiles,) for r in rows):
        raise CheckFailed(f"each entry of ActivationRecorder's records must hold the {n_percentiles} "
                          f"percentiles of one call, got shapes {sorted({r.shape for r in rows})}.")
    return np.array(rows).reshape(len(rows), n_percentiles)


def _run_recorder(cls, case):
    """Record through the learner's class inside a with block, then call the model once more."""
    d = case.data
    model = d["make"]()
    module = model.get_submodule(d["module"])
    own_calls = []
    module.register_forward_hook(lambda m, inputs, output: own_calls.append(1))  # the check's hook must survive
    kwargs = {} if d["percentiles"] is None else {"percentiles": d["percentiles"]}
    with torch.set_grad_enabled(d["grad"]):
        with cls(module, d["unit"], **kwargs) as recorder:
            if recorder is None:
                raise CheckFailed("`with ActivationRecorder(...) as recorder` gave None: __enter__ must "
                                  "return self.")
            for x in d["batches"]:
                model(torch.from_numpy(x))
        calls = len(own_calls)
        n = len(recorder.records)
        model(torch.from_numpy(d["batches"][0]))
    n_percentiles = 3 if d["percentiles"] is None else len(d["percentiles"])
    return {
        "records (one row of percentiles per call)": _rows(recorder.records[:n], n_percentiles),
        "records added by a call after the with block": len(recorder.records) - n,
        "forward hooks on the model after the with block (the check's own included)": _hook_count(model),
        "the check's own hook on the module still runs": len(own_calls) == calls + 1,
    }


def _recorder_cases(hidden):
    s = 1100 if hidden else 100

    def case(label, make, module, unit, shapes, percentiles=None, grad=True, dtype="float64"):
        batches = [_batch(s + i, shape, dtype=dtype)[0] for i, shape in enumerate(shapes)]
        data = {"make": make, "module": module, "unit": unit, "percentiles": percentiles, "batches": batches,
                "grad": grad}
        return Case(label, {**data, **(_FLOAT32 if dtype == "float32" else {})})

    cases = [
        case("MLP Linear(5, 8)-Sigmoid-Linear(8, 6)-Sigmoid-Linear(6, 3): the input of the last Sigmoid "
             "(model[3]), unit 2, default percentiles, 3 batches of 12",
             partial(_model, s), "3", 2, [(12, 5)] * 3),
        case("the MLP with BatchNorm1d before each Sigmoid: the input of the first Sigmoid (model[2]), unit 0, "
             "percentiles (5, 25, 50, 75, 95), batches of 9, 2 and 20",
             partial(_model, s + 1, bn=True), "2", 0, [(9, 5), (2, 5), (20, 5)], percentiles=(5, 25, 50, 75, 95)),
        case("CNN Conv2d(2, 3, 3)-BatchNorm2d(3)-ReLU-Flatten-Linear: the input of the ReLU (model[2]), "
             "channel 1 of a (4, 3, 3, 3) map: the channel's values over N, H and W; percentiles [10, 90]",
             partial(_model, s + 2, kind="cnn"), "2", 1, [(4, 2, 5, 5), (3, 2, 5, 5)], percentiles=[10, 90]),
        case("float32 MLP in eval mode under torch.no_grad(), unit 4 of the first Linear's output has zero "
             "weights (a constant input): the input of model[1], percentiles (0, 50, 100)",
             partial(_model, s + 3, dtype="float32", mode="eval", dead_unit=4), "1", 4, [(7, 5), (10, 5)],
             percentiles=(0, 50, 100), grad=False, dtype="float32"),
    ]
    if hidden:
        cases += [
            case("one Sigmoid module called twice in each forward pass: two records per forward",
                 partial(_model, s + 4, kind="twice"), "act", 5, [(8, 5), (6, 5)]),
            case("MLP with BatchNorm1d, batch of 2, the last unit, percentiles (50,)",
                 partial(_model, s + 5, bn=True), "5", 5, [(2, 5), (2, 5), (2, 5)], percentiles=(50,)),
            case("MLP, 4 batches of 15, unit 7 of the first Sigmoid, percentiles (1, 33.3, 66.7, 99)",
                 partial(_model, s + 6, scale=4.0), "1", 7, [(15, 5)] * 4, percentiles=(1, 33.3, 66.7, 99)),
        ]
    return cases


def check_activation_recorder(ActivationRecorder, hidden=False):
    """Check ActivationRecorder(module, unit, percentiles=(15, 50, 85)): records, hooks removed."""
    __tracebackhide__ = True
    report_pass("ActivationRecorder", run_check(
        "ActivationRecorder", ActivationRecorder, ref.ActivationRecorder, _recorder_cases(hidden),
        _run_recorder, RECORDER_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# gradient_shift: a plain .backward() implementation with switchable mistakes

def _layers(model):
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


def _restore(model, before, bug):
    with torch.no_grad():
        if bug != "not_restored":
            for p, w in zip(model.parameters(), before["params"]):
                p.copy_(w)
        if bug != "running_stats":
            for b, v in zip(model.buffers(), before["buffers"]):
                b.copy_(v)
    if bug != "grads_not_restored":
        for p, g in zip(model.parameters(), before["grads"]):
            p.grad = g
    if bug != "mode_not_restored":
        for m, mode in zip(model.modules(), before["modes"]):
            m.training = mode


def _gradient_shift(model, x, y, loss_fn, lr, bug=None):
    """Santurkar et al.'s G and G' per layer with one switchable mistake."""
    before = _state(model)
    params, layers = list(model.parameters()), _layers(model)
    if bug == "no_bn_layers":
        layers = [m for m in layers if isinstance(m, (nn.Linear, nn.Conv2d))]
    if bug != "measured_in_eval":
        model.train()
    n = len(x) // 2
    (x1, y1), (x2, y2) = ((x[:n], y[:n]), (x[n:], y[n:])) if bug == "other_batch" else ((x, y), (x, y))
    model.zero_grad(set_to_none=True)
    loss_fn(model(x1), y1).backward()
    g = [p.grad.clone() for p in params]
    distances, cosines = [], []
    for i, layer in enumerate(layers):
        stepped = {"all_layers": layers[:i + 1], "no_layer": []}.get(bug, layers[:i])
        moved = {id(p) for m in stepped for p in m.parameters(recurse=False)}
        with torch.no_grad():
            for p, w, gp in zip(params, before["params"], g):
                p.copy_(w - lr * gp if id(p) in moved else w)
        if bug != "accumulated":
            model.zero_grad(set_to_none=True)
        loss_fn(model(x2), y2).backward()
        G, G2 = g[[id(p) for p in params].index(id(layer.weight))].flatten(), layer.weight.grad.flatten()
        diff = G - G2
        distances.append(float(diff @ diff) if bug == "squared" else float(diff.norm()))
        cosines.append(float(G @ G2 / (G.norm() * G2.norm())))
    _restore(model, before, bug)
    return distances, cosines


def _left_as_found_fix(what):
    return (f"save {what} before measuring and put it back afterwards (or measure on copy.deepcopy(model)): "
            f"gradient_shift and loss_along_gradient must leave the model exactly as they found it.")


_MODEL_STATE_MISTAKES = [
    ("weights not restored: the model keeps the SGD step taken for G'",
     _left_as_found_fix("every parameter (p.detach().clone())"), "not_restored"),
    ("BN running statistics changed: the training-mode forward passes updated them and they were not restored",
     _left_as_found_fix("the buffers (running_mean, running_var, num_batches_tracked; model.buffers())"),
     "running_stats"),
    (".grad left changed: the gradients computed for the measurement were left in the model",
     _left_as_found_fix("each parameter's .grad (None or a tensor)"), "grads_not_restored"),
    ("train/eval mode not restored: the model is left in training mode",
     "remember every module's training flag ([m.training for m in model.modules()]) and set it back at the end.",
     "mode_not_restored"),
    ("measured in eval mode: BN used its running statistics instead of the batch's",
     "the measurement is about training: call model.train() first (BN then normalizes with the batch's "
     "statistics), and restore each module's mode at the end.", "measured_in_eval"),
]

GRADIENT_SHIFT_CATALOGUE = [
    Misconception(
        "G' computed after updating every layer (layer i included) instead of layers 1..i-1",
        "Santurkar et al. move only the layers *before* layer i: for G'_i step the parameters of layers "
        "1..i-1 and keep layer i (and the layers after it) where they were.",
        partial(_gradient_shift, bug="all_layers")),
    Misconception(
        "G' computed without updating any layer (G' = G)",
        "before computing G'_i, take the SGD step W_j - lr * G_j on every parameter of layers 1..i-1 "
        "(the gradients at the current point); only layer 1's G' equals its G.",
        partial(_gradient_shift, bug="no_layer")),
    Misconception(
        "gradients accumulated between G and G' (.grad not zeroed)",
        "backward() adds to .grad: call model.zero_grad() (or set p.grad = None) before each backward pass, "
        "or use torch.autograd.grad, which returns the gradients without storing them.",
        partial(_gradient_shift, bug="accumulated")),
    Misconception(
        "G' computed on another batch than G (here G on the first half of x, G' on the second half)",
        "G, the SGD step and G' all use the same batch (x, y): the measure isolates the change caused by "
        "updating the earlier layers, not by new data.",
        partial(_gradient_shift, bug="other_batch")),
    Misconception(
        "only the Linear/Conv layers measured (and stepped): BN layers skipped",
        "a layer is every module that owns parameters, BN layers included (their weight is gamma): "
        "[m for m in model.modules() if len(list(m.parameters(recurse=False))) > 0]; the SGD step for G'_i "
        "moves every parameter of all the layers before layer i.",
        partial(_gradient_shift, bug="no_bn_layers")),
    Misconception(
        "squared distance ||G - G'||^2 instead of the L2 distance ||G - G'||",
        "take the square root: torch.linalg.norm(G - G2) (or ((G - G2) ** 2).sum().sqrt()).",
        partial(_gradient_shift, bug="squared")),
    *[Misconception(name, fix, partial(_gradient_shift, bug=bug)) for name, fix, bug in _MODEL_STATE_MISTAKES],
]


def _run_gradient_shift(fn, case):
    d = case.data
    model = d["make"]()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    before = _state(model)
    distances, cosines = _pair(fn(model, x, y, d["loss_fn"], d["lr"]), "gradient_shift", ("distances", "cosines"))
    return {"distances ||G - G'|| (one per layer)": distances, "cosines cos(G, G') (one per layer)": cosines,
            **_left_as_found(before, model)}


def _measure_cases(hidden, step_sizes=None):
    """Cases shared by gradient_shift (an ``lr`` each) and loss_along_gradient
    (``step_sizes``, one list per case, instead)."""
    s = 1200 if hidden else 200
    specs = [  # label, model factory, input shape, lr, loss
        ("MLP Linear(5, 8)-Sigmoid-Linear(8, 6)-Sigmoid-Linear(6, 3), float64, a batch of 12, cross-entropy; "
         "the model in training mode, no .grad yet", partial(_model, s), (12, 5), 0.5, "ce"),
        ("the MLP with BatchNorm1d before each Sigmoid (gamma, beta and running statistics away from their "
         "defaults), a batch of 10; the model in eval mode, every .grad holding old values",
         partial(_model, s + 1, bn=True, mode="eval", old_grads=True), (10, 5), 0.2, "ce"),
        ("CNN Conv2d(2, 3, 3)-BatchNorm2d(3)-ReLU-Flatten-Linear(27, 4) on a (6, 2, 5, 5) input, "
         "mean-squared-error loss", partial(_model, s + 2, kind="cnn"), (6, 2, 5, 5), 0.05, "mse"),
        ("float32 MLP with BatchNorm1d, the smallest batch (2)",
         partial(_model, s + 3, bn=True, dtype="float32"), (2, 5), 1.0, "ce"),
    ]
    if hidden:
        specs += [
            ("MLP without biases, 5 Linear layers, a batch of 7; eval mode, old .grad",
             partial(_model, s + 4, sizes=(5, 7, 6, 5, 4, 3), bias=False, mode="eval", old_grads=True),
             (7, 5), 0.3, "ce"),
            ("MLP with BatchNorm1d, a batch of 16, a small step", partial(_model, s + 5, bn=True, scale=3.0),
             (16, 5), 0.01, "ce"),
            ("CNN, eval mode with old .grad, a (3, 2, 5, 5) input",
             partial(_model, s + 6, kind="cnn", mode="eval", old_grads=True), (3, 2, 5, 5), 0.4, "mse"),
            ("MLP with lr=0: nothing moves, so G' = G for every layer", partial(_model, s + 7), (9, 5), 0.0, "ce"),
        ]
    cases = []
    for k, (label, make, shape, lr, loss) in enumerate(specs):
        dtype = "float32" if label.startswith("float32") else "float64"
        x, y = _batch(s + 50 + k, shape, dtype=dtype, regression=loss == "mse")
        # float32: sums of ~100 rounded products; a distance that is 0 in exact arithmetic (with a batch of
        # 2, BN's output is +-1 whatever the layers before it do) comes out as rounding noise of ~1e-6
        data = {"make": make, "x": x, "y": y, "loss_fn": _mse if loss == "mse" else _cross_entropy,
                **({"rtol": 1e-4, "atol": 2e-5} if dtype == "float32" else {})}
        data.update({"step_sizes": step_sizes[k]} if step_sizes else {"lr": lr})
        cases.append(Case(label if step_sizes is None else f"{label.split(' with lr=0')[0]}; step sizes {step_sizes[k]}",
                          data))
    return cases


def check_gradient_shift(gradient_shift, hidden=False):
    """Check gradient_shift(model, x, y, loss_fn, lr) -> (distances, cosines), model left as found."""
    __tracebackhide__ = True
    cases = _measure_cases(hidden)
    report_pass("gradient_shift", run_check(
        "gradient_shift", gradient_shift, ref.gradient_shift, cases, _run_gradient_shift,
        GRADIENT_SHIFT_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# NoisyBatchNorm1d: a BN subclass with switchable mistakes

class _WrongNoisyBatchNorm1d(nn.BatchNorm1d):
    """BN followed by time-varying noise, with one switchable mistake."""

    def __init__(self, num_features, generator, noise_mean=1.0, noise_std=1.0, bug=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.generator, self.a, self.b, self.bug = generator, noise_mean, noise_std, bug
        if bug == "drawn_once":
            self.fixed = self.draw(kwargs.get("dtype") or torch.get_default_dtype())

    def draw(self, dtype):
        dtype = torch.get_default_dtype() if self.bug == "default_dtype" else dtype
        u = torch.rand(self.num_features, generator=self.generator, dtype=dtype)
        v = torch.rand(self.num_features, generator=self.generator, dtype=dtype)
        mean, std = (self.a * (2 * v - 1), self.b * u) if self.bug == "order" else (self.a * (2 * u - 1), self.b * v)
        return mean, std

    def noise(self, like):
        mean, std = self.fixed if self.bug == "drawn_once" else self.draw(like.dtype)
        shape = (1, -1) + (1,) * (like.dim() - 2)
        z_shape = (1, like.shape[1]) + (1,) * (like.dim() - 2) if self.bug == "shared" else like.shape
        z_dtype = torch.get_default_dtype() if self.bug == "default_dtype" else like.dtype
        return mean.view(shape) + std.view(shape) * torch.randn(z_shape, generator=self.generator, dtype=z_dtype)

    def forward(self, x):
        noisy = self.training or self.bug == "in_eval"
        if self.bug == "before_bn":
            return super().forward(x + self.noise(x) if noisy else x)
        y = super().forward(x)
        return y + self.noise(y) if noisy else y


NOISY_CATALOGUE = [
    Misconception(
        "noise distribution drawn once, in __init__: its mean and variance are constant over time",
        "Santurkar et al.'s noise distribution changes at every step: draw mean and std inside forward(), "
        "at every training-mode call, then the per-activation noise.",
        partial(_WrongNoisyBatchNorm1d, bug="drawn_once")),
    Misconception(
        "noise applied before BN (to the layer's input) instead of after it",
        "BN would normalize most of the noise away: compute y = BN(x) first (super().forward(x)), then add "
        "the noise to y.",
        partial(_WrongNoisyBatchNorm1d, bug="before_bn")),
    Misconception(
        "noise applied in eval mode too",
        "the noise simulates training-time instability: add it only when self.training is True, and draw "
        "nothing in eval mode (the output is plain BN with the running statistics).",
        partial(_WrongNoisyBatchNorm1d, bug="in_eval")),
    Misconception(
        "one noise value per feature, shared by the whole batch, instead of i.i.d. noise per activation",
        "draw z with the full shape of y, torch.randn(y.shape, ...): every activation of every example "
        "gets its own noise.",
        partial(_WrongNoisyBatchNorm1d, bug="shared")),
    Misconception(
        "random numbers drawn in the default dtype (float32) instead of the layer's dtype",
        "pass dtype=y.dtype to torch.rand and torch.randn: a float64 layer must draw float64 numbers, which "
        "are different numbers from the same generator, not just more precise ones.",
        partial(_WrongNoisyBatchNorm1d, bug="default_dtype")),
    Misconception(
        "random numbers drawn in another order (std before mean)",
        "with a shared generator the order decides which number goes where: draw the mean's rand(C) first, "
        "then the std's rand(C), then randn(y.shape), as the notebook specifies.",
        partial(_WrongNoisyBatchNorm1d, bug="order")),
]


def _run_noisy(cls, case):
    """Steps of train()/eval() through the learner's layer: outputs, gradients, statistics."""
    d = case.data
    dtype = getattr(torch, d["dtype"])
    gen = torch.Generator().manual_seed(d["seed"])
    layer = cls(d["C"], gen, **d["kwargs"], dtype=dtype)
    if not isinstance(layer, nn.BatchNorm1d):
        raise CheckFailed("NoisyBatchNorm1d must subclass nn.BatchNorm1d (class NoisyBatchNorm1d(nn.BatchNorm1d)), "
                          "so that it has BN's weight, bias and running statistics.")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(d["gamma"]))
        layer.bias.copy_(torch.from_numpy(d["beta"]))
    out = {}
    for i, (mode, x, dout) in enumerate(d["steps"], 1):
        label = f"step {i} ({mode}() on a {tuple(x.shape)} batch)"
        layer.train(mode == "train")
        xt = torch.tensor(x, requires_grad=True)
        y = layer(xt)
        (y * torch.from_numpy(dout)).sum().backward()
        out[f"{label}: output"] = y.detach().clone()
        out[f"{label}: gradient of the input"] = xt.grad.clone()
        out[f"{label}: weight.grad"] = layer.weight.grad.clone()
        layer.zero_grad(set_to_none=True)
        out[f"{label}: running_mean"] = layer.running_mean.clone()
        out[f"{label}: running_var"] = layer.running_var.clone()
    out["the generator's next random number after the steps (how many numbers were drawn)"] = \
        torch.rand(1, generator=gen, dtype=torch.float64).item()
    return out


def _noisy_cases(hidden):
    rng = np.random.default_rng(1300 if hidden else 300)

    def case(label, shape, modes, kwargs=None, dtype="float64"):
        c = shape[1]
        view = (1, c) + (1,) * (len(shape) - 2)
        loc, scale = rng.uniform(-2, 2, c).reshape(view), rng.uniform(0.5, 3, c).reshape(view)
        steps = [(mode, (rng.normal(size=shape) * scale + loc).astype(dtype), rng.normal(size=shape).astype(dtype))
                 for mode in modes]
        data = {"C": c, "seed": int(rng.integers(1 << 30)), "kwargs": dict(kwargs or {}), "dtype": dtype,
                "gamma": rng.uniform(0.5, 2, c).astype(dtype), "beta": rng.normal(size=c).astype(dtype),
                "steps": steps}
        return Case(label, {**data, **(_FLOAT32 if dtype == "float32" else {})})

    cases = [
        case("(8, 4) input, noise_mean=1, noise_std=1 (the defaults), gamma and beta random: "
             "train, train, eval, train", (8, 4), ["train", "train", "eval", "train"]),
        case("(6, 3, 5) input (N, C, L), noise_mean=0.5, noise_std=2.0, eps=1e-3, momentum=0.3: "
             "train, train, eval, train", (6, 3, 5), ["train", "train", "eval", "train"],
             {"noise_mean": 0.5, "noise_std": 2.0, "eps": 1e-3, "momentum": 0.3}),
        case("(2, 5) input, the smallest batch, float32, noise_mean=2.0, noise_std=0.1: train, eval, train",
             (2, 5), ["train", "eval", "train"], {"noise_mean": 2.0, "noise_std": 0.1}, dtype="float32"),
    ]
    if hidden:
        cases += [
            case("(5, 3) input, eval first, momentum=None: eval, train, train, eval", (5, 3),
                 ["eval", "train", "train", "eval"], {"momentum": None}),
            case("(4, 6, 2) input, noise_mean=3, noise_std=0.5: train x3", (4, 6, 2), ["train"] * 3,
                 {"noise_mean": 3.0, "noise_std": 0.5}),
            case("(7, 2) input, noise_mean=0, noise_std=0 (no noise, but the numbers are still drawn): "
                 "train, eval, train", (7, 2), ["train", "eval", "train"], {"noise_mean": 0.0, "noise_std": 0.0}),
        ]
    return cases


def check_noisy_batchnorm(NoisyBatchNorm1d, hidden=False):
    """Check NoisyBatchNorm1d(num_features, generator, noise_mean=1.0, noise_std=1.0, **kwargs)."""
    __tracebackhide__ = True
    report_pass("NoisyBatchNorm1d", run_check(
        "NoisyBatchNorm1d", NoisyBatchNorm1d, ref.NoisyBatchNorm1d, _noisy_cases(hidden), _run_noisy,
        NOISY_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# loss_along_gradient: a .backward() implementation with switchable mistakes

def _along(model, x, y, loss_fn, step_sizes, bug=None):
    """Losses and gradient norms along the gradient direction with one switchable mistake."""
    before = _state(model)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    if bug != "measured_in_eval":
        model.train()
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    g = [p.grad.clone() for p in params]
    if bug == "normalized":
        norm = torch.sqrt(sum((t ** 2).sum() for t in g))
        g = [t / norm for t in g]
    sign = -1.0 if bug == "ascent" else 1.0
    losses, norms = [], []
    for eta in step_sizes:
        with torch.no_grad():
            for p, w, gp in zip(params, start, g):
                p.copy_((p.clone() if bug == "cumulative" else w) - sign * eta * gp)
        if bug != "accumulated":
            model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        losses.append(loss.item())
        if bug == "stale_gradient":
            norms.append(float(torch.sqrt(sum((t ** 2).sum() for t in g))))
            continue
        loss.backward()
        per_tensor = [p.grad.norm() for p in params]
        norms.append(float(sum(per_tensor)) if bug == "sum_of_norms" else float(torch.stack(per_tensor).norm()))
    _restore(model, before, bug)
    return losses, norms


LOSS_ALONG_GRADIENT_CATALOGUE = [
    Misconception(
        "steps taken one after the other: each from the previous point instead of from the starting weights",
        "every point is w - eta * g from the *same* w: restore the starting weights before each step size.",
        partial(_along, bug="cumulative")),
    Misconception(
        "gradient norm not recomputed: the starting gradient's norm repeated at every point",
        "at each point w - eta * g run a new forward and backward pass and take the norm of that gradient.",
        partial(_along, bug="stale_gradient")),
    Misconception(
        "gradients accumulated from point to point (.grad not zeroed)",
        "backward() adds to .grad: zero the gradients (model.zero_grad()) before each backward pass, or "
        "use torch.autograd.grad.",
        partial(_along, bug="accumulated")),
    Misconception(
        "steps along the unit vector g / ||g|| instead of eta * g",
        "the points are w - eta * g with the gradient itself (as an SGD step of rate eta), not its direction.",
        partial(_along, bug="normalized")),
    Misconception(
        "steps up the gradient (w + eta * g) instead of down",
        "gradient descent moves against the gradient: w - eta * g.",
        partial(_along, bug="ascent")),
    Misconception(
        "sum of the parameters' gradient norms instead of the norm of the whole gradient",
        "the gradient norm is the L2 norm of all parameters' gradients together: "
        "sqrt(sum((p.grad ** 2).sum() for p in params)), not sum(p.grad.norm()).",
        partial(_along, bug="sum_of_norms")),
    *[Misconception(name.replace(" for G'", ""), fix, partial(_along, bug=bug))
      for name, fix, bug in _MODEL_STATE_MISTAKES],
]


def _run_along(fn, case):
    d = case.data
    model = d["make"]()
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    before = _state(model)
    losses, norms = _pair(fn(model, x, y, d["loss_fn"], d["step_sizes"]), "loss_along_gradient",
                          ("losses", "grad_norms"))
    return {"losses L(w - eta * g)": losses, "gradient norms ||grad L(w - eta * g)||": norms,
            **_left_as_found(before, model)}


_STEP_SIZES = [[0.0, 0.1, 0.5, 2.0], [1.0, 0.05], [0.3], [0.0, 0.5], [0.2, 0.2, 4.0], [0.01], [0.7, 0.0], [0.0]]


def check_loss_along_gradient(loss_along_gradient, hidden=False):
    """Check loss_along_gradient(model, x, y, loss_fn, step_sizes) -> (losses, grad_norms)."""
    __tracebackhide__ = True
    report_pass("loss_along_gradient", run_check(
        "loss_along_gradient", loss_along_gradient, ref.loss_along_gradient,
        _measure_cases(hidden, _STEP_SIZES), _run_along, LOSS_ALONG_GRADIENT_CATALOGUE, hidden=hidden))


CATALOGUE = {
    "ActivationRecorder": RECORDER_CATALOGUE,
    "gradient_shift": GRADIENT_SHIFT_CATALOGUE,
    "NoisyBatchNorm1d": NOISY_CATALOGUE,
    "loss_along_gradient": LOSS_ALONG_GRADIENT_CATALOGUE,
}
