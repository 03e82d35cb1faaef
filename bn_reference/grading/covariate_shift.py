"""Chapter 2 - internal covariate shift: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.covariate_shift``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (seeded from the course's secret,
more edge cases).

The ``_run_*`` functions that touch the learner's object live in the learner
package (:mod:`bn_exercises.covariate_shift`), with the case helpers that build
each case's small model from a seed (tiny models, a few dozen weights, float64
unless a case says float32); its visible checks replay this module's visible
cases from recorded answers.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bn_exercises.covariate_shift import (_cross_entropy, _model, _mse, _run_along, _run_experiment,
                                          _run_gradient_shift, _run_noisy, _run_recorder, load_digits_split,
                                          make_mlp)

from .. import covariate_shift as ref
from . import Case, Misconception, case_rng, hidden_seed, report_pass, run_check

__all__ = [
    "check_activation_recorder",
    "check_gradient_shift",
    "check_noisy_batchnorm",
    "check_loss_along_gradient",
    "check_ics_experiment",
    "CATALOGUE",
]

_FLOAT32 = {"rtol": 1e-4, "atol": 1e-6}


def _seed(hidden, stream):
    """The base seed of a case stream: ``stream`` for the visible cases, drawn from the
    course's secret for the hidden ones."""
    return hidden_seed(f"covariate_shift {stream}") % 2 ** 31 if hidden else stream


def _batch(seed, shape, n_classes=3, dtype="float64", regression=False):
    """(x, y): a seeded input batch and targets (class labels, or (N, 4) regression targets)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * 1.5 + 0.3).astype(dtype)
    y = rng.normal(size=(shape[0], 4)).astype(dtype) if regression else rng.integers(0, n_classes, size=shape[0])
    return x, y


def _saved(model):
    """What a wrong measurement saves in order to restore it (modes as one flag per module)."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "modes": [m.training for m in model.modules()],
    }


# --------------------------------------------------------------------------
# ActivationRecorder: wrong recorders, one switchable mistake each

class _WrongRecorder:
    """A percentile recorder with one switchable mistake."""

    def __init__(self, module, unit, percentiles=(15, 50, 85), bug=None):
        self.module, self.unit, self.q, self.bug = module, unit, list(percentiles), bug
        self.records = []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        x = (output if self.bug == "output" else inputs[0]).detach()
        x = x if self.bug == "input_dtype" else x.double()
        if self.bug == "all_units":
            values = x.flatten()
        elif self.bug == "batch_means":
            values = x.mean(dim=0).flatten()
        elif self.bug == "example":
            values = x[self.unit].flatten()
        else:
            values = x[:, self.unit].flatten()
        if self.bug == "input_dtype":
            self.records.append(torch.quantile(values, torch.tensor(self.q, dtype=values.dtype) / 100).numpy())
            return
        method = {"nearest": "nearest", "nearest_rank": "inverted_cdf"}.get(self.bug, "linear")
        self.records.append(np.percentile(values.numpy(), self.q, method=method))

    def remove(self):
        if self.bug != "remove_does_nothing":
            self.handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if self.bug == "clear_all":
            self.module._forward_hooks.clear()
        elif self.bug == "remove_does_nothing":
            self.handle.remove()
        elif self.bug not in ("kept", "normal_exit_only") or exc_type is None and self.bug == "normal_exit_only":
            self.remove()
        return self.bug == "swallows"


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
    Misconception(  # before "hooks not removed", which gives the same outputs when an error leaves the block
        "the hook is removed only when the with block ends normally: an error inside it leaves the hook behind",
        "__exit__(self, exc_type, exc, tb) runs when the block ends by an exception too: call self.remove() "
        "whatever exc_type is (or use try/finally).",
        partial(_WrongRecorder, bug="normal_exit_only")),
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
    Misconception(
        "percentiles computed in the input's dtype (float32 for a float32 model) instead of float64",
        "convert the values to float64 before taking percentiles (x.detach().double(), or np.percentile of "
        "the NumPy array, which interpolates in float64): torch.quantile of a float32 tensor interpolates "
        "in float32 and is off by about 1e-7.",
        partial(_WrongRecorder, bug="input_dtype")),
    Misconception(
        "remove() does not remove the hook (only leaving the with block does)",
        "remove() must remove the hook itself - self.handle.remove() - and __exit__ can simply call "
        "self.remove(): the recorder is also used without a with block.",
        partial(_WrongRecorder, bug="remove_does_nothing")),
    Misconception(
        "__exit__ returns True: it swallows the errors raised inside the with block",
        "return None (no return statement) or False from __exit__, so that an error inside the block reaches "
        "the code around it after the hook is removed.",
        partial(_WrongRecorder, bug="swallows")),
]


def _recorder_cases(hidden):
    s = _seed(hidden, 100)

    def case(label, make, module, unit, shapes, percentiles=None, grad=True, dtype="float64", use="with",
             tolerance=None):
        batches = [_batch(s + i, shape, dtype=dtype)[0] for i, shape in enumerate(shapes)]
        data = {"make": make, "module": module, "unit": unit, "percentiles": percentiles, "batches": batches,
                "grad": grad, "use": use}
        return Case(label, {**data, **(tolerance or (_FLOAT32 if dtype == "float32" else {}))})

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
        # the batch itself, exact float32 numbers: float64 percentiles of them are exact to 1e-16, float32
        # ones are off by about 1e-7
        case("float32 MLP: the input of model[0] (the float32 batch itself), unit 1, default percentiles, "
             "batches of 12 and 7; compared to 1e-10: percentiles computed in float32 differ",
             partial(_model, s + 4, dtype="float32"), "0", 1, [(12, 5), (7, 5)], dtype="float32",
             tolerance={"rtol": 1e-10, "atol": 1e-12}),
        case("without a with block: recorder = ActivationRecorder(model[1], 3), 2 batches of 8, then "
             "recorder.remove() and one more call",
             partial(_model, s + 5), "1", 3, [(8, 5), (8, 5)], use="remove"),
        case("a with block that an error leaves: 2 batches of 6, then an error inside the block "
             "(the hook must be removed all the same, and the error must reach the code around the block)",
             partial(_model, s + 6, bn=True), "2", 5, [(6, 5), (6, 5)], use="raise"),
    ]
    if hidden:
        cases += [
            case("one Sigmoid module called twice in each forward pass: two records per forward",
                 partial(_model, s + 7, kind="twice"), "act", 5, [(8, 5), (6, 5)]),
            case("MLP with BatchNorm1d, batch of 2, the last unit, percentiles (50,)",
                 partial(_model, s + 8, bn=True), "5", 5, [(2, 5), (2, 5), (2, 5)], percentiles=(50,)),
            case("MLP, 4 batches of 15, unit 7 of the first Sigmoid, percentiles (1, 33.3, 66.7, 99)",
                 partial(_model, s + 9, scale=4.0), "1", 7, [(15, 5)] * 4, percentiles=(1, 33.3, 66.7, 99)),
        ]
    return cases


def check_activation_recorder(ActivationRecorder, hidden=False):
    """Check ActivationRecorder(module, unit, percentiles=(15, 50, 85)): records, hooks removed."""
    __tracebackhide__ = True
    report_pass("ActivationRecorder", run_check(
        "ActivationRecorder", ActivationRecorder, ref.ActivationRecorder, _recorder_cases(hidden),
        _run_recorder, RECORDER_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# gradient_shift and loss_along_gradient: .backward() implementations with switchable mistakes

def _layers(model, bug=None):
    modules = model.children() if bug == "children" else model.modules()
    return [m for m in modules if next(m.parameters(recurse=False), None) is not None]


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
    if bug == "one_flag":
        model.train(before["modes"][0])
    elif bug != "mode_not_restored":
        for m, mode in zip(model.modules(), before["modes"]):
            m.training = mode


def _restoring(measure):
    """``measure(model, ..., bug=None)`` made to save the model first and restore it afterwards
    (in a finally clause, except with the bug "no_finally": only when it returns normally)."""
    def wrapped(model, *args, bug=None):
        before = _saved(model)
        if bug == "no_finally":
            result = measure(model, *args, bug=bug)
            _restore(model, before, bug)
            return result
        try:
            return measure(model, *args, bug=bug)
        finally:
            _restore(model, before, bug)
    wrapped.__name__ = wrapped.__qualname__ = measure.__name__.lstrip("_")
    return wrapped


def _shift(model, x, y, loss_fn, lr, bug=None):
    """Santurkar et al.'s G and G' per layer, with one switchable mistake."""
    before = [p.detach().clone() for p in model.parameters()]
    params, layers = list(model.parameters()), _layers(model, bug)
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
        G = g[[id(p) for p in params].index(id(layer.weight))].flatten()
        if i == 0 and bug == "accumulated_shortcut":  # nothing before layer 1 moves: G'_1 = G_1
            distances.append(0.0)
            cosines.append(1.0)
            continue
        stepped = {"all_layers": layers[:i + 1], "no_layer": []}.get(bug, layers[:i])
        moved = {id(p) for m in stepped for p in m.parameters(recurse=False)}
        with torch.no_grad():
            for p, w, gp in zip(params, before, g):
                p.copy_(w - lr * gp if id(p) in moved else w)
        if bug not in ("accumulated", "accumulated_shortcut"):
            model.zero_grad(set_to_none=True)
        loss_fn(model(x2), y2).backward()
        G2 = layer.weight.grad.flatten()
        diff = G - G2
        distances.append(float(diff @ diff) if bug == "squared" else float(diff.norm()))
        cosines.append(float(G @ G2 / (G.norm() * G2.norm())))
    return distances, cosines


_gradient_shift = _restoring(_shift)


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
    ("train/eval mode restored with one flag for the whole model (model.train(was_training)), not per module",
     "a model can have modules in different modes (a frozen BN layer in eval mode inside a model in training "
     "mode): remember every module's flag ([m.training for m in model.modules()]) and set each one back.",
     "one_flag"),
    ("measured in eval mode: BN used its running statistics instead of the batch's",
     "the measurement is about training: call model.train() first (BN then normalizes with the batch's "
     "statistics), and restore each module's mode at the end.", "measured_in_eval"),
    ("the model is restored only when the measurement ends normally: an error in loss_fn leaves it changed",
     "put the restoring code in a finally clause (try: ... finally: restore), or measure on "
     "copy.deepcopy(model): the model must be left as it was found even when loss_fn or the model raises.",
     "no_finally"),
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
        "gradients accumulated from one layer's G' to the next (.grad not zeroed; G'_1 = G_1 taken without "
        "a backward pass)",
        "backward() adds to .grad: call model.zero_grad() (or set p.grad = None) before each backward pass for "
        "G'_i, or use torch.autograd.grad, which returns the gradients without storing them.",
        partial(_gradient_shift, bug="accumulated_shortcut")),
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
        "layers taken from model.children() (the top level only) instead of model.modules()",
        "model.children() misses the layers inside nested modules (a Sequential inside the model): take "
        "[m for m in model.modules() if len(list(m.parameters(recurse=False))) > 0], which walks the whole tree.",
        partial(_gradient_shift, bug="children")),
    Misconception(
        "squared distance ||G - G'||^2 instead of the L2 distance ||G - G'||",
        "take the square root: torch.linalg.norm(G - G2) (or ((G - G2) ** 2).sum().sqrt()).",
        partial(_gradient_shift, bug="squared")),
    *[Misconception(name, fix, partial(_gradient_shift, bug=bug)) for name, fix, bug in _MODEL_STATE_MISTAKES],
]


def _measure_cases(hidden, step_sizes=None):
    """Cases shared by gradient_shift (an ``lr`` each) and loss_along_gradient
    (``step_sizes``, one list per case, instead)."""
    s = _seed(hidden, 200)
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
        ("a nested model: Sequential(Sequential(Linear, BatchNorm1d, Sigmoid), Sequential(Linear, BatchNorm1d, "
         "Sigmoid), Linear) - its layers are not its children; a batch of 9",
         partial(_model, s + 4, kind="nested", bn=True), (9, 5), 0.3, "ce"),
        ("the MLP with BatchNorm1d in mixed modes: the model in eval mode except its last BatchNorm1d, in "
         "training mode (model[4]); a batch of 8, old .grad",
         partial(_model, s + 5, bn=True, mode="mixed", old_grads=True), (8, 5), 0.4, "ce"),
        ("a loss function that raises on its 3rd call (on purpose): the error must reach the caller and the "
         "model (with BatchNorm1d, in eval mode, old .grad) must be left as it was found all the same",
         partial(_model, s + 6, bn=True, mode="eval", old_grads=True), (10, 5), 0.5, "ce"),
    ]
    if hidden:
        specs += [
            ("MLP without biases, 5 Linear layers, a batch of 7; eval mode, old .grad",
             partial(_model, s + 7, sizes=(5, 7, 6, 5, 4, 3), bias=False, mode="eval", old_grads=True),
             (7, 5), 0.3, "ce"),
            ("MLP with BatchNorm1d, a batch of 16, a small step", partial(_model, s + 8, bn=True, scale=3.0),
             (16, 5), 0.01, "ce"),
            ("CNN, eval mode with old .grad, a (3, 2, 5, 5) input",
             partial(_model, s + 9, kind="cnn", mode="eval", old_grads=True), (3, 2, 5, 5), 0.4, "mse"),
            ("MLP with lr=0: nothing moves, so G' = G for every layer", partial(_model, s + 10), (9, 5), 0.0, "ce"),
        ]
    cases = []
    for k, (label, make, shape, lr, loss) in enumerate(specs):
        dtype = "float32" if label.startswith("float32") else "float64"
        x, y = _batch(s + 50 + k, shape, dtype=dtype, regression=loss == "mse")
        # float32: sums of ~100 rounded products; a distance that is 0 in exact arithmetic (with a batch of
        # 2, BN's output is +-1 whatever the layers before it do) comes out as rounding noise of ~1e-6
        data = {"make": make, "x": x, "y": y, "loss_fn": _mse if loss == "mse" else _cross_entropy,
                "fail_at": 3 if "raises" in label else None,
                **({"rtol": 1e-4, "atol": 2e-5} if dtype == "float32" else {})}
        data.update({"step_sizes": step_sizes[k]} if step_sizes else {"lr": lr})
        cases.append(Case(label if step_sizes is None else f"{label.split(' with lr=0')[0]}; step sizes {step_sizes[k]}",
                          data))
    return cases


def check_gradient_shift(gradient_shift, hidden=False):
    """Check gradient_shift(model, x, y, loss_fn, lr) -> (distances, cosines), model left as found."""
    __tracebackhide__ = True
    report_pass("gradient_shift", run_check(
        "gradient_shift", gradient_shift, ref.gradient_shift, _measure_cases(hidden), _run_gradient_shift,
        GRADIENT_SHIFT_CATALOGUE, hidden=hidden))


def _along_gradient(model, x, y, loss_fn, step_sizes, bug=None):
    """Losses and gradient norms along the gradient direction with one switchable mistake."""
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
    return losses, norms


_along = _restoring(_along_gradient)

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

_STEP_SIZES = [[0.0, 0.1, 0.5, 2.0], [1.0, 0.05], [0.3], [0.0, 0.5], [0.4, 1.5], [0.2, 0.0, 0.6], [0.5, 1.0, 2.0],
               [0.2, 0.2, 4.0], [0.01], [0.7, 0.0], [0.0]]


def check_loss_along_gradient(loss_along_gradient, hidden=False):
    """Check loss_along_gradient(model, x, y, loss_fn, step_sizes) -> (losses, grad_norms)."""
    __tracebackhide__ = True
    report_pass("loss_along_gradient", run_check(
        "loss_along_gradient", loss_along_gradient, ref.loss_along_gradient,
        _measure_cases(hidden, _STEP_SIZES), _run_along, LOSS_ALONG_GRADIENT_CATALOGUE, hidden=hidden))


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

    def noisy(self, y):
        """y + mean + std * z, in the notebook's order."""
        mean, std = self.fixed if self.bug == "drawn_once" else self.draw(y.dtype)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        z_shape = (1, y.shape[1]) + (1,) * (y.dim() - 2) if self.bug == "shared" else y.shape
        z_dtype = torch.get_default_dtype() if self.bug == "default_dtype" else y.dtype
        z = torch.randn(z_shape, generator=self.generator, dtype=z_dtype)
        return y + mean.view(shape) + std.view(shape) * z

    def forward(self, x):
        noisy = self.training or self.bug == "in_eval"
        if self.bug == "before_bn":
            return super().forward(self.noisy(x) if noisy else x)
        y = super().forward(x)
        return self.noisy(y) if noisy else y


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

#: float64 noisy cases: the noise drawn in float32 and added as y + mean + std * z or y + (mean + std * z)
#: rounds differently by up to ~1e-6; a float64 answer agrees to ~1e-15, a wrong one differs by O(1).
_NOISY_FLOAT64 = {"rtol": 1e-6, "atol": 1e-6}


def _noisy_cases(hidden):
    rng = case_rng(hidden, 300)

    def case(label, shape, modes, kwargs=None, dtype="float64"):
        c = shape[1]
        view = (1, c) + (1,) * (len(shape) - 2)
        loc, scale = rng.uniform(-2, 2, c).reshape(view), rng.uniform(0.5, 3, c).reshape(view)
        steps = [(mode, (rng.normal(size=shape) * scale + loc).astype(dtype), rng.normal(size=shape).astype(dtype))
                 for mode in modes]
        data = {"C": c, "seed": int(rng.integers(1 << 30)), "kwargs": dict(kwargs or {}), "dtype": dtype,
                "gamma": rng.uniform(0.5, 2, c).astype(dtype), "beta": rng.normal(size=c).astype(dtype),
                "steps": steps}
        # float32: with a batch of 2 BN's output hardly depends on its input, and the input's gradient is
        # rounding noise of ~1e-4 that differs between correct implementations by ~1e-6
        return Case(label, {**data, **({"rtol": 1e-4, "atol": 2e-5} if dtype == "float32" else _NOISY_FLOAT64)})

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
# The graded experiment: wrong experiments, one switchable mistake each

def _experiment(seed, bug=None, steps=300, lr=0.5, measure_every=25, unit=0):
    """ics_experiment written as a plain loop (reference tools), with one switchable mistake."""
    X, y, X_test, y_test = load_digits_split()
    shared = torch.Generator().manual_seed(seed)
    results = {}
    for name, norm in (("no BN", None), ("BN", nn.BatchNorm1d)):
        model = make_mlp(norm, seed=0 if bug == "unseeded_model" else seed)
        gen = shared if bug == "shared_generator" else torch.Generator().manual_seed(seed)
        modules = list(model)
        last_hidden = max(i for i, m in enumerate(modules[:-1]) if isinstance(m, nn.Linear))
        target = {"before_bn": modules[last_hidden + 1], "output_layer": modules[-1]}.get(bug, modules[-2])
        keep = np.array([bug == "all_layers" or isinstance(m, nn.Linear) for _, m in ref.parameterized_layers(model)])
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        always = ref.ActivationRecorder(target, unit) if bug == "recorder_open" else None
        percentiles, distances, cosines = [], [], []

        def measure(x, t):
            d, c = ref.gradient_shift(model, x, t, F.cross_entropy, 0.1 if bug == "other_lr" else lr)
            distances.append(d[keep])
            cosines.append(c[keep])

        for step in range(steps):
            idx = torch.randperm(len(X), generator=gen)[:60]
            xb, yb = X[idx], y[idx]
            if step % measure_every == 0 and bug != "after_step":
                measure(xb, yb)
            if always is not None:
                loss = F.cross_entropy(model(xb), yb)
            else:
                with ref.ActivationRecorder(target, unit) as recorder:
                    loss = F.cross_entropy(model(xb), yb)
                percentiles += recorder.records
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % measure_every == 0 and bug == "after_step":
                measure(xb, yb)
        if always is not None:
            always.remove()
            percentiles = always.records
        model.eval()
        with torch.no_grad():
            accuracy = (model(X_test).argmax(dim=1) == y_test).double().mean().item()
        results[name] = {"percentiles": np.array(percentiles), "distances": np.array(distances),
                         "cosines": np.array(cosines), "test_accuracy": accuracy}
    return results


EXPERIMENT_CATALOGUE = [
    Misconception(
        "with BN, the recorder is on the BatchNorm1d layer - whose input is the Linear layer's output, not yet "
        "normalized - instead of on the last Sigmoid",
        "record the input of the last Sigmoid in both networks ([m for m in model if isinstance(m, nn.Sigmoid)]"
        "[-1]): with BN that is BN's output, which is what Fig. 1 (c) shows.",
        partial(_experiment, bug="before_bn")),
    Misconception(
        "the recorder is on the output layer - whose input is the last Sigmoid's output, in (0, 1) - instead of "
        "on the last Sigmoid",
        "the recorder records its module's input: put it on the last Sigmoid itself, whose input is the "
        "sigmoid's argument (Fig. 1 b, c).",
        partial(_experiment, bug="output_layer")),
    Misconception(
        "gradient_shift measured after the SGD step instead of before it",
        "at steps 0, MEASURE_EVERY, ..., call gradient_shift on the step's batch before the update (before "
        "opt.step()), so that step 0 measures the network as built.",
        partial(_experiment, bug="after_step")),
    Misconception(
        "gradient_shift called with another lr than the training learning rate",
        "G' is the gradient after the earlier layers take the step that training takes: pass the training "
        "learning rate LR to gradient_shift.",
        partial(_experiment, bug="other_lr")),
    Misconception(
        "the recorder stays open while gradient_shift runs, so it also records gradient_shift's forward passes",
        "open the recorder only around the training forward pass (with ActivationRecorder(...) as recorder: "
        "out = model(x)), so that it records one row per training step.",
        partial(_experiment, bug="recorder_open")),
    Misconception(
        "one batch generator for both networks: the BN network trains on other batches than the plain one",
        "create the generator anew for each network, torch.Generator().manual_seed(seed), so that both networks "
        "see the same batches and differ only by BN.",
        partial(_experiment, bug="shared_generator")),
    Misconception(
        "the networks are not built from the seed (make_mlp(..., seed=seed))",
        "build both networks with make_mlp(norm_layer, seed=seed): the seed sets the initial weights, and both "
        "networks must start from the same ones.",
        partial(_experiment, bug="unseeded_model")),
    Misconception(
        "distances and cosines of every layer with parameters (BN layers included) instead of the 4 Linear layers",
        "keep the columns of the Linear layers only ([isinstance(m, nn.Linear) for m in layers]), so that the two "
        "networks are compared layer for layer.",
        partial(_experiment, bug="all_layers")),
]

#: The experiment's outputs at step 0 are float32 gradients (differences of them, for ||G - G'||) computed
#: by the learner's own code: they agree to about 1e-6 relative between correct implementations.
_EXPERIMENT_TOLERANCE = {"rtol": 1e-3, "atol": 1e-6}


def _experiment_cases(hidden):
    return [Case(f"ics_experiment(seed={_seed(hidden, 11)}): 300 steps at LR = 0.5, gradient_shift every 25 steps",
                 {"seed": _seed(hidden, 11), "steps": 300, "measure_every": 25, **_EXPERIMENT_TOLERANCE})]


def check_ics_experiment(ics_experiment, hidden=False):
    """Check ics_experiment(seed): run as specified (exact at step 0), and showing the phenomenon."""
    __tracebackhide__ = True
    report_pass("ics_experiment", run_check(
        "ics_experiment", ics_experiment, ref.ics_experiment, _experiment_cases(hidden), _run_experiment,
        EXPERIMENT_CATALOGUE, hidden=hidden))


CATALOGUE = {
    "ActivationRecorder": RECORDER_CATALOGUE,
    "gradient_shift": GRADIENT_SHIFT_CATALOGUE,
    "NoisyBatchNorm1d": NOISY_CATALOGUE,
    "loss_along_gradient": LOSS_ALONG_GRADIENT_CATALOGUE,
    "ics_experiment": EXPERIMENT_CATALOGUE,
}
