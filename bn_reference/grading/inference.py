"""Chapter 5 - inference and running statistics: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.inference``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more edge cases).

The layer checks run seeded sequences of ``train()`` / ``eval()`` steps and
compare the output, the gradients (PyTorch) and every running statistic after
each step. Cases are ordered so that each mistake shows first on a case it
changes on its own: the structure of the module, then the running statistics
of a 2-D sequence, then one 4-D step (the output only), then the rest.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import inference as ref
from . import Case, CheckFailed, Misconception, run_check, report_pass

__all__ = [
    "check_batchnorm",
    "check_population_statistics",
    "check_torch_batchnorm",
    "check_fold_batchnorm",
    "check_recalibrate_batchnorm",
    "check_bn_parameter_counts",
    "CATALOGUE",
]


# --------------------------------------------------------------------------
# Wrong BN layers: one NumPy and one PyTorch class whose ``bug`` switches on
# one mistake at a time; bug=None is the right layer.

def _running_update(running_mean, running_var, mean, biased_var, n, factor, bug):
    """New (running_mean, running_var) with switchable mistakes (NumPy or torch)."""
    var = biased_var if bug == "biased" else biased_var * n / (n - 1)
    if bug == "keras_side":  # Keras's form, momentum on the old value
        return factor * running_mean + (1 - factor) * mean, factor * running_var + (1 - factor) * var
    if bug == "keras_copy_decays":  # Keras/CS231n form with its (1 - momentum) * batch_var term lost
        return factor * running_mean + (1 - factor) * mean, factor * running_var
    new_var = (1 - factor) * running_var if bug == "decays" else (1 - factor) * running_var + factor * var
    return (1 - factor) * running_mean + factor * mean, new_var


class _WrongBatchNorm:
    """NumPy BN layer (PyTorch's conventions) with one switchable mistake."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, bug=None):
        self.eps, self.momentum, self.bug = eps, momentum, bug
        self.gamma, self.beta = np.ones(num_features), np.zeros(num_features)
        self.running_mean, self.running_var = np.zeros(num_features), np.ones(num_features)
        self.num_batches_tracked, self.training = 0, True

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    def forward(self, x):
        x = np.asarray(x, dtype=np.float64)
        axes, shape = (0, *range(2, x.ndim)), (1, -1) + (1,) * (x.ndim - 2)
        n = x.size // x.shape[1]
        if self.training and n == 1 and self.bug != "no_size_1_error":
            raise ValueError("Expected more than 1 value per channel when training")
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        if self.training or self.bug == "batch_stats_in_eval":
            if self.bug == "per_activation" and x.ndim == 4:
                mu, v = x.mean(axis=0, keepdims=True), x.var(axis=0, keepdims=True)
            else:
                mu, v = mean.reshape(shape), var.reshape(shape)
        else:
            mu, v = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        out = (x - mu) / np.sqrt(v + self.eps) * self.gamma.reshape(shape) + self.beta.reshape(shape)
        if self.training or self.bug == "update_in_eval":
            self.num_batches_tracked += self.bug != "no_count"
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
            self.running_mean, self.running_var = _running_update(
                self.running_mean, self.running_var, mean, var, n, factor, self.bug)
        return out


class _WrongTorchBatchNorm(nn.Module):
    """PyTorch BN layer (nn.BatchNorm2d's interface) with one switchable mistake."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, bug=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.eps, self.momentum, self.bug, self.track_running_stats = eps, momentum, bug, track_running_stats
        self.names = ("gamma", "beta") if bug == "gamma_beta_names" else ("weight", "bias")
        for name, init in zip(self.names, (torch.ones, torch.zeros)):
            self.register_parameter(name, nn.Parameter(init(num_features, **factory)) if affine else None)
        stats = {"running_mean": torch.zeros(num_features, **factory),
                 "running_var": torch.ones(num_features, **factory)}
        for name, value in stats.items():
            if track_running_stats and bug == "as_parameters":
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value if track_running_stats else None)
        self.register_buffer("num_batches_tracked", torch.tensor(0) if track_running_stats else None)

    def forward(self, x):
        use_batch = self.training or self.running_mean is None or self.bug == "batch_stats_in_eval"
        n = x.numel() // x.shape[1]
        if use_batch and n == 1 and self.bug != "no_size_1_error":
            raise ValueError("Expected more than 1 value per channel when training")
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        mean, var = x.mean(dim=dims), x.var(dim=dims, correction=0)
        if not use_batch:
            mu, v = self.running_mean.view(shape), self.running_var.view(shape)
        elif self.bug == "per_activation" and x.dim() == 4:
            mu, v = x.mean(dim=0, keepdim=True), x.var(dim=0, correction=0, keepdim=True)
        else:
            mu, v = mean.view(shape), var.view(shape)
        y = (x - mu) / torch.sqrt(v + self.eps)
        gamma, beta = (getattr(self, name) for name in self.names)
        if gamma is not None:
            y = y * gamma.view(shape) + beta.view(shape)
        if self.running_mean is not None and (self.training or self.bug == "update_in_eval"):
            self._update(mean, var, n)
        return y

    def _update(self, mean, var, n):
        if self.bug == "graph_attached":  # no torch.no_grad(), no detach, not in place
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean, self.running_var = _running_update(
                self.running_mean, self.running_var, mean, var, n, factor, None)
            return
        with torch.no_grad():
            self.num_batches_tracked += int(self.bug != "no_count")
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            new_mean, new_var = _running_update(self.running_mean, self.running_var, mean, var, n, factor, self.bug)
            self.running_mean.copy_(new_mean)
            self.running_var.copy_(new_var)


_LAYER_MISTAKES = [
    ("running variance decays toward 0: running_var = (1 - momentum) * running_var, "
     "the batch-variance term dropped",
     "this update only shrinks the estimate, by a factor (1 - momentum) per step (it is the Keras/CS231n "
     "form momentum * running_var + (1 - momentum) * batch_var with its (1 - momentum) * batch_var term "
     "lost). Keep both terms: running_var = (1 - momentum) * running_var + momentum * unbiased_batch_var.",
     "decays"),
    ("running variance decays toward 0: the Keras/CS231n-form update copied with its "
     "(1 - momentum) * batch_var term dropped (running_var = momentum * running_var)",
     "with PyTorch's momentum = 0.1 this multiplies running_var by 0.1 every step. In PyTorch's convention "
     "momentum weights the new value: running = (1 - momentum) * running + momentum * batch_stat, for the "
     "mean and the (unbiased) variance alike.",
     "keras_copy_decays"),
    ("momentum applied to the wrong side (Keras convention in a PyTorch-convention layer)",
     "PyTorch's momentum (0.1) is the weight of the new batch statistic: "
     "running = (1 - momentum) * running + momentum * batch_stat. Keras's momentum (0.99) is the weight "
     "of the old value; convert between them with 1 - momentum.",
     "keras_side"),
    ("biased batch variance stored in running_var",
     "normalize with the biased batch variance (divide by n) but update running_var with the unbiased one, "
     "var * n / (n - 1), where n is the number of values per channel (N, N * L or N * H * W).",
     "biased"),
    ("running statistics updated in eval mode",
     "in eval mode only read running_mean and running_var; update them (and num_batches_tracked) only "
     "while training is True.",
     "update_in_eval"),
    ("batch statistics used in eval mode",
     "in eval mode normalize with running_mean and running_var, so that a prediction does not depend on "
     "which other examples share its batch.",
     "batch_stats_in_eval"),
    ("statistics per activation instead of per channel for 4-D input "
     "(the (N, C, H, W) map flattened to (N, C*H*W))",
     "a channel's statistics run over N, H and W together (axis (0, 2, 3)): one mean and one variance per "
     "channel, as in Sec. 3.2 of the paper; for (N, C, L) input over axes (0, 2).",
     "per_activation"),
    ("num_batches_tracked never incremented (momentum=None then divides by zero)",
     "add 1 to num_batches_tracked at every training step, before computing the factor: momentum=None "
     "means the cumulative average, factor 1 / num_batches_tracked.",
     "no_count"),
    ("no error for one value per channel in training",
     "with one value per channel (N * L or N * H * W == 1) the batch variance is 0 and the output is just "
     "beta: raise ValueError('Expected more than 1 value per channel when training'), as PyTorch does.",
     "no_size_1_error"),
]

_TORCH_MISTAKES = [
    ("running statistics registered as parameters",
     "use self.register_buffer('running_mean', torch.zeros(num_features)) (and likewise running_var and "
     "num_batches_tracked): buffers are saved in state_dict() but are not in parameters(), so no "
     "optimizer trains them.",
     "as_parameters"),
    ("running statistics kept with their autograd graph attached",
     "update them without autograd and in place, e.g. under torch.no_grad(): "
     "self.running_mean.mul_(1 - momentum).add_(momentum * mean); assigning a new tensor computed from "
     "the batch keeps the graph alive from step to step.",
     "graph_attached"),
    ("parameters named gamma and beta instead of weight and bias",
     "name the parameters weight and bias (and the buffers running_mean, running_var, "
     "num_batches_tracked), so that state_dict() has nn.BatchNorm2d's keys and checkpoints load both ways.",
     "gamma_beta_names"),
]

BATCHNORM_CATALOGUE = [Misconception(name, fix, partial(_WrongBatchNorm, bug=bug))
                       for name, fix, bug in _LAYER_MISTAKES]
TORCH_BATCHNORM_CATALOGUE = [Misconception(name, fix, partial(_WrongTorchBatchNorm, bug=bug))
                             for name, fix, bug in _LAYER_MISTAKES + _TORCH_MISTAKES]


def _population(means, variances, m, bug=None):
    """Algorithm 2 with switchable mistakes."""
    means, variances = np.asarray(means, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    k = len(means)
    if bug == "var_of_means":
        return means.mean(axis=0), means.var(axis=0)
    factor = {None: m / (m - 1), "biased": 1.0, "inverted": (m - 1) / m, "batches": k / (k - 1)}[bug]
    return means.mean(axis=0), factor * variances.mean(axis=0)


POPULATION_CATALOGUE = [
    Misconception(
        "no m / (m - 1) correction: the population variance is biased",
        "each batch variance divides by m, so their average underestimates Var[x]: multiply it by "
        "m / (m - 1) (Algorithm 2), m = batch_size.",
        partial(_population, bug="biased")),
    Misconception(
        "correction inverted: (m - 1) / m instead of m / (m - 1)",
        "the batch variances are too small by the factor (m - 1) / m, so multiply by its inverse m / (m - 1).",
        partial(_population, bug="inverted")),
    Misconception(
        "correction uses the number of batches instead of the batch size",
        "m in m / (m - 1) is the size of each mini-batch (batch_size), not the number of batches K.",
        partial(_population, bug="batches")),
    Misconception(
        "variance of the batch means instead of the mean of the batch variances",
        "the spread of the batch means measures how noisy mu_B is, not how spread out x is: "
        "Var[x] = m / (m - 1) * mean_k(batch_vars[k]).",
        partial(_population, bug="var_of_means")),
]


def _fold(layer, bn, bug=None):
    """BN folding with switchable mistakes; copies ``layer`` and rescales the copy."""
    eps = 0.0 if bug == "no_eps" else bn.eps
    scale = bn.weight.detach() / (bn.running_var + eps if bug == "variance" else torch.sqrt(bn.running_var + eps))
    bias = layer.bias.detach() if layer.bias is not None and bug != "no_bias" else 0.0
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(layer.weight.detach() * scale.view(-1, *[1] * (layer.weight.dim() - 1)))
    folded.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
    return folded


FOLD_CATALOGUE = [
    Misconception(
        "the fold forgets eps",
        "BN divides by sqrt(running_var + eps), not sqrt(running_var): "
        "s = gamma / sqrt(running_var + bn.eps).",
        partial(_fold, bug="no_eps")),
    Misconception(
        "the fold forgets the preceding layer's bias",
        "the layer's bias b is shifted and scaled like the rest of its output: "
        "b' = s * (b - running_mean) + beta (b = 0 when the layer has no bias).",
        partial(_fold, bug="no_bias")),
    Misconception(
        "the fold divides by the variance instead of the standard deviation",
        "s = gamma / sqrt(running_var + eps): take the square root.",
        partial(_fold, bug="variance")),
]


@torch.no_grad()
def _recalibrate(model, batches, bug=None):
    """Precise BN with switchable mistakes."""
    bns = ref.batchnorm_layers(model)
    modes, momenta = {m: m.training for m in model.modules()}, [bn.momentum for bn in bns]
    model.train(bug == "dropout_on")
    for bn in bns:
        if bug != "no_reset":
            bn.reset_running_stats()
        bn.momentum = bn.momentum if bug == "ema" else None
        bn.train(bug != "bn_in_eval")
    for x in batches:
        model(x)
    if bug != "momentum_kept_none":
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    if bug != "modes_not_restored":
        for m, training in modes.items():
            m.training = training
    return model


RECALIBRATE_CATALOGUE = [
    Misconception(
        "running statistics not reset before recomputing",
        "call bn.reset_running_stats() on every BN layer first: otherwise the old estimates and "
        "num_batches_tracked are averaged in with the new batches.",
        partial(_recalibrate, bug="no_reset")),
    Misconception(
        "an exponential moving average instead of the cumulative average",
        "set bn.momentum = None while recalibrating, so every batch gets the same weight "
        "(factor 1 / num_batches_tracked), then restore the old momentum.",
        partial(_recalibrate, bug="ema")),
    Misconception(
        "the BN layers run in eval mode, so nothing is recomputed",
        "running statistics are only updated in training mode: call bn.train() on the BN layers "
        "(and run the batches under torch.no_grad(), so no weight changes).",
        partial(_recalibrate, bug="bn_in_eval")),
    Misconception(
        "the whole model in training mode: Dropout is active while the statistics are collected",
        "put the model in eval mode and only the BN layers in training mode: the statistics must be those "
        "of the inputs the BN layers see at inference, when Dropout is off.",
        partial(_recalibrate, bug="dropout_on")),
    Misconception(
        "train/eval modes not restored (the BN layers are left in training mode)",
        "remember every module's training flag before you start and set it back at the end.",
        partial(_recalibrate, bug="modes_not_restored")),
    Misconception(
        "momentum left at None after recalibrating",
        "remember each BN layer's momentum and set it back at the end, so later training uses the same EMA.",
        partial(_recalibrate, bug="momentum_kept_none")),
]


def _counts(model, bug=None):
    """BN parameter counts with switchable mistakes."""
    trainable = non_trainable = 0
    for bn in ref.batchnorm_layers(model):
        for p in bn.parameters(recurse=False):
            if p.requires_grad or bug in ("frozen_ignored", "all_trainable"):
                trainable += p.numel()
            else:
                non_trainable += p.numel()
        if bn.running_mean is not None and bug != "buffers_ignored":
            stats = 2 * bn.running_mean.numel()
            if bug == "all_trainable":
                trainable += stats
            else:
                non_trainable += stats + (bug == "counter")  # the counter: one value per layer
    if bug == "whole_model":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, non_trainable


COUNTS_CATALOGUE = [
    Misconception(
        "running mean and variance not counted",
        "they are buffers, not parameters, so model.parameters() skips them, but the layer stores them: "
        "add running_mean.numel() + running_var.numel() to the non-trainable count.",
        partial(_counts, bug="buffers_ignored")),
    Misconception(
        "running mean and variance counted as trainable",
        "running_mean and running_var are buffers estimated by averaging, never by gradient descent: "
        "count them as non-trainable (Keras: 4 weights per feature, 2 of them trainable).",
        partial(_counts, bug="all_trainable")),
    Misconception(
        "num_batches_tracked counted as a parameter",
        "num_batches_tracked is an integer step counter, not a statistic of the features: leave it out.",
        partial(_counts, bug="counter")),
    Misconception(
        "requires_grad ignored: frozen gamma and beta counted as trainable",
        "a parameter with requires_grad=False is not trained: count it as non-trainable.",
        partial(_counts, bug="frozen_ignored")),
    Misconception(
        "the whole model's parameters counted, not only the BN layers'",
        "count only the parameters and buffers of the BN layers (isinstance(m, (nn.BatchNorm1d, "
        "nn.BatchNorm2d)) for m in model.modules()).",
        partial(_counts, bug="whole_model")),
]

CATALOGUE = {
    "BatchNorm": BATCHNORM_CATALOGUE,
    "population_statistics": POPULATION_CATALOGUE,
    "TorchBatchNorm": TORCH_BATCHNORM_CATALOGUE,
    "fold_batchnorm": FOLD_CATALOGUE,
    "recalibrate_batchnorm": RECALIBRATE_CATALOGUE,
    "bn_parameter_counts": COUNTS_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible seeds are 0..; hidden seeds start at 1000 and add edge cases.

def _batches(rng, shapes_and_modes, dtype=np.float64):
    """(mode, x, dout) steps; x's channels have their own mean and spread."""
    c = shapes_and_modes[0][1][1]
    loc, scale = rng.uniform(-3, 3, size=c), rng.uniform(0.5, 3, size=c)
    steps = []
    for mode, shape in shapes_and_modes:
        view = (1, c) + (1,) * (len(shape) - 2)
        x = rng.normal(size=shape) * scale.reshape(view) + loc.reshape(view)
        steps.append((mode, x.astype(dtype), rng.normal(size=shape).astype(dtype)))
    return steps


def _sequence(shape, modes, small=None):
    """[(mode, shape), ...]: every step on ``shape``, the steps listed in ``small`` on N=2."""
    small_shape = (2,) + tuple(shape[1:])
    return [(mode, small_shape if small and i in small else shape) for i, mode in enumerate(modes)]


_TRAIN_EVAL = ["train", "train", "train", "eval", "train", "eval"]
_FLOAT32_TOL = {"rtol": 1e-4, "atol": 1e-4}


def _layer_cases(hidden: bool, torch_layer: bool):
    """Seeded train/eval sequences for the NumPy and the PyTorch layer."""
    rng = np.random.default_rng(1000 if hidden else 0)

    def case(label, shape_modes, kwargs=None, record="all", dtype=np.float64, **extra):
        kw = dict(kwargs or {})
        if torch_layer:
            kw.setdefault("dtype", torch.float32 if dtype == np.float32 else torch.float64)
        data = {"C": shape_modes[0][1][1], "kwargs": kw, "steps": _batches(rng, shape_modes, dtype),
                "record": record, **extra}
        if dtype == np.float32:
            data.update(_FLOAT32_TOL)
        return Case(label, data)

    c = 5 if hidden else 4
    cases = []
    if torch_layer:
        cases.append(case(f"(8, {c}) input: the module's parameters, buffers and state_dict keys, "
                          f"then one training step", [("train", (8, c))], record="structure"))
    cases += [
        case(f"(10, {c}) input: train x3, eval, train, eval with momentum=0.1, checked after every step",
             _sequence((10, c), _TRAIN_EVAL), record="all" if torch_layer else "initial"),
        case("(6, 3, 4, 5) input: one training step (the output only)", [("train", (6, 3, 4, 5))],
             record="output"),
        case("(5, 3, 7) input with momentum=None (cumulative average): train x3, eval, train, eval",
             _sequence((5, 3, 7), _TRAIN_EVAL), {"momentum": None}),
        case("(4, 3, 3, 3) input with eps=1e-3, momentum=0.3: train x3, eval, train, eval",
             _sequence((4, 3, 3, 3), _TRAIN_EVAL), {"eps": 1e-3, "momentum": 0.3}),
    ]
    if torch_layer:
        cases += [
            case("(6, 3, 2, 2) input, affine=False, track_running_stats=False: train, eval, train",
                 [("train", (6, 3, 2, 2)), ("eval", (6, 3, 2, 2)), ("train", (6, 3, 2, 2))],
                 {"affine": False, "track_running_stats": False}, record="structure"),
            case("(7, 3, 4, 4) float32 input: train x3, eval, train, eval",
                 _sequence((7, 3, 4, 4), _TRAIN_EVAL), dtype=np.float32),
        ]
    cases.append(case("one value per channel: training on (1, 3) and on (1, 3, 1, 1) must raise "
                      "ValueError; eval on (1, 3) works", [("train", (1, 3)), ("train", (1, 3, 1, 1)),
                                                          ("eval", (1, 3))], record="outcome"))
    if hidden:
        cases += [
            case("(2, 6) input, the smallest batch: train x3, eval, train, eval", _sequence((2, 6), _TRAIN_EVAL)),
            case("(3, 2, 5) input with momentum=1.0: running statistics = the last batch's",
                 _sequence((3, 2, 5), _TRAIN_EVAL), {"momentum": 1.0}),
            case("(6, 4) input: eval before any training, then train, eval",
                 [("eval", (6, 4)), ("train", (6, 4)), ("eval", (6, 4))]),
            case("(9, 2, 3, 3) input, batches of 9 and 2 mixed, momentum=None",
                 _sequence((9, 2, 3, 3), _TRAIN_EVAL, small={1, 4}), {"momentum": None}),
        ]
        if not torch_layer:
            cases.append(case("(7, 3, 4, 4) float32 input: train x3, eval, train, eval",
                              _sequence((7, 3, 4, 4), _TRAIN_EVAL), dtype=np.float32))
    return cases


def _step_label(i, mode, x):
    return f"step {i} ({mode}() on a {tuple(x.shape)} batch)"


def _run_batchnorm(cls, case):
    """Run a NumPy BN layer through the case's steps; record outputs and statistics."""
    d = case.data
    make = partial(cls, d["C"], **d["kwargs"])
    bn, out = make(), {}
    if d["record"] == "initial":
        for name in ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked", "training"):
            out[f"initial {name}"] = copy.deepcopy(getattr(bn, name, "missing"))  # not a view: it changes in place
    for i, (mode, x, _) in enumerate(d["steps"], 1):
        label = _step_label(i, mode, x)
        if d["record"] == "outcome":
            bn = make()
        getattr(bn, mode)()
        try:
            y = bn.forward(x.copy())
        except ValueError:
            out[label] = "raises ValueError"
            continue
        if d["record"] == "outcome":
            out[label] = "returns an output"
            continue
        out[f"{label}: output"] = np.array(y)
        if d["record"] != "output":
            out[f"{label}: training"] = bool(bn.training)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"{label}: {name}"] = np.array(getattr(bn, name, np.nan), dtype=np.float64)
    return out


def check_batchnorm(BatchNorm, hidden=False):
    """Check the NumPy BatchNorm class over seeded train/eval sequences."""
    __tracebackhide__ = True
    report_pass("BatchNorm", run_check("BatchNorm", BatchNorm, ref.BatchNorm, _layer_cases(hidden, False),
                                   _run_batchnorm, BATCHNORM_CATALOGUE))


def _names(named) -> str:
    return ", ".join(sorted(name for name, value in named if value is not None))


def _value(t):
    """A tensor's values (detached copy), or a word for None / a missing attribute."""
    if isinstance(t, str) or t is None:
        return "None" if t is None else t
    return t.detach().clone()


def _run_torch_batchnorm(cls, case):
    """Run a BN module through the case's steps; record outputs, gradients and buffers."""
    d = case.data
    make = partial(cls, d["C"], **d["kwargs"])
    bn, out, dtype = make(), {}, d["kwargs"]["dtype"]
    if d["record"] == "structure":
        out["state_dict() keys"] = _names(bn.state_dict().items())
        out["names in parameters()"] = _names(bn.named_parameters())
        out["names in buffers()"] = _names(bn.named_buffers())
    for i, (mode, x, dout) in enumerate(d["steps"], 1):
        label = _step_label(i, mode, x)
        if d["record"] == "outcome":
            bn = make()
        bn.train(mode == "train")
        xt = torch.tensor(x, dtype=dtype, requires_grad=True)
        try:
            y = bn(xt)
        except ValueError:
            out[label] = "raises ValueError"
            continue
        if d["record"] == "outcome":
            out[label] = "returns an output"
            continue
        (y * torch.tensor(dout, dtype=dtype)).sum().backward()
        out[f"{label}: output"] = _value(y)
        out[f"{label}: gradient of the input"] = _value(xt.grad)
        if d["record"] == "output":
            continue
        for name in ("weight", "bias"):
            p = getattr(bn, name, "no such parameter")
            out[f"{label}: {name}.grad"] = p if isinstance(p, str) else _value(None if p is None else p.grad)
        bn.zero_grad(set_to_none=True)
        stats = [getattr(bn, name, "missing") for name in ("running_mean", "running_var", "num_batches_tracked")]
        for name, t in zip(("running_mean", "running_var", "num_batches_tracked"), stats):
            out[f"{label}: {name}"] = _value(t)
        if d["record"] == "structure":
            out[f"{label}: running statistics hold an autograd graph"] = any(
                getattr(t, "grad_fn", None) is not None for t in stats)
    return out


BUILTIN_BATCH_NORM = "PyTorch's own batch norm used instead of your code"


@contextmanager
def _without_builtin_batch_norm():
    """F.batch_norm and torch.batch_norm (which nn.BatchNorm* call) raise while checking."""
    def refuse(*args, **kwargs):
        raise CheckFailed(
            "TorchBatchNorm calls F.batch_norm or torch.batch_norm (directly or through nn.BatchNorm1d/2d): "
            "compute the mean, the variance and the running statistics yourself with tensor operations.",
            misconception=BUILTIN_BATCH_NORM)
    saved = F.batch_norm, torch.batch_norm
    F.batch_norm = torch.batch_norm = refuse
    try:
        yield
    finally:
        F.batch_norm, torch.batch_norm = saved


def check_torch_batchnorm(TorchBatchNorm, hidden=False):
    """Check a TorchBatchNorm module: structure, outputs, gradients and buffers after every
    step, written without PyTorch's own batch norm."""
    __tracebackhide__ = True
    with _without_builtin_batch_norm():
        n = run_check("TorchBatchNorm", TorchBatchNorm, ref.TorchBatchNorm, _layer_cases(hidden, True),
                      _run_torch_batchnorm, TORCH_BATCHNORM_CATALOGUE)
    report_pass("TorchBatchNorm", n)


def _population_cases(hidden):
    rng = np.random.default_rng(1001 if hidden else 1)
    settings = [(6, 3, 8), (3, 1, 2), (5, 4, 32)] + ([(2, 6, 3), (40, 2, 16), (1, 3, 10)] if hidden else [])
    cases = []
    for k, c, m in settings:
        x = rng.normal(size=(k, m, c)) * rng.uniform(0.5, 4, size=c) + rng.uniform(-5, 5, size=c)
        cases.append(Case(f"{k} mini-batches of size m={m}, {c} features",
                          {"means": x.mean(axis=1), "vars": x.var(axis=1), "m": m}))
    return cases


def _run_population(fn, case):
    d = case.data
    mean, var = fn(d["means"].copy(), d["vars"].copy(), d["m"])
    return {"mean": np.asarray(mean), "var": np.asarray(var)}


def check_population_statistics(population_statistics, hidden=False):
    """Check population_statistics(batch_means, batch_vars, batch_size) -> (mean, var)."""
    __tracebackhide__ = True
    report_pass("population_statistics", run_check(
        "population_statistics", population_statistics, ref.population_statistics,
        _population_cases(hidden), _run_population, POPULATION_CATALOGUE))


def _fill(module, gen):
    """Random parameters and running statistics (running_var in [0.2, 3])."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        if getattr(module, "running_var", None) is not None:
            module.running_mean.copy_(2 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(0.2 + 2.8 * torch.rand(module.running_var.shape, generator=gen))
            module.num_batches_tracked.fill_(17)


def _fold_problem(seed, conv=None, in_out=(5, 4), bias=True, eps=1e-5, bn_training=False):
    """(layer, bn, x): a Linear or Conv2d (``conv`` holds its settings) and a BN layer, float64."""
    gen = torch.Generator().manual_seed(seed)
    i, o = in_out
    if conv is None:
        layer, bn, x = nn.Linear(i, o, bias=bias), nn.BatchNorm1d(o, eps=eps), torch.randn(6, i, generator=gen)
    else:
        layer = nn.Conv2d(i, o, bias=bias, **conv)
        bn, x = nn.BatchNorm2d(o, eps=eps), torch.randn(2, i, 7, 7, generator=gen)
    layer, bn, x = layer.double(), bn.double(), x.double()
    _fill(layer, gen)
    _fill(bn, gen)
    bn.train(bn_training)
    return layer, bn, x


def _fold_cases(hidden):
    s = 1002 if hidden else 2
    cases = [
        Case("Linear(5, 4) with bias, BatchNorm1d(4, eps=1e-5)", {"make": partial(_fold_problem, s)}),
        Case("Linear(3, 6) with bias, BatchNorm1d(6, eps=0.1)",
             {"make": partial(_fold_problem, s + 1, in_out=(3, 6), eps=0.1)}),
        Case("Conv2d(3, 4, 3, padding=1, bias=False), BatchNorm2d(4)",
             {"make": partial(_fold_problem, s + 2, {"kernel_size": 3, "padding": 1}, (3, 4), bias=False)}),
        Case("Conv2d(2, 5, 3, stride=2) with bias, BatchNorm2d(5, eps=1e-3)",
             {"make": partial(_fold_problem, s + 3, {"kernel_size": 3, "stride": 2}, (2, 5), eps=1e-3)}),
    ]
    if hidden:
        cases += [
            Case("Conv2d(4, 6, (3, 1), groups=2, dilation=2, padding=2) with bias, BatchNorm2d(6)",
                 {"make": partial(_fold_problem, s + 4, {"kernel_size": (3, 1), "groups": 2, "dilation": 2,
                                                         "padding": 2}, (4, 6))}),
            Case("Linear(8, 3) without bias, BatchNorm1d(3) left in training mode (fold uses its "
                 "running statistics all the same)",
                 {"make": partial(_fold_problem, s + 5, in_out=(8, 3), bias=False, bn_training=True)}),
        ]
    return cases


def _snapshot(*modules):
    return [(m.training, {k: v.clone() for k, v in m.state_dict().items()}) for m in modules]


def _same(a, b):
    return all(ta == tb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
               for (ta, sa), (tb, sb) in zip(a, b))


def _run_fold(fn, case):
    layer, bn, x = case.data["make"]()
    before = _snapshot(layer, bn)
    folded = fn(layer, bn)
    out = {
        "returns a new module (not `layer` itself)": folded is not layer,
        "type of the result": type(folded).__name__,
        "layer and bn left unchanged": _same(before, _snapshot(layer, bn)),
        "folded weight": _value(folded.weight),
        "folded bias": _value(folded.bias),
    }
    if isinstance(layer, nn.Conv2d):
        out["convolution settings"] = ", ".join(
            f"{name}={getattr(folded, name, 'missing')}"
            for name in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"))
    with torch.no_grad():
        out["output on a test batch"] = folded(x)
    return out


def check_fold_batchnorm(fold_batchnorm, hidden=False):
    """Check fold_batchnorm(layer, bn) -> a new nn.Linear / nn.Conv2d."""
    __tracebackhide__ = True
    report_pass("fold_batchnorm", run_check("fold_batchnorm", fold_batchnorm, ref.fold_batchnorm,
                                        _fold_cases(hidden), _run_fold, FOLD_CATALOGUE))


def _recalibration_problem(seed, conv=False, dropout=False, training=False, sizes=(6, 9, 7, 8)):
    """(model, batches, x_test): a small float64 model whose BN layers hold stale statistics."""
    gen = torch.Generator().manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2, momentum=0.3))
        shape = (3, 5, 5)
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Dropout(0.5) if dropout else nn.Identity(),
                              nn.Linear(8, 3), nn.BatchNorm1d(3, momentum=None))
        shape = (5,)
    model = model.double()
    for m in model:
        _fill(m, gen)
    model.train(training)
    batches = [(1.5 * torch.randn((n, *shape), generator=gen) + 1).double() for n in sizes]
    return model, batches, torch.randn((4, *shape), generator=gen).double()


def _recalibration_cases(hidden):
    s = 1003 if hidden else 3
    cases = [
        Case("MLP Linear-BN-ReLU-Dropout-Linear-BN in eval mode, stale statistics, 4 batches",
             {"make": partial(_recalibration_problem, s, dropout=True), "seed": s}),
        Case("CNN Conv-BN-ReLU-Conv-BN in training mode, 3 batches",
             {"make": partial(_recalibration_problem, s + 1, conv=True, training=True, sizes=(4, 4, 4)),
              "seed": s + 1}),
    ]
    if hidden:
        cases += [
            Case("MLP in training mode, Dropout, batches of 2, 10 and 3",
                 {"make": partial(_recalibration_problem, s + 2, dropout=True, training=True, sizes=(2, 10, 3)),
                  "seed": s + 2}),
            Case("CNN in eval mode, one batch", {"make": partial(_recalibration_problem, s + 3, conv=True,
                                                                 sizes=(6,)), "seed": s + 3}),
        ]
    return cases


def _run_recalibrate(fn, case):
    model, batches, x_test = case.data["make"]()
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.random.fork_rng():  # Dropout masks, should Dropout be on
        torch.manual_seed(case.data["seed"])
        fn(model, [b.clone() for b in batches])
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for stat in ("running_mean", "running_var", "num_batches_tracked"):
                out[f"BN layer {name}: {stat}"] = _value(getattr(m, stat))
            out[f"BN layer {name}: momentum"] = repr(m.momentum)
    out["train/eval mode of every module"] = ", ".join(
        f"{name or 'model'}: {'train' if m.training else 'eval'}" for name, m in model.named_modules())
    out["weights unchanged"] = all(torch.equal(a, b.detach()) for a, b in zip(weights, model.parameters()))
    with torch.no_grad():
        out["model output in eval mode on a test batch"] = model.eval()(x_test)
    return out


def check_recalibrate_batchnorm(recalibrate_batchnorm, hidden=False):
    """Check recalibrate_batchnorm(model, batches): statistics, modes, momenta, weights."""
    __tracebackhide__ = True
    report_pass("recalibrate_batchnorm", run_check(
        "recalibrate_batchnorm", recalibrate_batchnorm, ref.recalibrate_batchnorm,
        _recalibration_cases(hidden), _run_recalibrate, RECALIBRATE_CATALOGUE))


def _frozen(bn):
    for p in bn.parameters():
        p.requires_grad_(False)
    return bn


_COUNT_MODELS = {
    "Linear(64, 32) then BatchNorm1d(32)": lambda: nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32)),
    "CNN: Conv2d(3, 16, 3, bias=False), BatchNorm2d(16), ReLU, Conv2d(16, 32, 3, bias=False), "
    "BatchNorm2d(32), ReLU, Flatten, Linear(32, 10)": lambda: nn.Sequential(
        nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, bias=False),
        nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32, 10)),
    "a frozen BatchNorm1d(8) (requires_grad=False) then a trainable BatchNorm1d(4)": lambda: nn.Sequential(
        _frozen(nn.BatchNorm1d(8)), nn.Linear(8, 4), nn.BatchNorm1d(4)),
    "BatchNorm2d(6, affine=False) and BatchNorm1d(5, track_running_stats=False)": lambda: nn.Sequential(
        nn.BatchNorm2d(6, affine=False), nn.Flatten(), nn.Linear(54, 5), nn.BatchNorm1d(5, track_running_stats=False)),
    "Linear(3, 4) alone: no BN layer": lambda: nn.Sequential(nn.Linear(3, 4)),
}

_HIDDEN_COUNT_MODELS = {
    "nested blocks: two (Conv2d, BatchNorm2d(8)) blocks inside a Sequential inside a ModuleDict": lambda: nn.ModuleDict(
        {"features": nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)) for _ in range(2)))}),
    "a bare BatchNorm1d(100)": lambda: nn.BatchNorm1d(100),
    "BatchNorm1d(10) with its weight frozen and its bias trainable": lambda: _freeze_weight(nn.BatchNorm1d(10)),
}


def _freeze_weight(bn):
    bn.weight.requires_grad_(False)
    return bn


def check_bn_parameter_counts(bn_parameter_counts, hidden=False):
    """Check bn_parameter_counts(model) -> (trainable, non_trainable)."""
    __tracebackhide__ = True
    models = {**_COUNT_MODELS, **(_HIDDEN_COUNT_MODELS if hidden else {})}
    cases = [Case(label, {"make": make}) for label, make in models.items()]

    def run(fn, case):
        trainable, non_trainable = fn(case.data["make"]())
        return {"trainable": int(trainable), "non-trainable": int(non_trainable)}

    report_pass("bn_parameter_counts", run_check("bn_parameter_counts", bn_parameter_counts, ref.bn_parameter_counts,
                                             cases, run, COUNTS_CATALOGUE))
