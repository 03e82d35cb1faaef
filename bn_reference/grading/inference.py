"""Chapter 5 - inference and running statistics: the grader's checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.inference``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces every output the learner gets
wrong. ``hidden=True`` runs the grader's own cases (seeded from the course's
secret, more edge cases). The ``_run_*`` functions that touch the learner's object,
and the case helpers that build the small models some cases hand to it, live in the
learner package (:mod:`bn_exercises.inference`); its visible checks replay this
module's visible cases from recorded answers.

The layer checks run seeded sequences of ``train()`` / ``eval()`` steps, with
gamma and beta set away from 1 and 0, and compare the output, the gradients
(PyTorch) and every running statistic after each step. Cases are ordered so that
each mistake shows first on a case it changes on its own: the structure of the
module, then the running statistics of a 2-D sequence, then one 4-D step (the
output only), then the rest.

The catalogue's wrong implementations are switchable: ``bugs`` names the mistakes
one of them makes, and the pairs that real code makes together (the CS231n
convention, a layer without a mode switch, ...) are listed after the single
mistakes as combined entries.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import torch
from torch import nn

from bn_exercises.inference import (BUILTIN_BATCH_NORM, _count_model, _fold_problem, _frozen,
                                    _recalibration_model, _run_batchnorm, _run_counts, _run_experiment, _run_fold,
                                    _run_population, _run_recalibrate, _run_torch_batchnorm, digits_net,
                                    digits_split, train_digits)

from .. import inference as ref
from . import Case, Misconception, case_rng, combined, hidden_seed, report_pass, run_check

__all__ = [
    "check_batchnorm",
    "check_population_statistics",
    "check_torch_batchnorm",
    "check_fold_batchnorm",
    "check_recalibrate_batchnorm",
    "check_bn_parameter_counts",
    "check_inference_experiment",
    "CATALOGUE",
    "BUILTIN_BATCH_NORM",
]


def _catalogue(impl, mistakes, pairs=()):
    """Entries from ``(name, fix, bug)`` rows (``impl`` with ``bugs=(bug,)``), then the
    combined entries for the ``(bug, bug)`` pairs real code makes together."""
    single = {bug: Misconception(name, fix, partial(impl, bugs=(bug,))) for name, fix, bug in mistakes}
    return [*single.values(), *(combined(single[a], single[b], partial(impl, bugs=(a, b))) for a, b in pairs)]


# --------------------------------------------------------------------------
# Wrong BN layers: one NumPy and one PyTorch class whose ``bugs`` switch on
# mistakes; bugs=() is the right layer.

def _running_update(running_mean, running_var, mean, biased_var, n, factor, bugs):
    """New (running_mean, running_var) with switchable mistakes (NumPy or torch)."""
    var = biased_var if "biased" in bugs else biased_var * n / (n - 1)
    if "keras_side" in bugs:  # Keras's form, momentum on the old value
        return factor * running_mean + (1 - factor) * mean, factor * running_var + (1 - factor) * var
    if "keras_copy_decays" in bugs:  # Keras/CS231n form with its (1 - momentum) * batch_var term lost
        return factor * running_mean + (1 - factor) * mean, factor * running_var
    new_var = (1 - factor) * running_var if "decays" in bugs else (1 - factor) * running_var + factor * var
    return (1 - factor) * running_mean + factor * mean, new_var


def _refuses(x_shape, n, training, bugs):
    """Whether a wrong layer raises the one-value-per-channel error."""
    if "batch_of_one_refused" in bugs:
        return training and x_shape[0] < 2
    if "no_size_1_error" in bugs:
        return False
    return n == 1 and (training or "size_1_only_in_training" not in bugs)


def _normalized(x, mu, v, eps, bugs):
    """(x - mu) / sqrt(v + eps), or one of the classic slips with eps."""
    if "eps_ignored" in bugs:
        eps = 1e-5
    if "no_eps" in bugs:
        return (x - mu) / v ** 0.5
    if "eps_outside_sqrt" in bugs:
        return (x - mu) / (v ** 0.5 + eps)
    return (x - mu) / (v + eps) ** 0.5


def _affine(x_hat, gamma, beta, training, bugs):
    if gamma is None or "no_affine" in bugs or ("eval_ignores_affine" in bugs and not training):
        return x_hat
    return x_hat * gamma + beta


class _WrongBatchNorm:
    """NumPy BN layer (PyTorch's conventions) with switchable mistakes."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, bugs=()):
        self.eps, self.momentum, self.bugs = eps, momentum, bugs
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
        if _refuses(x.shape, n, self.training, self.bugs):
            raise ValueError("Expected more than 1 value per channel when training")
        mean, var = x.mean(axis=axes), x.var(axis=axes)
        if self.training or "batch_stats_in_eval" in self.bugs:
            if "per_activation" in self.bugs and x.ndim == 4:
                mu, v = x.mean(axis=0, keepdims=True), x.var(axis=0, keepdims=True)
            else:
                mu, v = mean.reshape(shape), var.reshape(shape)
            if "unbiased_forward" in self.bugs:
                v = v * n / (n - 1)
        else:
            mu, v = self.running_mean.reshape(shape), self.running_var.reshape(shape)
        out = _affine(_normalized(x, mu, v, self.eps, self.bugs), self.gamma.reshape(shape),
                      self.beta.reshape(shape), self.training, self.bugs)
        if self.training or "update_in_eval" in self.bugs:
            self.num_batches_tracked += "no_count" not in self.bugs
            factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
            m = x.shape[0] if "bessel_uses_batch_size" in self.bugs else n
            self.running_mean, self.running_var = _running_update(
                self.running_mean, self.running_var, mean, var, m, factor, self.bugs)
        return out


class _WrongTorchBatchNorm(nn.Module):
    """PyTorch BN layer (nn.BatchNorm2d's interface) with switchable mistakes."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, bugs=()):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        stats_factory = {} if "factory_ignored" in bugs else factory
        self.eps, self.momentum, self.bugs, self.track_running_stats = eps, momentum, bugs, track_running_stats
        self.names = ("gamma", "beta") if "gamma_beta_names" in bugs else ("weight", "bias")
        for name, init in zip(self.names, (torch.ones, torch.zeros)):
            self.register_parameter(name, nn.Parameter(init(num_features, **factory)) if affine else None)
        stats = {"running_mean": torch.zeros(num_features, **stats_factory),
                 "running_var": torch.ones(num_features, **stats_factory)}
        for name, value in stats.items():
            if track_running_stats and "as_parameters" in bugs:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value if track_running_stats else None)
        counters = {"float_counter": torch.tensor(0.0, **stats_factory), "counter_on_cpu": torch.tensor(0),
                    "factory_ignored": torch.tensor(0)}
        counter = next((counters[b] for b in bugs if b in counters),
                       torch.tensor(0, dtype=torch.long, device=device))
        self.register_buffer("num_batches_tracked", counter if track_running_stats else None)

    def forward(self, x):
        use_batch = self.training or self.running_mean is None or "batch_stats_in_eval" in self.bugs
        n = x.numel() // x.shape[1]
        if use_batch and _refuses(x.shape, n, self.training, self.bugs):
            raise ValueError("Expected more than 1 value per channel when training")
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        mean, var = x.mean(dim=dims), x.var(dim=dims, correction=0)
        if not use_batch:
            mu, v = self.running_mean.view(shape), self.running_var.view(shape)
        elif "per_activation" in self.bugs and x.dim() == 4:
            mu, v = x.mean(dim=0, keepdim=True), x.var(dim=0, correction=0, keepdim=True)
        else:
            mu, v = mean.view(shape), var.view(shape)
        if use_batch and "unbiased_forward" in self.bugs:  # torch.var's default, correction=1
            v = v * n / (n - 1)
        gamma, beta = (getattr(self, name) for name in self.names)
        y = _affine(_normalized(x, mu, v, self.eps, self.bugs), None if gamma is None else gamma.view(shape),
                    None if beta is None else beta.view(shape), self.training, self.bugs)
        if self.running_mean is not None and (self.training or "update_in_eval" in self.bugs):
            self._update(mean, var, x.shape[0] if "bessel_uses_batch_size" in self.bugs else n)
        return y

    def _update(self, mean, var, n):
        if "graph_attached" in self.bugs:  # no torch.no_grad(), no detach, not in place
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean, self.running_var = _running_update(
                self.running_mean, self.running_var, mean, var, n, factor, ())
            return
        with torch.no_grad():
            self.num_batches_tracked += int("no_count" not in self.bugs)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            new_mean, new_var = _running_update(self.running_mean, self.running_var, mean, var, n, factor,
                                                self.bugs)
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
    ("normalized with the unbiased batch variance (divide by n - 1)",
     "the forward pass normalizes with the biased batch variance, divide by n (Algorithm 1): x.var(axis=..., "
     "ddof=0) in NumPy, x.var(dim=..., correction=0) in PyTorch, whose torch.var divides by n - 1 unless told "
     "otherwise. Only running_var takes the unbiased one, var * n / (n - 1).",
     "unbiased_forward"),
    ("the constructor's eps ignored (eps hard-coded to 1e-5)",
     "use the eps the layer was built with (self.eps), in training and in eval mode: a layer built with "
     "eps=1e-3 (Keras's default) must add 1e-3 to the variance.",
     "eps_ignored"),
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


#: Mistakes real code makes together: the CS231n convention (the momentum on the old value and the biased
#: running variance, as in CS231n's assignment), a layer without a mode switch, the two variances swapped.
_LAYER_PAIRS = [("keras_side", "biased"), ("batch_stats_in_eval", "update_in_eval"), ("unbiased_forward", "biased")]
BATCHNORM_CATALOGUE = _catalogue(_WrongBatchNorm, _LAYER_MISTAKES, _LAYER_PAIRS)
# The eval-only size error goes before the general one: where both reproduce a learner's
# output, the earlier entry is named.
_TORCH_ORDER = sorted(_LAYER_MISTAKES + _TORCH_MISTAKES, key=lambda m: m[2] != "size_1_only_in_training")
TORCH_BATCHNORM_CATALOGUE = _catalogue(_WrongTorchBatchNorm, _TORCH_ORDER, _LAYER_PAIRS)


def _population(means, variances, m, bugs=()):
    """Algorithm 2 with switchable mistakes."""
    means, variances = np.asarray(means, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    k = len(means)
    if "var_of_means" in bugs:
        return means.mean(axis=0), means.var(axis=0)
    factor = m / (m - 1)
    if "biased" in bugs:
        factor = 1.0
    elif "inverted" in bugs:
        factor = (m - 1) / m
    elif "batches" in bugs:
        factor = k / (k - 1)
    return means.mean(axis=0), factor * variances.mean(axis=0)


POPULATION_CATALOGUE = _catalogue(_population, [
    ("no m / (m - 1) correction: the population variance is biased",
     "each batch variance divides by m, so their average underestimates Var[x]: multiply it by "
     "m / (m - 1) (Algorithm 2), m = batch_size.",
     "biased"),
    ("correction inverted: (m - 1) / m instead of m / (m - 1)",
     "the batch variances are too small by the factor (m - 1) / m, so multiply by its inverse m / (m - 1).",
     "inverted"),
    ("correction uses the number of batches instead of the batch size",
     "m in m / (m - 1) is the size of each mini-batch (batch_size), not the number of batches K.",
     "batches"),
    ("variance of the batch means instead of the mean of the batch variances",
     "the spread of the batch means measures how noisy mu_B is, not how spread out x is: "
     "Var[x] = m / (m - 1) * mean_k(batch_vars[k]).",
     "var_of_means"),
])


def _fold(layer, bn, bugs=()):
    """BN folding with switchable mistakes; copies ``layer`` and rescales the copy."""
    eps = 0.0 if "no_eps" in bugs else bn.eps
    std = torch.sqrt(bn.running_var + eps)
    scale = bn.weight.detach() / (bn.running_var + eps if "variance" in bugs else std)
    bias = layer.bias.detach() if layer.bias is not None and "no_bias" not in bugs else 0.0
    mean = 0.0 if "mean_kept" in bugs else bn.running_mean
    folded = copy.deepcopy(layer)
    dtype = torch.float32 if "default_dtype" in bugs else layer.weight.dtype  # built without dtype=
    weight = layer.weight.detach() * scale.view(-1, *[1] * (layer.weight.dim() - 1))
    folded.weight = nn.Parameter(weight.to(dtype))
    folded.bias = nn.Parameter(((bias - mean) * scale + bn.bias.detach()).to(dtype))
    return folded


#: Two slips in the new bias at once (it becomes beta alone), and a float32 layer whose bias also
#: forgets the old one: both seen where the bias is written out by hand.
FOLD_CATALOGUE = _catalogue(_fold, [
    ("the fold forgets eps",
     "BN divides by sqrt(running_var + eps), not sqrt(running_var): s = gamma / sqrt(running_var + bn.eps).",
     "no_eps"),
    ("the fold forgets the preceding layer's bias",
     "the layer's bias b is shifted and scaled like the rest of its output: "
     "b' = s * (b - running_mean) + beta (b = 0 when the layer has no bias).",
     "no_bias"),
    ("the fold divides by the variance instead of the standard deviation",
     "s = gamma / sqrt(running_var + eps): take the square root.",
     "variance"),
    ("the fold forgets to subtract running_mean in the new bias",
     "BN subtracts running_mean before scaling: b' = s * (b - running_mean) + beta, not s * b + beta.",
     "mean_kept"),
    ("the folded layer is created in the default dtype (float32), not in the layer's dtype",
     "build the new layer with the old one's dtype and device, e.g. nn.Linear(layer.in_features, "
     "layer.out_features, dtype=layer.weight.dtype, device=layer.weight.device); otherwise it is float32 "
     "and refuses the float64 inputs the float64 layer took.",
     "default_dtype"),
], [("no_bias", "mean_kept"), ("default_dtype", "no_bias")])


@torch.no_grad()
def _recalibrate(model, batches, bugs=()):
    """Precise BN with switchable mistakes."""
    bns = ref.batchnorm_layers(model)
    modes, momenta = {m: m.training for m in model.modules()}, [bn.momentum for bn in bns]
    was_training = model.training
    model.train("dropout_on" in bugs)
    for bn in bns:
        if "no_reset" not in bugs:
            bn.reset_running_stats()
        bn.momentum = bn.momentum if "ema" in bugs else None
        bn.train("bn_in_eval" not in bugs)
    for x in batches:
        model(x)
    if "momentum_kept_none" not in bugs:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
    if "model_flag" in bugs:
        model.train(was_training)
    elif "modes_not_restored" not in bugs:
        for m, training in modes.items():
            m.training = training
    return model


#: The batches run through with the momentum kept and nothing reset (an EMA on top of the old
#: statistics), and nothing restored afterwards, neither modes nor momenta.
RECALIBRATE_CATALOGUE = _catalogue(_recalibrate, [
    ("running statistics not reset before recomputing",
     "call bn.reset_running_stats() on every BN layer first: otherwise the old estimates and "
     "num_batches_tracked are averaged in with the new batches.",
     "no_reset"),
    ("an exponential moving average instead of the cumulative average",
     "set bn.momentum = None while recalibrating, so every batch gets the same weight "
     "(factor 1 / num_batches_tracked), then restore the old momentum.",
     "ema"),
    ("the BN layers run in eval mode, so nothing is recomputed",
     "running statistics are only updated in training mode: call bn.train() on the BN layers "
     "(and run the batches under torch.no_grad(), so no weight changes).",
     "bn_in_eval"),
    ("the whole model in training mode: Dropout is active while the statistics are collected",
     "put the model in eval mode and only the BN layers in training mode: the statistics must be those "
     "of the inputs the BN layers see at inference, when Dropout is off.",
     "dropout_on"),
    ("train/eval modes not restored (the BN layers are left in training mode)",
     "remember every module's training flag before you start and set it back at the end.",
     "modes_not_restored"),
    ("one train/eval flag restored for the whole model instead of each module's own",
     "model.train(flag) sets every submodule to the same mode, but a model can hold modules in other modes "
     "(a frozen BN layer in eval mode inside a model in training mode): remember m.training for every m in "
     "model.modules() and set each back.",
     "model_flag"),
    ("momentum left at None after recalibrating",
     "remember each BN layer's momentum and set it back at the end, so later training uses the same EMA.",
     "momentum_kept_none"),
], [("no_reset", "ema"), ("modes_not_restored", "momentum_kept_none")])


def _counts(model, bugs=()):
    """BN parameter counts with switchable mistakes."""
    trainable = non_trainable = 0
    for bn in ref.batchnorm_layers(model):
        for p in bn.parameters(recurse=False):
            if p.requires_grad or {"frozen_ignored", "all_trainable"} & set(bugs):
                trainable += p.numel()
            else:
                non_trainable += p.numel()
        if bn.running_mean is not None and "buffers_ignored" not in bugs:
            stats = 2 * bn.running_mean.numel()
            if "all_trainable" in bugs:
                trainable += stats
            else:
                non_trainable += stats + ("counter" in bugs)  # the counter: one value per layer
    if "whole_model" in bugs:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, non_trainable


#: Every value of parameters() counted as trainable and nothing else: the buffers left out and
#: requires_grad ignored.
COUNTS_CATALOGUE = _catalogue(_counts, [
    ("running mean and variance not counted",
     "they are buffers, not parameters, so model.parameters() skips them, but the layer stores them: "
     "add running_mean.numel() + running_var.numel() to the non-trainable count.",
     "buffers_ignored"),
    ("running mean and variance counted as trainable",
     "running_mean and running_var are buffers estimated by averaging, never by gradient descent: "
     "count them as non-trainable (Keras: 4 weights per feature, 2 of them trainable).",
     "all_trainable"),
    ("num_batches_tracked counted as a parameter",
     "num_batches_tracked is an integer step counter, not a statistic of the features: leave it out.",
     "counter"),
    ("requires_grad ignored: frozen gamma and beta counted as trainable",
     "a parameter with requires_grad=False is not trained: count it as non-trainable.",
     "frozen_ignored"),
    ("the whole model's parameters counted, not only the BN layers'",
     "count only the parameters and buffers of the BN layers (isinstance(m, (nn.BatchNorm1d, "
     "nn.BatchNorm2d)) for m in model.modules()).",
     "whole_model"),
], [("buffers_ignored", "frozen_ignored")])


# --------------------------------------------------------------------------
# The graded experiment: wrong experiments, each with the reference's layer and fold

def _accuracy(logits, y):
    return (logits.argmax(1) == y[:len(logits)]).float().mean().item()


def _experiment(seed, bugs=()):
    """The experiment of ``ref.inference_experiment`` with switchable mistakes."""
    X_train, y_train, X_test, y_test = digits_split()
    net = train_digits(digits_net(ref.TorchBatchNorm, seed), X_train, y_train, seed)
    bn = net[1]
    with torch.no_grad():
        net.eval()
        alone = torch.cat([net(x[None]) for x in X_test])
        whole = net(X_test)
        saved = bn.state_dict() if "aliased_state" in bugs else copy.deepcopy(bn.state_dict())
        net.train("train_not_called" not in bugs)
        try:
            net(X_test[:1])
            refused = False
        except ValueError:
            refused = True
        n = len(X_test) // 2 * 2
        pairs = torch.cat([net(X_test[i:i + 2]) for i in range(0, n, 2)])
        order = torch.arange(n) if "same_pairing" in bugs else torch.randperm(
            n, generator=torch.Generator().manual_seed(seed))
        shuffled = torch.empty_like(pairs)
        for i in range(0, n, 2):
            shuffled[order[i:i + 2]] = net(X_test[order[i:i + 2]])
        train_whole = net(X_test)
        shift = (bn.running_mean - saved["running_mean"]).abs().max().item()
        if "not_restored" not in bugs:
            bn.load_state_dict(saved)
        if "shift_after_restore" in bugs:
            shift = (bn.running_mean - saved["running_mean"]).abs().max().item()
        if "eval_not_restored" not in bugs:
            net.eval()
        after = net(X_test)
        folded = nn.Sequential(ref.fold_batchnorm(net[0], bn), net[2], net[3])(X_test)
    return {
        "eval_accuracy": _accuracy(alone, y_test),
        "eval_batch_difference": (alone - whole).abs().max().item(),
        "single_image_error": refused,
        "train_accuracy_pairs": _accuracy(pairs, y_test),
        "train_accuracy_whole": _accuracy(train_whole, y_test),
        "pairing_changes": (pairs.argmax(1) != shuffled.argmax(1)).float().mean().item(),
        "running_mean_shift": shift,
        "restored_difference": (after - whole).abs().max().item(),
        "fold_difference": (folded - after).abs().max().item(),
        "fold_agreement": (folded.argmax(1) == after.argmax(1)).float().mean().item(),
    }


EXPERIMENT_CATALOGUE = _catalogue(_experiment, [
    ("the training-mode passes ran in eval mode (net.train() not called before them)",
     "call net.train() after saving the BN state and before the single image, the pairs and the whole test "
     "set: in eval mode every prediction uses the running statistics, so nothing depends on the batch, a "
     "single image is accepted and running_mean does not move.",
     "train_not_called"),
    ("the BN layer's running statistics were not restored after the training-mode passes",
     "after the training-mode passes, put the saved state back with net[1].load_state_dict(saved), where "
     "saved = copy.deepcopy(net[1].state_dict()) was taken before them: every forward pass in training mode "
     "overwrites the running statistics.",
     "not_restored"),
    ("the BN state saved without a copy (state_dict() returns the live buffers)",
     "save a copy before the training-mode passes: saved = copy.deepcopy(net[1].state_dict()). state_dict() "
     "alone returns the layer's own running_mean and running_var, which the passes change in place, so the "
     "'saved' state changed with them: the shift you measured against it is 0 and restoring it restores nothing.",
     "aliased_state"),
    ("the network left in training mode after restoring the BN state (net.eval() not called again)",
     "call net.eval() after load_state_dict and before measuring restored_difference and the fold: "
     "load_state_dict restores the running statistics, not the mode, and in training mode the network "
     "normalizes with the test set's own statistics (and moves running_mean again).",
     "eval_not_restored"),
    ("the shuffled pairs are the consecutive pairs again",
     "pair the images differently the second time: shuffle the indices with torch.randperm(n, generator="
     "torch.Generator().manual_seed(seed)), predict the images in pairs of that order, and put each output back "
     "at its image's index before comparing the predicted classes.",
     "same_pairing"),
    ("running_mean_shift measured after the BN state was restored",
     "measure how far running_mean moved right after the training-mode passes, before load_state_dict puts "
     "the saved values back (afterwards the difference is 0 by construction).",
     "shift_after_restore"),
])

CATALOGUE = {
    "BatchNorm": BATCHNORM_CATALOGUE,
    "population_statistics": POPULATION_CATALOGUE,
    "TorchBatchNorm": TORCH_BATCHNORM_CATALOGUE,
    "fold_batchnorm": FOLD_CATALOGUE,
    "recalibrate_batchnorm": RECALIBRATE_CATALOGUE,
    "bn_parameter_counts": COUNTS_CATALOGUE,
    "inference_experiment": EXPERIMENT_CATALOGUE,
}


# --------------------------------------------------------------------------
# The layer checks. Visible case streams are seeded 0..; hidden ones from the course's secret
# (case_rng, hidden_seed), and they add edge cases.

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
    rng = case_rng(hidden, 0)

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


def check_batchnorm(BatchNorm, hidden=False):
    """Check the NumPy BatchNorm class over seeded train/eval sequences."""
    __tracebackhide__ = True
    report_pass("BatchNorm", run_check("BatchNorm", BatchNorm, ref.BatchNorm, _layer_cases(hidden, False),
                                       _run_batchnorm, BATCHNORM_CATALOGUE, hidden=hidden))


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
    rng = case_rng(hidden, 1)
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


def check_population_statistics(population_statistics, hidden=False):
    """Check population_statistics(batch_means, batch_vars, batch_size) -> (mean, var)."""
    __tracebackhide__ = True
    report_pass("population_statistics", run_check(
        "population_statistics", population_statistics, ref.population_statistics,
        _population_cases(hidden), _run_population, POPULATION_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Folding


def _fold_case(label, seed, conv=None, in_out=(5, 4), dtype=torch.float64, **kwargs):
    gen = torch.Generator().manual_seed(seed + 500)
    shape = (6, in_out[0]) if conv is None else (2, in_out[0], 7, 7)
    data = {"make": partial(_fold_problem, seed, conv, in_out, dtype=dtype, **kwargs),
            "x": torch.randn(shape, generator=gen, dtype=dtype)}
    if dtype == torch.float32:
        data.update(_FLOAT32_TOL)
    return Case(label, data)


def _fold_cases(hidden):
    s = hidden_seed(2) if hidden else 2
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


def check_fold_batchnorm(fold_batchnorm, hidden=False):
    """Check fold_batchnorm(layer, bn) -> a new nn.Linear / nn.Conv2d with layer's dtype and device."""
    __tracebackhide__ = True
    report_pass("fold_batchnorm", run_check("fold_batchnorm", fold_batchnorm, ref.fold_batchnorm,
                                            _fold_cases(hidden), _run_fold, FOLD_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Recalibration


def _recalibration_case(label, seed, sizes, conv=False, **kwargs):
    gen = torch.Generator().manual_seed(seed + 500)
    shape = (3, 5, 5) if conv else (5,)
    batches = [1.5 * torch.randn((n, *shape), generator=gen, dtype=torch.float64) + 1 for n in sizes]
    return Case(label, {"make": partial(_recalibration_model, seed, conv, **kwargs), "batches": batches,
                        "x_test": torch.randn((4, *shape), generator=gen, dtype=torch.float64), "seed": seed})


def _recalibration_cases(hidden):
    s = hidden_seed(3) if hidden else 3
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


def check_recalibrate_batchnorm(recalibrate_batchnorm, hidden=False):
    """Check recalibrate_batchnorm(model, batches): statistics, each module's mode, momenta, weights."""
    __tracebackhide__ = True
    report_pass("recalibrate_batchnorm", run_check(
        "recalibrate_batchnorm", recalibrate_batchnorm, ref.recalibrate_batchnorm,
        _recalibration_cases(hidden), _run_recalibrate, RECALIBRATE_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# Parameter counts. The visible models come from the learner package's case helper; the hidden
# ones, other models of the same kinds and a few more, are built here (the learner package holds
# no hidden case).

def _hidden_count_model(kind):
    """The models of the hidden counting cases."""
    if kind == "frozen":
        return nn.Sequential(nn.Conv2d(2, 6, 1), _frozen(nn.BatchNorm2d(6)), nn.Flatten(), nn.Linear(6, 3),
                             nn.BatchNorm1d(3))
    if kind == "dense":
        return nn.Sequential(nn.Linear(20, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5), nn.BatchNorm1d(5))
    if kind == "options":
        return nn.Sequential(nn.BatchNorm1d(7, affine=False, track_running_stats=False), nn.Linear(7, 4),
                             nn.BatchNorm1d(4, track_running_stats=False))
    if kind == "other_norms":
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(36))
    if kind == "nested":
        return nn.ModuleDict({"features": nn.Sequential(
            *(nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)) for _ in range(2)))})
    if kind == "bare":
        return nn.BatchNorm1d(100)
    if kind == "weight_frozen":
        return _frozen(nn.BatchNorm1d(10), ("weight",))
    raise ValueError(kind)


# The frozen model first: it tells every mistake from every other, pairs included.
_COUNT_MODELS = {
    "a frozen BatchNorm1d(8) (requires_grad=False), Linear(8, 4), then a trainable BatchNorm1d(4)": "frozen",
    "Linear(64, 32) then BatchNorm1d(32)": "dense",
    "CNN: Conv2d(3, 16, 3, bias=False), BatchNorm2d(16), ReLU, Conv2d(16, 32, 3, bias=False), "
    "BatchNorm2d(32), ReLU, Flatten, Linear(32, 10)": "cnn",
    "BatchNorm2d(6, affine=False) and BatchNorm1d(5, track_running_stats=False)": "options",
    "Linear(3, 4) alone: no BN layer": "none",
}
_HIDDEN_COUNT_MODELS = ["frozen", "dense", "options", "other_norms", "nested", "bare", "weight_frozen"]


def _count_cases(hidden):
    if hidden:
        return [Case(kind, {"make": partial(_hidden_count_model, kind)}) for kind in _HIDDEN_COUNT_MODELS]
    return [Case(label, {"make": partial(_count_model, kind)}) for label, kind in _COUNT_MODELS.items()]


def check_bn_parameter_counts(bn_parameter_counts, hidden=False):
    """Check bn_parameter_counts(model) -> (trainable, non_trainable)."""
    __tracebackhide__ = True
    report_pass("bn_parameter_counts", run_check(
        "bn_parameter_counts", bn_parameter_counts, ref.bn_parameter_counts, _count_cases(hidden), _run_counts,
        COUNTS_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# The graded experiment: one seed, visible or drawn from the course's secret. The margins of
# its run function hold on every seed the tests try, for the reference and for a second
# correct implementation.

def _experiment_cases(hidden):
    seed = hidden_seed("inference experiment") % 2**31 if hidden else 0
    return [Case(f"inference_experiment(seed={seed})", {"seed": seed})]


def check_inference_experiment(inference_experiment, hidden=False):
    """Check inference_experiment(seed) -> dict: the phenomenon it measures, with margins."""
    __tracebackhide__ = True
    report_pass("inference_experiment", run_check(
        "inference_experiment", inference_experiment, ref.inference_experiment, _experiment_cases(hidden),
        _run_experiment, EXPERIMENT_CATALOGUE, hidden=hidden))
