"""Chapter 6 - small batches: grading checks and the misconception catalogue.

Each ``check_*`` takes the learner's function or class, runs it and the
reference (``bn_reference.small_batches``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's output.
``hidden=True`` runs the grader's own cases (other seeds, more edge cases).

Every interaction with the learner's object happens inside the ``_run_*``
functions, which use only numpy, torch and the small helpers of this module
(never the reference or the catalogue), and return plain data. While they run,
PyTorch's own normalization functions (F.batch_norm, F.group_norm,
F.layer_norm, F.instance_norm and the torch.* functions behind them, which
nn.BatchNorm*, nn.GroupNorm and nn.LayerNorm call) refuse to work: the
exercise is to write the statistics out.

The module checks run seeded sequences of ``train()`` / ``eval()`` steps and
compare the output, the gradients of the input and of gamma and beta (random
upstream gradients) and the running statistics after every step. Cases are
ordered so that each mistake first shows on a case it changes.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .. import small_batches as ref
from . import Case, CheckFailed, Misconception, run_check, report_pass

__all__ = [
    "check_layer_norm",
    "check_group_norm",
    "check_ghost_batch_norm",
    "check_batch_renorm",
    "CATALOGUE",
    "PROVIDED",
    "BUILTIN_NORM",
]

#: Helpers of bn_reference.small_batches that the notebook uses: none.
PROVIDED = ()

BUILTIN_NORM = "PyTorch's own normalization used instead of your code"

_FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}
_KERNELS = ("batch_norm", "group_norm", "layer_norm", "instance_norm")


class _RefusingBuiltinNorms(TorchDispatchMode):
    """While active (on this thread), every call of one of PyTorch's normalization kernels
    (aten::native_batch_norm, aten::native_group_norm, aten::native_layer_norm, ...) raises.
    It sits at the dispatcher, below every Python name, so nn.BatchNorm*, nn.GroupNorm,
    nn.LayerNorm, F.*_norm and references to them saved earlier are all refused; ``used``
    remembers the first kernel, in case the learner's code catches the error."""

    def __init__(self, task: str):
        super().__init__()
        self.task, self.used = task, None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # otherwise the first use imports torch._dynamo: seconds per grading kernel

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if any(kernel in name for kernel in _KERNELS):
            self.used = self.used or name
            raise _builtin_failure(self.task, name)
        return func(*args, **(kwargs or {}))


def _builtin_failure(task: str, kernel: str) -> CheckFailed:
    return CheckFailed(
        f"{task} runs PyTorch's own normalization kernel ({kernel}), through nn.BatchNorm*, nn.GroupNorm, "
        f"nn.LayerNorm, F.batch_norm, F.group_norm, F.layer_norm or F.instance_norm: compute the means, the "
        f"variances and the running statistics yourself with tensor (or NumPy) operations.",
        misconception=BUILTIN_NORM)


def _without_builtin_norms(task: str, body):
    """``body()`` with PyTorch's normalization kernels refused."""
    guard = _RefusingBuiltinNorms(task)
    with guard:
        out = body()
    if guard.used:  # the learner's code caught the refusal and went on
        raise _builtin_failure(task, guard.used)
    return out


# --------------------------------------------------------------------------
# layer_norm and group_norm (NumPy)

def _channel_view(v, ndim):
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(x, gamma, beta, eps, axes, ddof=0, eps_inside=True):
    """(x - mean) / sqrt(var + eps) * gamma + beta over ``axes``, gamma and beta per channel."""
    mean = x.mean(axis=axes, keepdims=True)
    var = x.var(axis=axes, ddof=ddof, keepdims=True)
    std = np.sqrt(var + eps) if eps_inside else np.sqrt(var) + eps
    return (x - mean) / std * _channel_view(gamma, x.ndim) + _channel_view(beta, x.ndim)


def _wrong_layer_norm(x, gamma, beta, eps=1e-5, bug=None):
    """Layer norm with one switchable mistake."""
    x = np.asarray(x, dtype=np.float64)
    axes = {"batch_axis": (0, *range(2, x.ndim)), "spatial_only": tuple(range(2, x.ndim))}.get(
        bug, tuple(range(1, x.ndim)))
    return _normalize(x, gamma, beta, eps, axes, ddof=1 if bug == "unbiased" else 0,
                      eps_inside=bug != "eps_outside")


LAYER_NORM_CATALOGUE = [
    Misconception(
        "layer norm over the batch axis (that is batch normalization)",
        "layer norm computes one mean and one variance per example, over every axis but the batch axis 0: "
        "axis=1 for (N, D) input, axis=(1, 2, 3) for (N, C, H, W); it never mixes examples.",
        partial(_wrong_layer_norm, bug="batch_axis")),
    Misconception(
        "statistics over the spatial axes only (that is instance normalization)",
        "layer norm averages over the channels too: axis=(1, 2, 3) for (N, C, H, W) input (axis=1 for (N, D)), "
        "one mean and one variance per example.",
        partial(_wrong_layer_norm, bug="spatial_only")),
    Misconception(
        "unbiased (n - 1) variance in layer norm",
        "normalize with the biased variance (divide by the number of values, x.var(...) with ddof=0), as "
        "BN's forward pass and torch.nn.functional.layer_norm do.",
        partial(_wrong_layer_norm, bug="unbiased")),
    Misconception(
        "eps added outside the square root",
        "divide by sqrt(var + eps), not by sqrt(var) + eps.",
        partial(_wrong_layer_norm, bug="eps_outside")),
]


def _wrong_group_norm(x, num_groups, gamma, beta, eps=1e-5, bug=None):
    """Group norm with one switchable mistake."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    gamma, beta = np.asarray(gamma, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    if bug == "no_error":  # a loop over groups of c // G channels; leftover channels pass through
        size, out = c // num_groups, x.copy()
        for g in range(num_groups):
            block = slice(g * size, (g + 1) * size)
            out[:, block] = _normalize(x[:, block], gamma[block], beta[block], eps, (1, 2, 3))
        return out
    if c % num_groups:
        raise ValueError(f"C={c} is not divisible by num_groups={num_groups}")
    if bug == "interleaved":  # channel k in group k % G
        grouped = x.reshape(n, c // num_groups, num_groups, -1).transpose(0, 2, 1, 3).reshape(n, num_groups, -1)
    else:
        grouped = x.reshape(n, num_groups, -1)
    axes = (0, 2) if bug == "batch_axis" else (2,)
    mean = grouped.mean(axis=axes, keepdims=True)
    var = grouped.var(axis=axes, ddof=1 if bug == "unbiased" else 0, keepdims=True)
    x_hat = (grouped - mean) / np.sqrt(var + eps)
    if bug == "interleaved":
        x_hat = x_hat.reshape(n, num_groups, c // num_groups, -1).transpose(0, 2, 1, 3)
    x_hat = x_hat.reshape(x.shape)
    if bug == "per_group":  # gamma[g], beta[g] for every channel of group g
        gamma, beta = np.repeat(gamma[:num_groups], c // num_groups), np.repeat(beta[:num_groups], c // num_groups)
    return x_hat * _channel_view(gamma, x.ndim) + _channel_view(beta, x.ndim)


GROUP_NORM_CATALOGUE = [
    Misconception(
        "groups formed across the wrong axis: interleaved channels (channel c in group c % G)",
        "group g holds the C / G consecutive channels g * C/G, ..., (g + 1) * C/G - 1: "
        "x.reshape(N, G, C // G, H, W) (or reshape(N, G, -1)), with the statistics over axes (2, 3, 4); "
        "reshape(N, C // G, G, ...) interleaves the channels.",
        partial(_wrong_group_norm, bug="interleaved")),
    Misconception(
        "gamma and beta per group instead of per channel",
        "gamma and beta have one value per channel (shape (C,)); reshape the normalized groups back to "
        "(N, C, H, W), then y = x_hat * gamma.reshape(1, C, 1, 1) + beta.reshape(1, C, 1, 1).",
        partial(_wrong_group_norm, bug="per_group")),
    Misconception(
        "unbiased (n - 1) variance in group norm",
        "normalize with the biased variance (divide by the number of values in the group, ddof=0), as "
        "torch.nn.functional.group_norm does.",
        partial(_wrong_group_norm, bug="unbiased")),
    Misconception(
        "group statistics over the whole batch (the batch axis included)",
        "group norm normalizes each example on its own: for x.reshape(N, G, -1) take the mean and variance "
        "over axis 2 only, one pair per example and group.",
        partial(_wrong_group_norm, bug="batch_axis")),
    Misconception(
        "no ValueError when C is not divisible by num_groups",
        "when C % num_groups != 0 the groups cannot all hold C / G channels: raise "
        "ValueError('num_groups must divide the number of channels') before computing anything.",
        partial(_wrong_group_norm, bug="no_error")),
]


def _affine_params(rng, c):
    return rng.normal(1.0, 0.5, size=c), rng.normal(0.0, 1.0, size=c)


def _norm_input(rng, shape, dtype=np.float64):
    """Random input whose examples and channels differ in mean and spread."""
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    loc, scale = rng.uniform(-3, 3, size=view), rng.uniform(0.5, 3, size=view)
    per_example = rng.uniform(0.5, 2.0, size=(shape[0],) + (1,) * (len(shape) - 1))
    return ((rng.normal(size=shape) * scale + loc) * per_example).astype(dtype)


def _layer_norm_cases(hidden: bool):
    rng = np.random.default_rng(1006 if hidden else 6)
    settings = [  # (label, shape, kwargs, dtype, constant example)
        ("(N, D) = (5, 4), random gamma and beta", (5, 4), {}, np.float64, False),
        ("(N, C, H, W) = (3, 4, 2, 3), eps=1e-3", (3, 4, 2, 3), {"eps": 1e-3}, np.float64, False),
        ("a batch of one example, (1, 6): layer norm needs no batch", (1, 6), {}, np.float64, False),
        ("(2, 3, 3, 3) with example 1 constant (variance 0, output beta), eps=1e-2", (2, 3, 3, 3),
         {"eps": 1e-2}, np.float64, True),
        ("float32 input (4, 5, 2, 2)", (4, 5, 2, 2), {}, np.float32, False),
    ]
    if hidden:
        settings += [
            ("(N, D) = (7, 10), eps=0.1", (7, 10), {"eps": 0.1}, np.float64, False),
            ("(N, D) = (6, 1): one value per example (variance 0)", (6, 1), {}, np.float64, False),
            ("(N, C, H, W) = (2, 8, 4, 4), float32, eps=1e-4", (2, 8, 4, 4), {"eps": 1e-4}, np.float32, False),
            ("a batch of one image (1, 3, 5, 5)", (1, 3, 5, 5), {}, np.float64, False),
        ]
    cases = []
    for label, shape, kwargs, dtype, constant in settings:
        x = _norm_input(rng, shape, dtype)
        if constant:
            x[1] = 2.5
        gamma, beta = _affine_params(rng, shape[1])
        data = {"x": x, "gamma": gamma.astype(dtype), "beta": beta.astype(dtype), "kwargs": kwargs}
        cases.append(Case(label, {**data, **(_FLOAT32 if dtype == np.float32 else {})}))
    return cases


def _run_layer_norm(fn, case):
    d = case.data
    return _without_builtin_norms("layer_norm", lambda: {
        "output": np.asarray(fn(d["x"], d["gamma"], d["beta"], **d["kwargs"]))})


def check_layer_norm(layer_norm, hidden=False):
    """Check layer_norm(x, gamma, beta, eps=1e-5) for (N, D) and (N, C, H, W) input."""
    __tracebackhide__ = True
    report_pass("layer_norm", run_check("layer_norm", layer_norm, ref.layer_norm, _layer_norm_cases(hidden),
                                        _run_layer_norm, LAYER_NORM_CATALOGUE, hidden=hidden))


def _group_norm_cases(hidden: bool):
    rng = np.random.default_rng(1007 if hidden else 7)
    settings = [  # (label, shape, num_groups, kwargs, dtype, constant group)
        ("(2, 6, 3, 3), 3 groups of 2 channels, random gamma and beta", (2, 6, 3, 3), 3, {}, np.float64, False),
        ("(3, 4, 2, 2), num_groups=1 (layer norm), eps=1e-3", (3, 4, 2, 2), 1, {"eps": 1e-3}, np.float64, False),
        ("(2, 4, 3, 3), num_groups=4 = C (instance norm)", (2, 4, 3, 3), 4, {}, np.float64, False),
        ("a batch of one image (1, 8, 2, 2), 4 groups, group 0 constant (output beta)", (1, 8, 2, 2), 4, {},
         np.float64, True),
        ("float32 input (3, 6, 2, 3), 2 groups", (3, 6, 2, 3), 2, {}, np.float32, False),
        ("C=6 is not divisible by num_groups=4: must raise ValueError", (2, 6, 2, 2), 4, {}, np.float64, False),
    ]
    if hidden:
        settings += [
            ("(4, 12, 2, 2), 3 groups of 4 channels, eps=0.1", (4, 12, 2, 2), 3, {"eps": 0.1}, np.float64, False),
            ("(2, 16, 1, 1): 1x1 maps, 4 groups", (2, 16, 1, 1), 4, {}, np.float64, False),
            ("(3, 8, 2, 2), 2 groups, float32, eps=1e-4", (3, 8, 2, 2), 2, {"eps": 1e-4}, np.float32, False),
            ("C=10 is not divisible by num_groups=4: must raise ValueError", (2, 10, 2, 2), 4, {}, np.float64,
             False),
        ]
    cases = []
    for label, shape, groups, kwargs, dtype, constant in settings:
        x = _norm_input(rng, shape, dtype)
        if constant:
            x[:, : shape[1] // groups] = -1.5
        gamma, beta = _affine_params(rng, shape[1])
        data = {"x": x, "num_groups": groups, "gamma": gamma.astype(dtype), "beta": beta.astype(dtype),
                "kwargs": kwargs, "error": shape[1] % groups != 0}
        cases.append(Case(label, {**data, **(_FLOAT32 if dtype == np.float32 else {})}))
    return cases


def _run_group_norm(fn, case):
    d = case.data

    def body():
        if not d["error"]:
            return {"output": np.asarray(fn(d["x"], d["num_groups"], d["gamma"], d["beta"], **d["kwargs"]))}
        try:
            fn(d["x"], d["num_groups"], d["gamma"], d["beta"], **d["kwargs"])
        except ValueError:
            return {"outcome": "raises ValueError"}
        return {"outcome": "returns an output"}

    return _without_builtin_norms("group_norm", body)


def check_group_norm(group_norm, hidden=False):
    """Check group_norm(x, num_groups, gamma, beta, eps=1e-5) for (N, C, H, W) input."""
    __tracebackhide__ = True
    report_pass("group_norm", run_check("group_norm", group_norm, ref.group_norm, _group_norm_cases(hidden),
                                        _run_group_norm, GROUP_NORM_CATALOGUE, hidden=hidden))


# --------------------------------------------------------------------------
# GhostBatchNorm and BatchRenorm1d (PyTorch modules)

def _names(named) -> str:
    """Sorted names (num_batches_tracked, which the notebook neither asks for nor forbids, left out)."""
    return ", ".join(sorted(name for name, _ in named if name.rpartition(".")[2] != "num_batches_tracked"))


def _value(t):
    """A detached copy of a tensor, or a word for None / a missing attribute."""
    if t is None:
        return "None"
    return t if isinstance(t, str) else t.detach().clone()


def _set_affine(module, gamma, beta):
    """Copy gamma and beta into the module's weight and bias, where it has them."""
    params = dict(module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, value in (("weight", gamma), ("bias", beta)):
            if isinstance(params.get(name), torch.Tensor):
                params[name].copy_(torch.from_numpy(value))


def _backward(task, y, dout, label):
    """(y * dout).sum().backward(), the check's own call; a failure is reported as such."""
    try:
        (y * dout).sum().backward()
    except RuntimeError as exc:
        if task == "BatchRenorm1d" and "inplace operation" in str(exc):
            # In training mode running_std reaches the graph only through r or d.
            raise CheckFailed(
                f"BatchRenorm1d's backward pass at {label} failed: running_std (or running_mean), which the "
                f"output's graph uses, was changed in place after the output was computed "
                f"({str(exc).split(':')[0]}).\n"
                f"  Your code matches a known mistake: {RENORM_NO_DETACH}.\n"
                f"  How to fix it: {RENORM_NO_DETACH_FIX}",
                misconception=RENORM_NO_DETACH) from None
        raise CheckFailed(
            f"{task}'s output at {label} is not connected to its input by autograd, so the check's backward "
            f"pass failed ({exc}). Compute the output with differentiable tensor operations: not under "
            f"torch.no_grad(), not through NumPy, not from detached batch statistics.") from None


def _run_module(cls, case, task, make, buffers, before_step=None):
    """Run a module through the case's train/eval steps, PyTorch's normalization kernels
    refused; record outputs, gradients (random upstream gradient) and buffers after each step."""
    return _without_builtin_norms(task, lambda: _module_steps(cls, case, task, make, buffers, before_step))


def _module_steps(cls, case, task, make, buffers, before_step):
    d = case.data
    dtype = getattr(torch, d["dtype"])
    module, out = make(cls, d), {}
    if not isinstance(module, nn.Module):
        raise CheckFailed(f"{task} must be a subclass of nn.Module (class {task}(nn.Module)), got an instance "
                          f"of {type(module).__name__}.")
    module.to(dtype)
    if d["record"] == "structure":
        out["parameters"] = _names(module.named_parameters())
        out["buffers"] = _names(module.named_buffers())
    _set_affine(module, d["gamma"], d["beta"])
    names = ["output", "gradient of the input", "weight.grad", "bias.grad", *buffers]
    for i, step in enumerate(d["steps"], 1):
        mode, x, dout = step[:3]
        if before_step is not None:
            before_step(module, step)
        label = f"step {i} ({mode} mode, input of shape {tuple(x.shape)})"
        module.train(mode == "train")
        xt = torch.from_numpy(x).requires_grad_()  # shares memory with the case: in-place changes show
        try:
            y = module(xt)
        except ValueError:
            out.update({label: "raises ValueError"} if d["record"] == "outcome" else
                       {f"{label}: {name}": "not computed: the step raised ValueError" for name in names})
            continue
        if d["record"] == "outcome":
            out[label] = "returns an output"
            continue
        if not isinstance(y, torch.Tensor):
            raise CheckFailed(f"{task}'s forward must return a tensor, got {type(y).__name__} at {label}.")
        _backward(task, y, torch.from_numpy(dout), label)
        out[f"{label}: output"] = _value(y)
        out[f"{label}: gradient of the input"] = _value(xt.grad)
        params = dict(module.named_parameters(recurse=False))
        for name in ("weight", "bias"):
            p = params.get(name)
            out[f"{label}: {name}.grad"] = "no such parameter" if p is None else _value(p.grad)
        module.zero_grad(set_to_none=True)
        for name in buffers:
            out[f"{label}: {name}"] = _value(getattr(module, name, "missing"))
    return out


def _steps(rng, shape, modes, dtype, loc=None, scale=None, constant_channel=False):
    """Seeded (mode, x, dout) steps, arrays of ``dtype``; channels differ in mean and spread."""
    c, view = shape[1], (1, shape[1]) + (1,) * (len(shape) - 2)
    loc = rng.uniform(-3, 3, c) if loc is None else np.asarray(loc, dtype=np.float64)
    scale = rng.uniform(0.5, 3, c) if scale is None else np.asarray(scale, dtype=np.float64)
    steps = []
    for mode in modes:
        x = rng.normal(size=shape) * scale.reshape(view) + loc.reshape(view)
        if constant_channel:
            x[:, 0] = 0.7
        steps.append((mode, x.astype(dtype), rng.normal(size=shape).astype(dtype)))
    return steps


# --- GhostBatchNorm ---------------------------------------------------------

class _WrongGhostBatchNorm(nn.Module):
    """Ghost BN with one switchable mistake, written without PyTorch's batch norm."""

    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, bug=None):
        super().__init__()
        self.vbs, self.eps, self.momentum, self.bug = virtual_batch_size, eps, momentum, bug
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _stats(self, x):
        """(mean, biased variance, values per channel) of a (virtual) batch."""
        n = x.numel() // x.shape[1]
        if n < 2 and self.bug != "no_size_1_error":
            raise ValueError("Expected more than 1 value per channel when training")
        dims = [0, *range(2, x.dim())]
        return x.mean(dim=dims), x.var(dim=dims, correction=0), n

    def _normalize(self, x, mean, var):
        """One affine map per channel: x * scale + shift (written unlike the notebook's given helper,
        which must not be mistaken for course code)."""
        view = [1, x.shape[1]] + [1] * (x.dim() - 2)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale.view(view) + (self.bias - mean * scale).view(view)

    @torch.no_grad()
    def _update(self, mean, unbiased_var):
        self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
        self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased_var)

    def forward(self, x):
        if not self.training and self.bug != "ghost_at_inference":
            return self._normalize(x, self.running_mean, self.running_var)
        if self.bug == "no_virtual":
            chunks = [x]
        elif self.bug == "chunk":  # equal-sized pieces instead of pieces of virtual_batch_size
            chunks = torch.chunk(x, -(-x.shape[0] // self.vbs))
        else:
            chunks = torch.split(x, self.vbs)
        outs, stats = [], []
        for chunk in chunks:
            mean, var, n = self._stats(chunk)
            unbiased = var * n / (n - 1) if n > 1 else var
            outs.append(self._normalize(chunk, mean, unbiased if self.bug == "unbiased" else var))
            stats.append((mean.detach(), (var if self.bug == "biased_running" else unbiased).detach()))
            if self.training and self.bug not in ("once_full", "once_average"):
                self._update(*stats[-1])
        if self.training and self.bug == "once_full":
            mean, var, n = self._stats(x.detach())
            self._update(mean, var * n / (n - 1))
        if self.training and self.bug == "once_average":  # tf-keras's shortcut
            self._update(*(torch.stack(s).mean(0) for s in zip(*stats)))
        return torch.cat(outs)


# The outcome case (a virtual batch of one) is passed by every entry that returns an output there: the entry
# for that mistake comes first, so that it is the one named.
GHOST_CATALOGUE = [Misconception(name, fix, partial(_WrongGhostBatchNorm, bug=bug)) for name, fix, bug in [
    ("no error for a virtual batch with one value per channel",
     "a virtual batch with one value per channel (the remainder of N / virtual_batch_size is 1, 2-D input) has "
     "variance 0: raise ValueError('Expected more than 1 value per channel when training'), as BN does.",
     "no_size_1_error"),
    ("ghost batches used at inference",
     "virtual batches are a training device: in eval mode normalize the whole input with running_mean and "
     "running_var, so that a prediction does not depend on the other examples (or on N).",
     "ghost_at_inference"),
    ("running statistics updated once per batch instead of once per virtual batch (with the whole batch's "
     "statistics)",
     "update running_mean and running_var after each virtual batch, in order, with that virtual batch's mean "
     "and unbiased variance - as nn.BatchNorm applied to each virtual batch in turn would.",
     "once_full"),
    ("running statistics updated once per batch instead of once per virtual batch (with the virtual "
     "batches' averaged statistics, tf-keras's shortcut)",
     "tf-keras averages the virtual batches' statistics and updates once, and says in its source that this "
     "'isn't strictly correct'. The notebook's convention is one update per virtual batch, in order.",
     "once_average"),
    ("no virtual batches: the whole batch normalized with one mean and variance (plain BN)",
     "split the batch along dim 0 with torch.split(x, virtual_batch_size) and normalize each piece with its "
     "own mean and variance, then torch.cat the pieces.",
     "no_virtual"),
    ("virtual batches of equal size (torch.chunk) instead of pieces of virtual_batch_size (torch.split)",
     "torch.chunk(x, k) makes k pieces of about N / k examples; torch.split(x, virtual_batch_size) makes "
     "pieces of virtual_batch_size examples, the last one holding the remainder, as the notebook specifies.",
     "chunk"),
    ("unbiased (n - 1) variance used to normalize",
     "normalize each virtual batch with its biased variance (divide by n, correction=0); the unbiased one "
     "goes into running_var only.",
     "unbiased"),
    ("biased batch variance stored in running_var",
     "update running_var with the unbiased variance of the virtual batch, var * n / (n - 1), n the number of "
     "values per channel in that virtual batch.",
     "biased_running"),
]]


def _affine_and_steps(rng, c, steps, dtype, kwargs, record, vbs=None):
    """A module case's data: gamma and beta away from 1 and 0, the steps, the settings."""
    gamma, beta = (v.astype(dtype) for v in _affine_params(rng, c))
    data = {"C": c, "kwargs": kwargs, "dtype": dtype, "record": record, "steps": steps,
            "gamma": gamma, "beta": beta}
    if vbs is not None:
        data["vbs"] = vbs
    return {**data, **(_FLOAT32 if dtype == "float32" else {})}


def _ghost_cases(hidden: bool):
    rng = np.random.default_rng(1009 if hidden else 9)
    T, E = "train", "eval"
    settings = [  # (label, C, virtual_batch_size, kwargs, dtype, record, shape, modes, constant channel)
        ("(12, 3) input, virtual batches of 4, default eps=1e-5 and momentum=0.1", 3, 4, {}, "float64",
         "structure", (12, 3), [T, T, E, T, E], False),
        ("N=10 is not a multiple of virtual_batch_size=6: virtual batches of 6 and 4; momentum=0.3, eps=1e-3",
         2, 6, {"momentum": 0.3, "eps": 1e-3}, "float64", "all", (10, 2), [T, T, E], False),
        ("(8, 3, 3, 3) feature maps, virtual batches of 2 images, channel 0 constant, momentum=0.5",
         3, 2, {"momentum": 0.5}, "float64", "all", (8, 3, 3, 3), [T, E, T], True),
        ("virtual_batch_size=16 >= N=6: one virtual batch, the same as BN; float32", 4, 16, {}, "float32",
         "all", (6, 4), [T, E], False),
    ]
    if hidden:
        settings += [
            ("(N, C, L) = (6, 2, 5) input, virtual batches of 4 and 2", 2, 4, {"momentum": 0.2}, "float64",
             "all", (6, 2, 5), [T, T, E], False),
            ("(7, 2, 2, 2) maps, virtual batches of 3, 3 and 1 image (4 values per channel each), momentum=1.0",
             2, 3, {"momentum": 1.0}, "float64", "all", (7, 2, 2, 2), [T, E], False),
            ("virtual_batch_size=1 on (4, 2, 3, 3) maps: every image its own virtual batch, eps=0.1", 2, 1,
             {"eps": 0.1}, "float64", "all", (4, 2, 3, 3), [T, T, E], False),
        ]
    cases = [Case(label, _affine_and_steps(rng, c, _steps(rng, shape, modes, dtype, constant_channel=constant), dtype,
                                           kwargs, record, vbs))
             for label, c, vbs, kwargs, dtype, record, shape, modes, constant in settings]
    n = 5 if hidden else 9
    outcome = [("train", rng.normal(size=(n, 3)), None), ("eval", rng.normal(size=(1, 3)), None)]
    cases.append(Case(f"({n}, 3) with virtual batches of 4 leaves a virtual batch of 1: training must raise "
                      f"ValueError; eval mode with a batch of 1 works",
                      _affine_and_steps(rng, 3, outcome, "float64", {}, "outcome", 4)))
    return cases


def _make_ghost(cls, d):
    return cls(d["C"], d["vbs"], **d["kwargs"])


def _run_ghost(cls, case):
    return _run_module(cls, case, "GhostBatchNorm", _make_ghost, ("running_mean", "running_var"))


def check_ghost_batch_norm(GhostBatchNorm, hidden=False):
    """Check a GhostBatchNorm module over seeded train/eval sequences, written from scratch."""
    __tracebackhide__ = True
    report_pass("GhostBatchNorm", run_check("GhostBatchNorm", GhostBatchNorm, ref.GhostBatchNorm,
                                            _ghost_cases(hidden), _run_ghost, GHOST_CATALOGUE, hidden=hidden))


# --- BatchRenorm1d ----------------------------------------------------------

class _WrongBatchRenorm1d(nn.Module):
    """Batch renormalization with one switchable mistake."""

    def __init__(self, num_features, eps=1e-3, momentum=0.01, r_max=3.0, d_max=5.0, bug=None):
        super().__init__()
        self.eps, self.momentum, self.r_max, self.d_max, self.bug = eps, momentum, r_max, d_max, bug
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var" if bug == "running_var" else "running_std", torch.ones(num_features))

    def _sigma(self):
        return torch.sqrt(self.running_var + self.eps) if self.bug == "running_var" else self.running_std

    @torch.no_grad()
    def _update(self, mean, std, n):
        """Out of place, so that an r or d left attached to the graph keeps its saved tensors."""
        m, mean, std = self.momentum, mean.detach(), std.detach()
        self.running_mean = self.running_mean + m * (mean - self.running_mean)
        if self.bug == "running_var":  # nn.BatchNorm's convention: EMA of the unbiased variance
            self.running_var = self.running_var + m * ((std ** 2 - self.eps) * n / (n - 1) - self.running_var)
        elif self.bug == "var_average":
            self.running_std = torch.sqrt((1 - m) * self.running_std ** 2 + m * std ** 2)
        else:
            self.running_std = self.running_std + m * (std - self.running_std)

    def forward(self, x):
        if not self.training:
            return self.weight * (x - self.running_mean) / self._sigma() + self.bias
        n = x.shape[0]
        if n < 2 and self.bug != "no_size_1_error":
            raise ValueError("Expected more than 1 value per channel when training")
        mean = x.mean(dim=0)
        std = torch.sqrt(x.var(dim=0, correction=1 if self.bug == "unbiased" else 0) + self.eps)
        if self.bug == "updated_first":
            self._update(mean, std, n)
        sigma = self._sigma()
        r = sigma / std if self.bug == "r_inverted" else std / sigma
        d = mean - self.running_mean if self.bug == "d_not_scaled" else (mean - self.running_mean) / sigma
        if self.bug != "not_clipped":
            r, d = r.clamp(1 / self.r_max, self.r_max), d.clamp(-self.d_max, self.d_max)
        if self.bug != "no_detach":
            r, d = r.detach(), d.detach()
        if self.bug != "updated_first":
            self._update(mean, std, n)
        return self.weight * ((x - mean) / std * r + d) + self.bias


RENORM_NO_DETACH = "gradients flowing through r and d"
RENORM_NO_DETACH_FIX = ("r and d are constants for backprop (Ioffe 2017, Algorithm 1: stop_gradient): compute them "
                        "from detached statistics, e.g. r = (sigma_B.detach() / running_std).clamp(...), or "
                        "under torch.no_grad().")

RENORM_CATALOGUE = [Misconception(name, fix, partial(_WrongBatchRenorm1d, bug=bug)) for name, fix, bug in [
    (RENORM_NO_DETACH, RENORM_NO_DETACH_FIX, "no_detach"),
    ("r inverted (sigma / sigma_B instead of sigma_B / sigma)",
     "r = sigma_B / sigma: it rescales the batch-normalized value to the running statistics' scale, "
     "since (x - mu) / sigma = (x - mu_B) / sigma_B * r + d.",
     "r_inverted"),
    ("d not divided by sigma",
     "d = (mu_B - mu) / sigma, in units of the running standard deviation, then clipped to [-d_max, d_max].",
     "d_not_scaled"),
    ("r and d not clipped",
     "clip r to [1 / r_max, r_max] and d to [-d_max, d_max] (torch.clamp); with r_max = 1 and d_max = 0 the "
     "layer must be plain BN.",
     "not_clipped"),
    ("unbiased (n - 1) batch variance in sigma_B",
     "sigma_B = sqrt(biased variance + eps), dividing by the batch size m as in BN (correction=0).",
     "unbiased"),
    ("r and d computed from the already-updated running statistics",
     "compute r and d with the running mean and standard deviation from before this step, then update "
     "them (Algorithm 1 updates mu and sigma last).",
     "updated_first"),
    ("moving average of the variance instead of the standard deviation (sigma = sqrt of an EMA of sigma_B^2)",
     "the paper averages the standard deviation itself: running_std += momentum * (sigma_B - running_std).",
     "var_average"),
    ("running variance kept as in nn.BatchNorm (PyTorch's convention) instead of the paper's running "
     "standard deviation",
     "keep the buffers running_mean and running_std (initialised to 0 and 1) and update "
     "running_std += momentum * (sigma_B - running_std), sigma_B = sqrt(biased var + eps); eval mode divides "
     "by running_std.",
     "running_var"),
    ("no error for a batch of one in training",
     "with one example the batch variance is 0: raise ValueError('Expected more than 1 value per channel when "
     "training'), as BN does; eval mode works with any batch size.",
     "no_size_1_error"),
]]


def _renorm_cases(hidden: bool):
    rng = np.random.default_rng(1010 if hidden else 10)
    T, E = "train", "eval"
    far = ([10.0, -6.0, 0.5], [8.0, 0.1, 1.0])  # r and d clipped for features 0 and 1, free for feature 2
    settings = [  # (label, C, kwargs, dtype, record, N, modes, bounds per step, (loc, scale), constant)
        ("defaults (eps=1e-3, momentum=0.01, r_max=3, d_max=5); batches far from the running statistics, "
         "r and d clipped for features 0 and 1", 3, {}, "float64", "structure", 8, [T, T, E, T], None, far, False),
        ("momentum=0.5, eps=1e-5, r_max=2, d_max=1: the running statistics move fast; feature 0 constant",
         2, {"momentum": 0.5, "eps": 1e-5, "r_max": 2.0, "d_max": 1.0}, "float64", "all", 6, [T, T, T, E, T],
         None, (None, None), True),
        ("r_max=1, d_max=0: exactly BN in training", 4, {"r_max": 1.0, "d_max": 0.0, "momentum": 0.1},
         "float64", "all", 5, [T, T, E], None, (None, None), False),
        ("r_max and d_max changed between steps, as a schedule does: (1, 0), then (1.5, 0.5), then (3, 5)", 3,
         {"momentum": 0.2}, "float64", "all", 4, [T, T, T, E], [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0), None],
         far, False),
        ("no clipping active (r_max=d_max=100): r and d must still be constants for backprop", 3,
         {"r_max": 100.0, "d_max": 100.0, "momentum": 0.1}, "float64", "all", 6, [T, T, E], None, far, False),
        ("a batch of 2, float32", 3, {"momentum": 0.1}, "float32", "all", 2, [T, E, T], None, (None, None), False),
    ]
    if hidden:
        settings += [
            ("a batch of 2 far from the running statistics, eps=0.1", 2, {"eps": 0.1, "momentum": 0.3},
             "float64", "all", 2, [T, T, E], None, ([7.0, -2.0], [5.0, 0.2]), False),
            ("r_max=1.2, d_max=0.3, momentum=1.0", 3, {"r_max": 1.2, "d_max": 0.3, "momentum": 1.0}, "float64",
             "all", 7, [T, T, E, T], None, far, False),
        ]
    cases = []
    for label, c, kwargs, dtype, record, n, modes, bounds, (loc, scale), constant in settings:
        steps = _steps(rng, (n, c), modes, dtype, loc, scale, constant)
        steps = [(*step, None if bounds is None else bounds[i]) for i, step in enumerate(steps)]
        cases.append(Case(label, _affine_and_steps(rng, c, steps, dtype, kwargs, record)))
    outcome = [("train", rng.normal(size=(1, 3)), None, None), ("eval", rng.normal(size=(1, 3)), None, None)]
    cases.append(Case("a batch of 1 in training must raise ValueError; eval mode with a batch of 1 works",
                      _affine_and_steps(rng, 3, outcome, "float64", {}, "outcome")))
    return cases


def _make_renorm(cls, d):
    return cls(d["C"], **d["kwargs"])


def _set_bounds(module, step):
    """Apply the step's (r_max, d_max), as a training loop following a schedule would."""
    if step[3] is not None:
        module.r_max, module.d_max = step[3]


def _run_renorm(cls, case):
    return _run_module(cls, case, "BatchRenorm1d", _make_renorm, ("running_mean", "running_std"), _set_bounds)


def check_batch_renorm(BatchRenorm1d, hidden=False):
    """Check a BatchRenorm1d module over seeded train/eval sequences, written from scratch."""
    __tracebackhide__ = True
    report_pass("BatchRenorm1d", run_check("BatchRenorm1d", BatchRenorm1d, ref.BatchRenorm1d,
                                           _renorm_cases(hidden), _run_renorm, RENORM_CATALOGUE, hidden=hidden))


CATALOGUE = {
    "layer_norm": LAYER_NORM_CATALOGUE,
    "group_norm": GROUP_NORM_CATALOGUE,
    "GhostBatchNorm": GHOST_CATALOGUE,
    "BatchRenorm1d": RENORM_CATALOGUE,
}
