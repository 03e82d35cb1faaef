"""Chapter 5 - inference and running statistics: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.inference``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more edge cases).

The layer checks run seeded sequences of ``train()`` / ``eval()`` steps, with
gamma and beta set away from 1 and 0, and compare the output, the gradients
(PyTorch) and every running statistic after each step. Cases are ordered so that
each mistake shows first on a case it changes on its own: the structure of the
module, then the running statistics of a 2-D sequence, then one 4-D step (the
output only), then the rest. Every ``run_*`` function below is the only code
that touches the learner's object; it uses neither the reference nor the
catalogue, and reports a failure of the check's own calls on the learner's
result (a backward pass, a call of a folded layer) as such, not as a crash of
the learner's function.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import inference as ref
from . import Case, CheckFailed, Misconception, report_pass, run_check

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


def _refuses(x_shape, n, training, bug):
    """Whether a wrong layer raises the one-value-per-channel error."""
    if bug == "batch_of_one_refused":
        return training and x_shape[0] < 2
    if bug == "no_size_1_error":
        return False
    return n == 1 and (training or bug != "size_1_only_in_training")


def _normalized(x, mu, v, eps, bug):
    """(x - mu) / sqrt(v + eps), or one of the classic slips with eps."""
    if bug == "no_eps":
        return (x - mu) / v ** 0.5
    if bug == "eps_outside_sqrt":
        return (x - mu) / (v ** 0.5 + eps)
    return (x - mu) / (v + eps) ** 0.5


def _affine(x_hat, gamma, beta, training, bug):
    if gamma is None or bug == "no_affine" or (bug == "eval_ignores_affine" and not training):
        return x_hat
    return x_hat * gamma + beta


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
        if _refuses(x.shape, n, self.training, self.bug):
            raise ValueError("Expected more than 1 value per channel when training")
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        if self.training or self.bug == "batch_stats_in_eval":
            if self.bug == "per_activation" and x.ndim == 4:
                mu, v = x.mean(axis=0, keepdims=True), x.var(axis=0, keepdims=True)
            else:
                mu, v = mean.reshape(shape), var.reshape(shape)
        else:
            mu, v = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        out = _affine(_normalized(x, mu, v, self.eps, self.bug), self.gamma.reshape(shape),
                      self.beta.reshape(shape), self.training, self.bug)
        if self.training or self.bug == "update_in_eval":
            self.num_batches_tracked += self.bug != "no_count"
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
            m = x.shape[0] if self.bug == "bessel_uses_batch_size" else n
            self.running_mean, self.running_var = _running_update(
                self.running_mean, self.running_var, mean, var, m, factor, self.bug)
        return out


class _WrongTorchBatchNorm(nn.Module):
    """PyTorch BN layer (nn.BatchNorm2d's interface) with one switchable mistake."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, bug=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        stats_factory = {} if bug == "factory_ignored" else factory
        self.eps, self.momentum, self.bug, self.track_running_stats = eps, momentum, bug, track_running_stats
        self.names = ("gamma", "beta") if bug == "gamma_beta_names" else ("weight", "bias")
        for name, init in zip(self.names, (torch.ones, torch.zeros)):
            self.register_parameter(name, nn.Parameter(init(num_features, **factory)) if affine else None)
        stats = {"running_mean": torch.zeros(num_features, **stats_factory),
                 "running_var": torch.ones(num_features, **stats_factory)}
        for name, value in stats.items():
            if track_running_stats and bug == "as_parameters":
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value if track_running_stats else None)
        counter = {"float_counter": torch.tensor(0.0, **stats_factory),
                   "counter_on_cpu": torch.tensor(0), "factory_ignored": torch.tensor(0)}.get(
            bug, torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("num_batches_tracked", counter if track_running_stats else None)

    def forward(self, x):
        use_batch = self.training or self.running_mean is None or self.bug == "batch_stats_in_eval"
        n = x.numel() // x.shape[1]
        if use_batch and _refuses(x.shape, n, self.training, self.bug):
            raise ValueError("Expected more than 1 value per channel when training")
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        mean, var = x.mean(dim=dims), x.var(dim=dims, correction=0)
        if not use_batch:
            mu, v = self.running_mean.view(shape), self.running_var.view(shape)
        elif self.bug == "per_activation" and x.dim() == 4:
            mu, v = x.mean(dim=0, keepdim=True), x.var(dim=0, correction=0, keepdim=True)
        else:
            mu, v = mean.view(shape), var.view(shape)
        gamma, beta = (getattr(self, name) for name in self.names)
        y = _affine(_normalized(x, mu, v, self.eps, self.bug), None if gamma is None else gamma.view(shape),
                    None if beta is None else beta.view(shape), self.training, self.bug)
        if self.running_mean is not None and (self.training or self.bug == "update_in_eval"):
            self._update(mean, var, x.shape[0] if self.bug == "bessel_uses_batch_size" else n)
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
    ("eps left out: the layer divides by sqrt(var) instead of sqrt(var + eps)",
     "add eps inside the square root, in training and in eval mode: (x - mean) / sqrt(var + eps). Without it "
     "a channel with (nearly) constant values divides by (nearly) 0, and every output is off by a factor "
     "sqrt((var + eps) / var).",
     "no_eps"),
    ("eps added outside the square root: sqrt(var) + eps instead of sqrt(var + eps)",
     "eps goes inside the square root, as in Algorithm 1 and PyTorch: (x - mean) / sqrt(var + eps).",
     "eps_outside_sqrt"),
    ("gamma and beta ignored in eval mode",
     "eval mode changes only which statistics normalize x: return gamma * (x - running_mean) / "
     "sqrt(running_var + eps) + beta, with the same gamma and beta as in training.",
     "eval_ignores_affine"),
    ("gamma and beta never applied",
     "the layer's output is gamma * x_hat + beta (per channel), in training and in eval mode; gamma and beta "
     "are the layer's own attributes, which training (or the test) sets to other values than 1 and 0.",
     "no_affine"),
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
    ("unbiased correction with the batch size N instead of the number of values per channel",
     "for (N, C, L) and (N, C, H, W) input a channel's statistics run over n = N * L or N * H * W values, so "
     "the unbiased running variance is var * n / (n - 1) with that n, not N / (N - 1) (which divides by "
     "zero for a batch of one image).",
     "bessel_uses_batch_size"),
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
    ("every training batch of one refused, also when a channel has more than one value",
     "the error is about values per channel, n = N * L or N * H * W, not about N: a (1, C, H, W) batch with "
     "H * W > 1 or a (1, C, L) batch with L > 1 trains fine in PyTorch. Raise only when n == 1.",
     "batch_of_one_refused"),
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
    ("running statistics created without dtype= and device=",
     "create every parameter and buffer with the constructor's dtype and device "
     "(torch.zeros(num_features, dtype=dtype, device=device)); num_batches_tracked is "
     "torch.tensor(0, dtype=torch.long, device=device).",
     "factory_ignored"),
    ("num_batches_tracked is a float tensor, not torch.long",
     "num_batches_tracked counts steps: create it as torch.tensor(0, dtype=torch.long, device=device), as "
     "PyTorch does, so that state_dict()s load both ways.",
     "float_counter"),
    ("num_batches_tracked not created on `device`",
     "create it as torch.tensor(0, dtype=torch.long, device=device): like every other buffer it must live on "
     "the module's device (a GPU, say), or the module cannot be built or moved there consistently.",
     "counter_on_cpu"),
    ("no error for one value per channel in eval mode without running statistics",
     "with track_running_stats=False eval mode normalizes with the batch's statistics too, so one value per "
     "channel must raise the same ValueError there, as PyTorch does.",
     "size_1_only_in_training"),
]

BATCHNORM_CATALOGUE = [Misconception(name, fix, partial(_WrongBatchNorm, bug=bug))
                       for name, fix, bug in _LAYER_MISTAKES]
# The eval-only size error goes before the general one: where both reproduce a learner's
# output, the earlier entry is named.
_TORCH_ORDER = sorted(_LAYER_MISTAKES + _TORCH_MISTAKES, key=lambda m: m[2] != "size_1_only_in_training")
TORCH_BATCHNORM_CATALOGUE = [Misconception(name, fix, partial(_WrongTorchBatchNorm, bug=bug))
                             for name, fix, bug in _TORCH_ORDER]


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
    mean = 0.0 if bug == "mean_kept" else bn.running_mean
    folded = copy.deepcopy(layer)
    dtype = torch.float32 if bug == "default_dtype" else layer.weight.dtype  # built without dtype=
    weight = layer.weight.detach() * scale.view(-1, *[1] * (layer.weight.dim() - 1))
    folded.weight = nn.Parameter(weight.to(dtype))
    folded.bias = nn.Parameter(((bias - mean) * scale + bn.bias.detach()).to(dtype))
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
    Misconception(
        "the fold forgets to subtract running_mean in the new bias",
        "BN subtracts running_mean before scaling: b' = s * (b - running_mean) + beta, not s * b + beta.",
        partial(_fold, bug="mean_kept")),
    Misconception(
        "the folded layer is created in the default dtype (float32), not in the layer's dtype",
        "build the new layer with the old one's dtype and device, e.g. nn.Linear(layer.in_features, "
        "layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device); otherwise it is float32 "
        "and refuses the float64 inputs the float64 layer took.",
        partial(_fold, bug="default_dtype")),
]


@torch.no_grad()
def _recalibrate(model, batches, bug=None):
    """Precise BN with switchable mistakes."""
    bns = ref.batchnorm_layers(model)
    modes, momenta = {m: m.training for m in model.modules()}, [bn.momentum for bn in bns]
    was_training = model.training
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
    if bug == "model_flag":
        model.train(was_training)
    elif bug != "modes_not_restored":
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
        "one train/eval flag restored for the whole model instead of each module's own",
        "model.train(flag) sets every submodule to the same mode, but a model can hold modules in other modes "
        "(a frozen BN layer in eval mode inside a model in training mode): remember m.training for every m in "
        "model.modules() and set each back.",
        partial(_recalibrate, bug="model_flag")),
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
# The layer checks. Visible seeds are 0..; hidden seeds start at 1000 and add edge cases.

def _batches(rng, shapes_and_modes, dtype=np.float64, constant=False):
    """[{mode, x, dout}, ...]; x's channels have their own mean and spread (channel 0
    holds one constant value when ``constant``)."""
    c = shapes_and_modes[0][1][1]
    loc, scale = rng.uniform(-3, 3, size=c), rng.uniform(0.5, 3, size=c)
    steps = []
    for mode, shape in shapes_and_modes:
        view = (1, c) + (1,) * (len(shape) - 2)
        x = rng.normal(size=shape) * scale.reshape(view) + loc.reshape(view)
        if constant:
            x[:, 0] = loc[0]
        steps.append({"mode": mode, "x": x.astype(dtype), "dout": rng.normal(size=shape).astype(dtype)})
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

    def case(label, shape_modes, kwargs=None, record="all", dtype=np.float64, affine=True, constant=False):
        kw = dict(kwargs or {})
        if torch_layer:
            kw.setdefault("dtype", torch.float32 if dtype == np.float32 else torch.float64)
        c = shape_modes[0][1][1]
        data = {"C": c, "kwargs": kw, "steps": _batches(rng, shape_modes, dtype, constant),
                "record": record, "shapes_in_names": not hidden}
        if affine:  # gamma and beta away from 1 and 0
            data["gamma"] = rng.uniform(0.5, 2.0, size=c) * rng.choice([-1, 1], size=c)
            data["beta"] = rng.normal(size=c)
        if dtype == np.float32:
            data.update(_FLOAT32_TOL)
        return Case(label, data)

    c = 5 if hidden else 4
    cases = []
    if torch_layer:
        cases += [
            case(f"(8, {c}) input, dtype=torch.float64: the module's parameters, buffers, state_dict keys, "
                 f"dtypes and devices, then one training step", [("train", (8, c))], record="structure"),
            case("TorchBatchNorm(3, dtype=torch.float64, device='meta'): the dtype and device of every "
                 "parameter and buffer ('meta', PyTorch's device without data, stands in for a GPU)",
                 [("train", (2, 3))], {"device": "meta"}, record="construction", affine=False),
        ]
    cases += [
        case(f"(10, {c}) input: train x3, eval, train, eval with momentum=0.1, checked after every step",
             _sequence((10, c), _TRAIN_EVAL), record="all" if torch_layer else "initial"),
        case("(6, 3, 4, 5) input: one training step (the output only)", [("train", (6, 3, 4, 5))],
             record="output"),
        case("(5, 3, 7) input with momentum=None (cumulative average): train x3, eval, train, eval",
             _sequence((5, 3, 7), _TRAIN_EVAL), {"momentum": None}),
        case("(4, 3, 3, 3) input with eps=1e-3, momentum=0.3, channel 0 constant: train x3, eval, train, eval",
             _sequence((4, 3, 3, 3), _TRAIN_EVAL), {"eps": 1e-3, "momentum": 0.3}, constant=True),
        case("(1, 3, 4, 5) input, a batch of one image (20 values per channel): train x3, eval, train, eval",
             _sequence((1, 3, 4, 5), _TRAIN_EVAL)),
    ]
    if torch_layer:
        cases += [
            case("(6, 3, 2, 2) input, affine=False, track_running_stats=False: train, eval, train",
                 [("train", (6, 3, 2, 2)), ("eval", (6, 3, 2, 2)), ("train", (6, 3, 2, 2))],
                 {"affine": False, "track_running_stats": False}, record="structure", affine=False),
            case("(7, 3, 4, 4) float32 input: train x3, eval, train, eval",
                 _sequence((7, 3, 4, 4), _TRAIN_EVAL), dtype=np.float32),
        ]
    cases.append(case("one value per channel: training on (1, 3) and on (1, 3, 1, 1) must raise ValueError; "
                      "eval on (1, 3) works, and so does training on (1, 3, 2, 2) and on (1, 3, 5)",
                      [("train", (1, 3)), ("train", (1, 3, 1, 1)), ("eval", (1, 3)), ("train", (1, 3, 2, 2)),
                       ("train", (1, 3, 5))], record="outcome"))
    if torch_layer:
        cases.append(case("track_running_stats=False: eval mode uses the batch's statistics, so eval on (1, 3) "
                          "must raise ValueError too; eval on (1, 3, 4) works",
                          [("train", (1, 3)), ("eval", (1, 3)), ("eval", (1, 3, 4))],
                          {"track_running_stats": False}, record="outcome"))
    if hidden:
        cases += [
            case("(2, 6) input, the smallest batch: train x3, eval, train, eval", _sequence((2, 6), _TRAIN_EVAL)),
            case("(3, 2, 5) input with momentum=1.0: running statistics = the last batch's",
                 _sequence((3, 2, 5), _TRAIN_EVAL), {"momentum": 1.0}),
            case("(6, 4) input: eval before any training, then train, eval",
                 [("eval", (6, 4)), ("train", (6, 4)), ("eval", (6, 4))]),
            case("(9, 2, 3, 3) input, batches of 9 and 2 mixed, momentum=None",
                 _sequence((9, 2, 3, 3), _TRAIN_EVAL, small={1, 4}), {"momentum": None}),
            case("(1, 2, 6) input, a batch of one sequence: train x3, eval, train, eval",
                 _sequence((1, 2, 6), _TRAIN_EVAL), {"eps": 0.1}),
        ]
        if not torch_layer:
            cases.append(case("(7, 3, 4, 4) float32 input: train x3, eval, train, eval",
                              _sequence((7, 3, 4, 4), _TRAIN_EVAL), dtype=np.float32))
    return cases


def _step_label(i, step, with_shape):
    shape = f" on a {tuple(step['x'].shape)} batch" if with_shape else ""
    return f"step {i} ({step['mode']}(){shape})"


def _step_outputs(record, torch_layer):
    """The names of what a step of a sequence records (after the step's label)."""
    names = ["output", "gradient of the input"] if torch_layer else ["output"]
    if record != "output":
        names += ["weight.grad", "bias.grad"] if torch_layer else ["training"]
        names += ["running_mean", "running_var", "num_batches_tracked"]
        if record == "structure":
            names.append("running statistics hold an autograd graph")
    return names


def _raised(out, label, record, torch_layer):
    """A step that raised ValueError: the outcome case records just that; a sequence
    records it in place of each of the step's outputs."""
    if record == "outcome":
        out[label] = "raises ValueError"
    else:
        for name in _step_outputs(record, torch_layer):
            out[f"{label}: {name}"] = "not computed: the step raised ValueError"


def _run_batchnorm(cls, case):
    """Run a NumPy BN layer through the case's steps; record outputs and statistics."""
    d = case.data
    make = partial(cls, d["C"], **d["kwargs"])

    def fresh():
        bn = make()
        if "gamma" in d:
            bn.gamma, bn.beta = d["gamma"], d["beta"]
        return bn

    out = {}
    if d["record"] == "initial":
        bn = make()
        for name in ("gamma", "beta", "running_mean", "running_var", "num_batches_tracked", "training"):
            out[f"initial {name}"] = copy.deepcopy(getattr(bn, name, "missing"))  # not a view: it changes in place
        if "gamma" in d:
            bn.gamma, bn.beta = d["gamma"], d["beta"]
    else:
        bn = fresh()
    for i, step in enumerate(d["steps"], 1):
        label = _step_label(i, step, d["shapes_in_names"])
        if d["record"] == "outcome":
            bn = fresh()
        getattr(bn, step["mode"])()
        try:
            y = bn.forward(step["x"])
        except ValueError:
            _raised(out, label, d["record"], False)
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
                                       _run_batchnorm, BATCHNORM_CATALOGUE, hidden=hidden))


def _names(named) -> str:
    return ", ".join(sorted(name for name, value in named if value is not None))


def _placement(module) -> str:
    """'name: dtype on device' for every parameter and buffer, sorted by name."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return "; ".join(f"{name}: {str(t.dtype).replace('torch.', '')} on {t.device.type}"
                     for name, t in sorted(tensors, key=lambda item: item[0]))


def _value(t):
    """A tensor's values (detached copy), or a word for None / a missing attribute."""
    if isinstance(t, str) or t is None:
        return "None" if t is None else t
    return t.detach().clone()


BUILTIN_BATCH_NORM = "PyTorch's own batch norm used instead of your code"
_BUILTIN_MESSAGE = (
    "TorchBatchNorm runs PyTorch's own batch-norm kernel ({}), through nn.BatchNorm1d/2d, F.batch_norm, "
    "torch.batch_norm, F.instance_norm or a reference to one of them saved earlier: compute the mean, the "
    "variance and the running statistics yourself with tensor operations.")


class _RefusingBuiltinBatchNorm(TorchDispatchMode):
    """While active (on this thread), every call of one of PyTorch's batch-norm kernels
    (aten::native_batch_norm, aten::_native_batch_norm_legit, aten::cudnn_batch_norm,
    ...) raises. It sits at the dispatcher, below every Python name, so a reference to
    F.batch_norm or torch.batch_norm saved before the check started is refused too, and
    so is F.instance_norm (built on the same kernel); ``used`` remembers the first
    kernel, in case the learner's code catches the error. It cannot see a kernel run on
    another thread (dispatch modes are per thread), code that switches Python dispatch
    modes off on purpose, or other kernels bent to the same end (F.layer_norm or
    F.group_norm on a transposed tensor)."""

    def __init__(self):
        super().__init__()
        self.used = None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # otherwise the first use imports torch._dynamo: seconds per grading kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if "batch_norm" in name:
            self.used = self.used or name
            raise CheckFailed(_BUILTIN_MESSAGE.format(name), misconception=BUILTIN_BATCH_NORM)
        return func(*args, **(kwargs or {}))


def _refusing_builtin_batch_norm():
    return _RefusingBuiltinBatchNorm()


def _set_affine(bn, d):
    """Copy the case's gamma and beta into the module's weight and bias, where it has them."""
    params = dict(bn.named_parameters(recurse=False))
    with torch.no_grad():
        for name, key in (("weight", "gamma"), ("bias", "beta")):
            if key in d and isinstance(params.get(name), torch.Tensor):
                params[name].copy_(torch.from_numpy(d[key]))


def _backward(y, dout, label):
    """(y * dout).sum().backward(), the check's own call; a failure is reported as such."""
    try:
        (y * dout).sum().backward()
    except RuntimeError as exc:
        raise CheckFailed(
            f"TorchBatchNorm's output at {label} is not connected to its input by autograd, so the check's "
            f"backward pass failed ({exc}). Compute the output with differentiable tensor operations: not "
            f"under torch.no_grad(), not through NumPy, not with .detach() on the batch statistics.") from None


def _run_torch_batchnorm(cls, case):
    """Run a BN module through the case's steps, PyTorch's batch-norm kernels refused;
    record outputs, gradients and buffers."""
    guard = _refusing_builtin_batch_norm()
    with guard:
        out = _torch_steps(cls, case)
    if getattr(guard, "used", None):  # the learner's code caught the refusal and went on
        raise CheckFailed(_BUILTIN_MESSAGE.format(guard.used), misconception=BUILTIN_BATCH_NORM)
    return out


def _torch_steps(cls, case):
    d = case.data
    make = partial(cls, d["C"], **d["kwargs"])
    bn, out = make(), {}
    if not isinstance(bn, nn.Module):
        raise CheckFailed(f"TorchBatchNorm must be a subclass of nn.Module (class TorchBatchNorm(nn.Module)), "
                          f"got an instance of {type(bn).__name__}.")
    if d["record"] in ("structure", "construction"):
        if d["record"] == "structure":
            out["state_dict() keys"] = _names(bn.state_dict().items())
            out["names in parameters()"] = _names(bn.named_parameters())
            out["names in buffers()"] = _names(bn.named_buffers())
        out["dtype and device of every parameter and buffer"] = _placement(bn)
        if d["record"] == "construction":
            return out
    _set_affine(bn, d)
    dtype = d["kwargs"]["dtype"]
    for i, step in enumerate(d["steps"], 1):
        label = _step_label(i, step, d["shapes_in_names"])
        if d["record"] == "outcome":
            bn = make()
            _set_affine(bn, d)
        bn.train(step["mode"] == "train")
        xt = torch.from_numpy(step["x"]).requires_grad_()  # shares memory with the case: in-place changes show
        try:
            y = bn(xt)
        except ValueError:
            _raised(out, label, d["record"], True)
            continue
        if d["record"] == "outcome":
            out[label] = "returns an output"
            continue
        if not isinstance(y, torch.Tensor):
            raise CheckFailed(f"TorchBatchNorm's forward must return a tensor, got {type(y).__name__} at {label}.")
        _backward(y, torch.from_numpy(step["dout"]).to(dtype), label)
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


def check_torch_batchnorm(TorchBatchNorm, hidden=False):
    """Check a TorchBatchNorm module: structure, dtypes and devices, outputs, gradients and
    buffers after every step, written without PyTorch's own batch-norm kernels."""
    __tracebackhide__ = True
    report_pass("TorchBatchNorm", run_check(
        "TorchBatchNorm", TorchBatchNorm, ref.TorchBatchNorm, _layer_cases(hidden, True), _run_torch_batchnorm,
        TORCH_BATCHNORM_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Algorithm 2

def _population_cases(hidden):
    rng = np.random.default_rng(1001 if hidden else 1)
    settings = [(6, 3, 8, np.float64), (3, 1, 2, np.float64), (5, 4, 32, np.float64)]
    if hidden:
        settings += [(2, 6, 3, np.float64), (40, 2, 16, np.float64), (1, 3, 10, np.float64), (4, 3, 6, np.float32)]
    cases = []
    for k, c, m, dtype in settings:
        x = rng.normal(size=(k, m, c)) * rng.uniform(0.5, 4, size=c) + rng.uniform(-5, 5, size=c)
        if c >= 3:
            x[..., 1] = 2.5  # a constant feature: variance 0
        data = {"means": x.mean(axis=1).astype(dtype), "vars": x.var(axis=1).astype(dtype), "m": m}
        if dtype == np.float32:
            data.update(_FLOAT32_TOL)
        kind = ", float32" if dtype == np.float32 else ""
        cases.append(Case(f"{k} mini-batches of size m={m}, {c} features{kind}"
                          + (" (feature 1 constant)" if c >= 3 else ""), data))
    return cases


def _run_population(fn, case):
    d = case.data
    mean, var = fn(d["means"], d["vars"], d["m"])
    return {"mean": np.asarray(mean), "var": np.asarray(var)}


def check_population_statistics(population_statistics, hidden=False):
    """Check population_statistics(batch_means, batch_vars, batch_size) -> (mean, var)."""
    __tracebackhide__ = True
    report_pass("population_statistics", run_check(
        "population_statistics", population_statistics, ref.population_statistics,
        _population_cases(hidden), _run_population, POPULATION_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Folding

def _fill(module, gen):
    """Random parameters and running statistics (running_var in [0.2, 3])."""
    with torch.no_grad():
        for name, t in module.named_parameters():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
        if getattr(module, "running_var", None) is not None:
            module.running_mean.copy_(2 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(0.2 + 2.8 * torch.rand(module.running_var.shape, generator=gen))
            module.num_batches_tracked.fill_(17)


def _fold_problem(seed, conv=None, in_out=(5, 4), bias=True, eps=1e-5, bn_training=False, dtype=torch.float64):
    """(layer, bn): a Linear or Conv2d (``conv`` holds its settings) and a BN layer after it."""
    gen = torch.Generator().manual_seed(seed)
    i, o = in_out
    if conv is None:
        layer, bn = nn.Linear(i, o, bias=bias), nn.BatchNorm1d(o, eps=eps)
    else:
        layer, bn = nn.Conv2d(i, o, bias=bias, **conv), nn.BatchNorm2d(o, eps=eps)
    layer, bn = layer.to(dtype), bn.to(dtype)
    _fill(layer, gen)
    _fill(bn, gen)
    bn.train(bn_training)
    return layer, bn


def _fold_case(label, seed, conv=None, in_out=(5, 4), dtype=torch.float64, **kwargs):
    gen = torch.Generator().manual_seed(seed + 500)
    shape = (6, in_out[0]) if conv is None else (2, in_out[0], 7, 7)
    data = {"make": partial(_fold_problem, seed, conv, in_out, dtype=dtype, **kwargs),
            "x": torch.randn(shape, generator=gen, dtype=dtype)}
    if dtype == torch.float32:
        data.update(_FLOAT32_TOL)
    return Case(label, data)


def _fold_cases(hidden):
    s = 1002 if hidden else 2
    cases = [
        _fold_case("float64 Linear(5, 4) with bias, BatchNorm1d(4, eps=1e-5)", s),
        _fold_case("float64 Linear(3, 6) with bias, BatchNorm1d(6, eps=0.1)", s + 1, in_out=(3, 6), eps=0.1),
        _fold_case("float64 Conv2d(3, 4, 3, padding=1, bias=False), BatchNorm2d(4)",
                   s + 2, {"kernel_size": 3, "padding": 1}, (3, 4), bias=False),
        _fold_case("float64 Conv2d(2, 5, 3, stride=2) with bias, BatchNorm2d(5, eps=1e-3)",
                   s + 3, {"kernel_size": 3, "stride": 2}, (2, 5), eps=1e-3),
    ]
    if hidden:
        cases += [
            _fold_case("float64 Conv2d(4, 6, (3, 1), groups=2, dilation=2, padding=2) with bias, BatchNorm2d(6)",
                       s + 4, {"kernel_size": (3, 1), "groups": 2, "dilation": 2, "padding": 2}, (4, 6)),
            _fold_case("float64 Linear(8, 3) without bias, BatchNorm1d(3) left in training mode (the fold uses "
                       "its running statistics all the same)", s + 5, in_out=(8, 3), bias=False, bn_training=True),
            _fold_case("float32 Conv2d(3, 2, 1, padding_mode='reflect', padding=1) with bias, BatchNorm2d(2)",
                       s + 6, {"kernel_size": 1, "padding": 1, "padding_mode": "reflect"}, (3, 2),
                       dtype=torch.float32),
        ]
    return cases


def _snapshot(*modules):
    return [(m.training, {k: v.clone() for k, v in m.state_dict().items()}) for m in modules]


def _same(a, b):
    return all(ta == tb and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
               for (ta, sa), (tb, sb) in zip(a, b))


def _describe(t) -> str:
    return "None" if t is None else f"{str(t.dtype).replace('torch.', '')} on {t.device.type}"


def _run_fold(fn, case):
    layer, bn = case.data["make"]()
    x = case.data["x"]
    before = _snapshot(layer, bn)
    folded = fn(layer, bn)
    if not isinstance(folded, nn.Module):
        raise CheckFailed(f"fold_batchnorm must return a new nn.Linear or nn.Conv2d module, "
                          f"got {type(folded).__name__}.")
    weight, bias = getattr(folded, "weight", None), getattr(folded, "bias", None)
    out = {
        "returns a new module (not `layer` itself)": folded is not layer,
        "type of the result": type(folded).__name__,
        "layer and bn left unchanged": _same(before, _snapshot(layer, bn)),
        "dtype and device of the folded weight and bias": f"weight: {_describe(weight)}; bias: {_describe(bias)}",
        "folded weight": _value(weight),
        "folded bias": _value(bias),
    }
    if isinstance(layer, nn.Conv2d):
        out["convolution settings"] = ", ".join(
            f"{name}={getattr(folded, name, 'missing')}"
            for name in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"))
    try:  # the check's own call of the learner's result
        with torch.no_grad():
            out["output on a test batch"] = folded(x)
    except Exception as exc:
        out["output on a test batch"] = (f"the check's call folded(x) on a {str(x.dtype).replace('torch.', '')} "
                                         f"batch x of shape {tuple(x.shape)} raised {type(exc).__name__}: {exc}")
    return out


def check_fold_batchnorm(fold_batchnorm, hidden=False):
    """Check fold_batchnorm(layer, bn) -> a new nn.Linear / nn.Conv2d with layer's dtype and device."""
    __tracebackhide__ = True
    report_pass("fold_batchnorm", run_check("fold_batchnorm", fold_batchnorm, ref.fold_batchnorm,
                                            _fold_cases(hidden), _run_fold, FOLD_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Recalibration

def _recalibration_model(seed, conv=False, dropout=False, training=False, frozen=(), dropout_on=False):
    """A small float64 model whose BN layers hold stale statistics; modules listed in
    ``frozen`` (indices) are in eval mode, the Dropout in training mode if ``dropout_on``."""
    gen = torch.Generator().manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 2, 3), nn.BatchNorm2d(2, momentum=0.3))
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Dropout(0.5) if dropout else nn.Identity(),
                              nn.Linear(8, 3), nn.BatchNorm1d(3, momentum=None))
    model = model.double()
    for m in model:
        _fill(m, gen)
    model.train(training)
    for i in frozen:
        model[i].eval()
    if dropout_on:
        model[3].train()
    return model


def _recalibration_case(label, seed, sizes, conv=False, **kwargs):
    gen = torch.Generator().manual_seed(seed + 500)
    shape = (3, 5, 5) if conv else (5,)
    batches = [1.5 * torch.randn((n, *shape), generator=gen, dtype=torch.float64) + 1 for n in sizes]
    return Case(label, {"make": partial(_recalibration_model, seed, conv, **kwargs), "batches": batches,
                        "x_test": torch.randn((4, *shape), generator=gen, dtype=torch.float64), "seed": seed})


def _recalibration_cases(hidden):
    s = 1003 if hidden else 3
    cases = [
        _recalibration_case("MLP Linear-BN-ReLU-Dropout-Linear-BN in eval mode, stale statistics, 4 batches",
                            s, (6, 9, 7, 8), dropout=True),
        _recalibration_case("CNN Conv-BN-ReLU-Conv-BN in training mode, 3 batches", s + 1, (4, 4, 4), conv=True,
                            training=True),
        _recalibration_case("modules in mixed modes: an MLP in training mode whose first BN layer is frozen in "
                            "eval mode (as when fine-tuning), 3 batches", s + 2, (5, 8, 6), dropout=True,
                            training=True, frozen=(1,)),
    ]
    if hidden:
        cases += [
            _recalibration_case("MLP in training mode, Dropout, batches of 2, 10 and 3", s + 3, (2, 10, 3),
                                dropout=True, training=True),
            _recalibration_case("CNN in eval mode, one batch", s + 4, (6,), conv=True),
            _recalibration_case("modules in mixed modes: an MLP in eval mode with its Dropout left in training "
                                "mode, 3 batches", s + 5, (4, 4, 4), dropout=True, dropout_on=True),
            _recalibration_case("modules in mixed modes: a CNN in training mode whose last BN layer is frozen in "
                                "eval mode, 2 batches", s + 6, (3, 5), conv=True, training=True, frozen=(4,)),
        ]
    return cases


def _run_recalibrate(fn, case):
    model = case.data["make"]()
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.random.fork_rng():  # Dropout masks, should Dropout be on
        torch.manual_seed(case.data["seed"])
        fn(model, case.data["batches"])
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
        out["model output in eval mode on a test batch"] = model.eval()(case.data["x_test"])
    return out


def check_recalibrate_batchnorm(recalibrate_batchnorm, hidden=False):
    """Check recalibrate_batchnorm(model, batches): statistics, each module's mode, momenta, weights."""
    __tracebackhide__ = True
    report_pass("recalibrate_batchnorm", run_check(
        "recalibrate_batchnorm", recalibrate_batchnorm, ref.recalibrate_batchnorm,
        _recalibration_cases(hidden), _run_recalibrate, RECALIBRATE_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Parameter counts

def _frozen(module, names=("weight", "bias")):
    for name in names:
        getattr(module, name).requires_grad_(False)
    return module


def _count_model(kind):
    """The models whose BN parameters the counting check counts."""
    if kind == "dense":
        return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                             nn.Linear(32, 10))
    if kind == "frozen":
        return nn.Sequential(_frozen(nn.BatchNorm1d(8)), nn.Linear(8, 4), nn.BatchNorm1d(4))
    if kind == "options":
        return nn.Sequential(nn.BatchNorm2d(6, affine=False), nn.Flatten(), nn.Linear(54, 5),
                             nn.BatchNorm1d(5, track_running_stats=False))
    if kind == "none":
        return nn.Sequential(nn.Linear(3, 4))
    if kind == "nested":
        return nn.ModuleDict({"features": nn.Sequential(
            *(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)) for _ in range(2)))})
    if kind == "bare":
        return nn.BatchNorm1d(100)
    if kind == "weight_frozen":
        return _frozen(nn.BatchNorm1d(10), ("weight",))
    raise ValueError(kind)


_COUNT_MODELS = {
    "Linear(64, 32) then BatchNorm1d(32)": "dense",
    "CNN: Conv2d(3, 16, 3, bias=False), BatchNorm2d(16), ReLU, Conv2d(16, 32, 3, bias=False), "
    "BatchNorm2d(32), ReLU, Flatten, Linear(32, 10)": "cnn",
    "a frozen BatchNorm1d(8) (requires_grad=False) then a trainable BatchNorm1d(4)": "frozen",
    "BatchNorm2d(6, affine=False) and BatchNorm1d(5, track_running_stats=False)": "options",
    "Linear(3, 4) alone: no BN layer": "none",
}
_HIDDEN_COUNT_MODELS = {
    "nested blocks: two (Conv2d, BatchNorm2d(8)) blocks inside a Sequential inside a ModuleDict": "nested",
    "a bare BatchNorm1d(100)": "bare",
    "BatchNorm1d(10) with its weight frozen and its bias trainable": "weight_frozen",
}


def _run_counts(fn, case):
    trainable, non_trainable = fn(case.data["make"]())
    return {"trainable": int(trainable), "non-trainable": int(non_trainable)}


def check_bn_parameter_counts(bn_parameter_counts, hidden=False):
    """Check bn_parameter_counts(model) -> (trainable, non_trainable)."""
    __tracebackhide__ = True
    models = {**_COUNT_MODELS, **(_HIDDEN_COUNT_MODELS if hidden else {})}
    cases = [Case(label, {"make": partial(_count_model, kind)}) for label, kind in models.items()]
    report_pass("bn_parameter_counts", run_check(
        "bn_parameter_counts", bn_parameter_counts, ref.bn_parameter_counts, cases, _run_counts,
        COUNTS_CATALOGUE, hidden=hidden))
