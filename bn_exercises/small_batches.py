"""Chapter 6 - small batches: the exercise's visible checks and the notebook's helpers.

Each ``check_*`` runs the learner's function, class or experiment on the visible
cases recorded from the grader's check of the same name
(``answers/small_batches.npz``) and says what is wrong, naming the misconception
when a known wrong implementation gave the same outputs. The ``_run_*`` functions
are the only code that touches the learner's object; they return plain data. While
they run, PyTorch's own normalization kernels (behind nn.BatchNorm*, nn.GroupNorm,
nn.LayerNorm, F.batch_norm, F.group_norm, F.layer_norm, F.instance_norm) refuse to
work: the exercise is to write the statistics out.

The module checks run seeded sequences of ``train()`` / ``eval()`` steps and record,
after every step, the output, the gradients of the input and of gamma and beta (for
a random upstream gradient) and the running statistics. The experiment's check
runs the learner's experiment with a seed and returns the chapter's phenomenon as
yes/no answers with margins.

The notebook's helpers for the experiment - :func:`load_digits_data`,
:func:`make_mlp`, :func:`train_mlp` - load the data, build the small network around
a normalization layer and train it; the measuring is the learner's.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_layer_norm",
    "check_group_norm",
    "check_ghost_batch_norm",
    "check_batch_renorm",
    "check_batch_statistics_variance",
    "check_group_norm_module",
    "check_small_batch_experiment",
    "load_digits_data",
    "make_mlp",
    "train_mlp",
    "EXPERIMENT_RUNS",
]

#: The misconceptions a ``run`` raises itself (the grader's catalogue names the others).
BUILTIN_NORM = "PyTorch's own normalization used instead of your code"
RENORM_NO_DETACH = "gradients flowing through r and d"
RENORM_NO_DETACH_FIX = ("r and d are constants for backprop (Ioffe 2017, Algorithm 1: stop_gradient): compute them "
                        "from detached statistics, e.g. r = (sigma_B.detach() / running_std).clamp(...), or "
                        "under torch.no_grad().")
EVAL_UPDATE = "running statistics updated in eval mode"
EVAL_UPDATE_FIX = ("eval mode only reads running_mean and the running variance (or standard deviation): update "
                   "them in training mode only (if self.training: ...), so that inference changes nothing.")
GRAPH_CARRIED = "running statistics updated with autograd on (a graph carried over from an earlier step)"
GRAPH_CARRIED_FIX = ("update the running statistics under torch.no_grad() (or from detached statistics, "
                     "mean.detach()): a buffer updated with autograd on keeps the graph of the step that "
                     "updated it, and a later step that uses it backpropagates into that old, freed graph.")

#: Case data that are functions (none in this chapter): see bn_exercises.codec.resolver.
CASE_HELPERS: dict = {}

_KERNELS = ("batch_norm", "group_norm", "layer_norm", "instance_norm")


# --------------------------------------------------------------------------
# PyTorch's own normalization is refused while the learner's code runs

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


#: The Python names behind PyTorch's normalizations: (owner, attribute).
_NORM_NAMES = [(F, name) for name in ("batch_norm", "group_norm", "layer_norm", "instance_norm")] + [
    (torch, name) for name in ("batch_norm", "group_norm", "layer_norm", "instance_norm", "native_batch_norm",
                               "native_group_norm", "native_layer_norm")] + [
    (nn.modules.batchnorm._BatchNorm, "forward"), (nn.GroupNorm, "forward"), (nn.LayerNorm, "forward"),
    (nn.modules.instancenorm._InstanceNorm, "forward")]


def _without_builtin_norm_names(task: str, body):
    """``body()`` with PyTorch's normalization modules and functions refused by name: much
    cheaper than :func:`_without_builtin_norms` (which sees every tensor operation) for a
    whole training run, the experiment's, whose layers the module checks have already
    held to their own code. A reference to a kernel saved earlier is not refused here."""
    used = []

    def refusing(name):
        def refused(*args, **kwargs):
            used.append(name)
            raise _builtin_failure(task, name)
        return refused

    saved = [(owner, name, vars(owner).get(name, getattr(owner, name))) for owner, name in _NORM_NAMES]
    for owner, name, _ in saved:
        setattr(owner, name, refusing(f"{getattr(owner, '__name__', owner)}.{name}"))
    try:
        out = body()
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    if used:  # the learner's code caught the refusal and went on
        raise _builtin_failure(task, used[0])
    return out


# --------------------------------------------------------------------------
# layer_norm and group_norm (NumPy)

def _run_layer_norm(fn, case):
    d = case.data
    return _without_builtin_norms("layer_norm", lambda: {
        "output": np.asarray(fn(d["x"], d["gamma"], d["beta"], **d["kwargs"]))})


#: Words of a ValueError message that say why num_groups is refused ("must divide",
#: "not divisible", "a multiple of", "split evenly", "equal groups"); NumPy's own reshape
#: error, "cannot reshape array of size 48 into shape ...", has none of them.
DIVISIBILITY_WORDS = ("divis", "divid", "multiple", "evenly", "equal")


def _refusal(exc: Exception) -> str:
    """What a learner's group_norm did with a num_groups that does not divide C."""
    if not isinstance(exc, ValueError):
        return f"raises {type(exc).__name__} instead of ValueError"
    if any(word in str(exc).lower() for word in DIVISIBILITY_WORDS):
        return "raises ValueError saying that num_groups must divide C"
    return "raises a ValueError whose message does not say that num_groups must divide C"


def _run_group_norm(fn, case):
    d = case.data

    def body():
        if not d["error"]:
            return {"output": np.asarray(fn(d["x"], d["num_groups"], d["gamma"], d["beta"], **d["kwargs"]))}
        try:
            fn(d["x"], d["num_groups"], d["gamma"], d["beta"], **d["kwargs"])
        except Exception as exc:  # what it raises, and what its message says, is the output
            return {"outcome": _refusal(exc)}
        return {"outcome": "returns an output"}

    return _without_builtin_norms("group_norm", body)


# --------------------------------------------------------------------------
# Modules: GhostBatchNorm, BatchRenorm1d, GroupNorm (PyTorch)

def _names(named) -> str:
    """Sorted names (num_batches_tracked, which the notebook neither asks for nor forbids, left out)."""
    return ", ".join(sorted(name for name, _ in named if name.rpartition(".")[2] != "num_batches_tracked"))


def _shapes(module) -> dict:
    """The shape of the module's own weight and bias (or that it has none)."""
    params = dict(module.named_parameters(recurse=False))
    return {name: str(tuple(params[name].shape)) if name in params else "missing" for name in ("weight", "bias")}


def _value(t):
    """A detached copy of a tensor, or a word for None / a missing attribute."""
    if t is None:
        return "None"
    return t if isinstance(t, str) else t.detach().clone()


def _set_affine(module, gamma, beta):
    """Copy gamma and beta into the module's weight and bias, where it has them with their shape."""
    params = dict(module.named_parameters(recurse=False))
    with torch.no_grad():
        for name, value in (("weight", gamma), ("bias", beta)):
            p = params.get(name)
            if isinstance(p, torch.Tensor) and tuple(p.shape) == value.shape:
                p.copy_(torch.from_numpy(value))


def _versions(module, buffers) -> dict:
    """(identity, version counter) of each buffer: an in-place change bumps the version."""
    return {name: (id(t), t._version) for name in buffers
            if isinstance(t := getattr(module, name, None), torch.Tensor)}


def _backward(task, y, dout, label, mode, bumped):
    """(y * dout).sum().backward(), the check's own call. When it fails, say why: the
    causes are told apart by the error and by which buffers the forward pass changed in
    place (``bumped``)."""
    try:
        (y * dout).sum().backward()
    except RuntimeError as exc:
        text, first = str(exc), str(exc).split(":")[0].split(". ")[0]
        if "second time" in text:
            raise CheckFailed(
                f"{task}'s backward pass at {label} failed: the output's graph reaches back into the graph of an "
                f"earlier step, which PyTorch freed after that step's backward pass ({first}).\n"
                f"  Your output matches a known mistake: {GRAPH_CARRIED}.\n  How to fix it: {GRAPH_CARRIED_FIX}",
                GRAPH_CARRIED) from None
        if "inplace operation" in text and bumped and mode == "eval":
            raise CheckFailed(
                f"{task}'s backward pass at {label} failed: the eval-mode forward pass changed "
                f"{' and '.join(bumped)} in place after the output had used {'them' if len(bumped) > 1 else 'it'} "
                f"({first}).\n  Your output matches a known mistake: {EVAL_UPDATE}.\n"
                f"  How to fix it: {EVAL_UPDATE_FIX}", EVAL_UPDATE) from None
        if "inplace operation" in text and bumped and task == "BatchRenorm1d":
            # In training mode the running statistics reach the output's graph only through r or d.
            raise CheckFailed(
                f"{task}'s backward pass at {label} failed: {' and '.join(bumped)}, which the output's graph uses, "
                f"changed in place after the output was computed ({first}): in training mode they reach the "
                f"graph only through r or d.\n"
                f"  Your output matches a known mistake: {RENORM_NO_DETACH}.\n"
                f"  How to fix it: {RENORM_NO_DETACH_FIX}", RENORM_NO_DETACH) from None
        if "does not require grad" in text:
            raise CheckFailed(
                f"{task}'s output at {label} is not connected to its input by autograd, so the check's backward "
                f"pass failed ({first}). Compute the output with differentiable tensor operations: not under "
                f"torch.no_grad(), not through NumPy, not from detached batch statistics.") from None
        raise CheckFailed(f"{task}'s backward pass at {label} failed: {text}") from None


def _run_module(cls, case, task, make, buffers, before_step=None):
    """Run a module through the case's train/eval steps, PyTorch's normalization kernels
    refused; record outputs, gradients (random upstream gradient) and buffers after each step."""
    return _without_builtin_norms(task, lambda: _module_steps(cls, case, task, make, buffers, before_step))


def _module_steps(cls, case, task, make, buffers, before_step):
    """Each step is a dict: ``mode``, input ``x``, upstream gradient ``dout`` (None for an
    *outcome* step, which records only whether the step raises ValueError). The outcome
    steps' results come first in the returned dict, so that a message lists them before
    the (many) recorded values of the other steps."""
    d = case.data
    module, outcomes, out = make(cls, d), {}, {}
    if not isinstance(module, nn.Module):
        raise CheckFailed(f"{task} must be a subclass of nn.Module (class {task}(nn.Module)), got an instance "
                          f"of {type(module).__name__}.")
    module.to(getattr(torch, d["dtype"]))
    if d["structure"]:
        out["parameters"] = _names(module.named_parameters())
        out["buffers"] = _names(module.named_buffers())
        out["shapes of weight and bias"] = _shapes(module)
    _set_affine(module, d["gamma"], d["beta"])
    names = ["output", "gradient of the input", "weight.grad", "bias.grad", *buffers]
    for i, step in enumerate(d["steps"], 1):
        mode, x = step["mode"], step["x"]
        if before_step is not None:
            before_step(module, step)
        label = f"step {i} ({mode} mode, input of shape {tuple(x.shape)})"
        module.train(mode == "train")
        xt = torch.from_numpy(x).requires_grad_()  # shares memory with the case: in-place changes show
        versions = _versions(module, buffers)
        try:
            y = module(xt)
        except ValueError:
            if step["dout"] is None:
                outcomes[label] = "raises ValueError"
            else:
                out.update({f"{label}: {name}": "not computed: the step raised ValueError" for name in names})
            continue
        if step["dout"] is None:
            outcomes[label] = "returns an output"
            continue
        if not isinstance(y, torch.Tensor):
            raise CheckFailed(f"{task}'s forward must return a tensor, got {type(y).__name__} at {label}.")
        out[f"{label}: output"] = _value(y)
        if y.shape == xt.shape:
            bumped = [name for name, v in _versions(module, buffers).items() if versions.get(name, v) != v]
            _backward(task, y, torch.from_numpy(step["dout"]), label, mode, bumped)
            out[f"{label}: gradient of the input"] = _value(xt.grad)
            params = dict(module.named_parameters(recurse=False))
            for name in ("weight", "bias"):
                p = params.get(name)
                out[f"{label}: {name}.grad"] = "no such parameter" if p is None else _value(p.grad)
        else:  # reported as a shape mismatch, not as a failed backward pass
            for name in ("gradient of the input", "weight.grad", "bias.grad"):
                out[f"{label}: {name}"] = f"not computed: the output's shape {tuple(y.shape)} is not the input's"
        module.zero_grad(set_to_none=True)
        for name in buffers:
            out[f"{label}: {name}"] = _value(getattr(module, name, "missing"))
    return {**outcomes, **out}


def _make_ghost(cls, d):
    return cls(d["C"], d["vbs"], **d["kwargs"])


def _run_ghost(cls, case):
    return _run_module(cls, case, "GhostBatchNorm", _make_ghost, ("running_mean", "running_var"))


def _make_renorm(cls, d):
    return cls(d["C"], **d["kwargs"])


def _set_bounds(module, step):
    """Apply the step's (r_max, d_max), as a training loop following a schedule would."""
    if step.get("bounds") is not None:
        module.r_max, module.d_max = step["bounds"]


def _run_renorm(cls, case):
    return _run_module(cls, case, "BatchRenorm1d", _make_renorm, ("running_mean", "running_std"), _set_bounds)


def _make_group_norm_module(cls, d):
    return cls(d["num_groups"], d["C"], **d["kwargs"])


def _run_group_norm_module(cls, case):
    return _run_module(cls, case, "GroupNorm", _make_group_norm_module, ())


# --------------------------------------------------------------------------
# The derivation's number: the variances of the batch statistics

def _number(value):
    """A learner's scalar output as a float64 array of shape () (also from a 1-element
    array); anything larger keeps its shape, so that the comparison shows it."""
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(()) if value.size == 1 else value


def _run_variances(fn, case):
    var_mean, var_var = fn(case.data["m"], case.data["sigma"])
    return {"Var[mu_B]": _number(var_mean), "Var[sigma_B^2]": _number(var_var)}


# --------------------------------------------------------------------------
# The experiment: helpers the notebook uses, and the check's yes/no questions

@contextlib.contextmanager
def _one_thread():
    """PyTorch on one thread for the block (restored after): for these tiny networks one thread
    is the fastest, and on a busy machine several threads waiting for each other cost many
    times the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_digits_data():
    """scikit-learn's digits as float32 tensors: ``(X_train, X_test, y_train, y_test)``,
    X of shape (N, 64) with values in [0, 1], a stratified split (random_state=0) of
    1257 training and 540 test images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    return (torch.tensor(X_train, dtype=torch.float32), torch.tensor(X_test, dtype=torch.float32),
            torch.tensor(y_train), torch.tensor(y_test))


def make_mlp(norm_layer, hidden: int = 32, seed: int = 0) -> nn.Module:
    """The experiment's network: Linear(64, hidden, bias=False) -> ``norm_layer(hidden)``
    -> ReLU -> Linear(hidden, 10). ``norm_layer`` builds the normalization for
    ``hidden`` features (for example ``lambda c: GhostBatchNorm(c, 2)``). The same
    ``seed`` gives the same linear weights whatever the normalization."""
    torch.manual_seed(seed)
    first, last = nn.Linear(64, hidden, bias=False), nn.Linear(hidden, 10)
    return nn.Sequential(first, norm_layer(hidden), nn.ReLU(), last)


def train_mlp(model: nn.Module, X, y, batch_size: int, steps: int = 300, lr: float = 3e-3,
              seed: int = 0) -> nn.Module:
    """Train ``model`` in place with Adam (``lr``) for ``steps`` steps, each on a batch of
    ``batch_size`` examples drawn at random from (X, y) (a seeded generator), the model
    in training mode throughout, PyTorch on one thread; returns ``model``, still in
    training mode."""
    if batch_size < 1 or steps < 1:
        raise ValueError(f"need batch_size >= 1 and steps >= 1, got {batch_size} and {steps}.")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    with _one_thread():
        for _ in range(steps):
            idx = torch.randint(len(X), (batch_size,), generator=gen)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


#: The experiment's runs: name -> what it trains (the notebook's table says the same).
EXPERIMENT_RUNS = {
    "BN 32": "BN (GhostBatchNorm with virtual batches of 32) trained with batches of 32",
    "BN 2": "BN (GhostBatchNorm with virtual batches of 2) trained with batches of 2",
    "GN 2": "GroupNorm with 8 groups trained with batches of 2",
    "renorm 2": "BatchRenorm1d (default settings) trained with batches of 2",
    "ghost 32/2": "GhostBatchNorm with virtual batches of 2 trained with batches of 32",
}
MARGIN = 0.10     # the differences of gaps the check asks for (10 points of test error)
GN_GAP = 0.01     # GN's gap must be this close to 0 (its output does not depend on the batch)
LEARNED = 0.15    # BN at batch 32 must reach an eval-mode test error below this


def _experiment_errors(result) -> dict[str, tuple[float, float]]:
    """The learner's result as {run: (training-mode error, eval-mode error)}; a wrong
    structure is reported as such."""
    expected = ", ".join(repr(k) for k in EXPERIMENT_RUNS)
    if not isinstance(result, dict) or set(result) != set(EXPERIMENT_RUNS):
        got = sorted(map(repr, result)) if isinstance(result, dict) else type(result).__name__
        raise CheckFailed(f"small_batch_experiment must return a dict with the keys {expected}, got {got}.")
    errors = {}
    for name in EXPERIMENT_RUNS:
        try:
            train_error, eval_error = (float(v) for v in result[name])
        except (TypeError, ValueError):
            raise CheckFailed(f"small_batch_experiment's result[{name!r}] must be a pair of numbers "
                              f"(training-mode error, eval-mode error), got {result[name]!r:.80}.") from None
        errors[name] = (train_error, eval_error)
    return errors


def _run_experiment(fn, case):
    """The phenomenon, as yes/no answers, in the learner's numbers on the case's seed."""
    with _one_thread():
        result = _without_builtin_norm_names("small_batch_experiment", lambda: fn(case.data["seed"]))
    errors = _experiment_errors(result)
    gap = {name: train_error - eval_error for name, (train_error, eval_error) in errors.items()}
    return {
        "every error is a fraction between 0 and 1": all(0.0 <= e <= 1.0 for pair in errors.values() for e in pair),
        f"BN at batch 32 learned the task (eval-mode error below {LEARNED})": errors["BN 32"][1] < LEARNED,
        f"BN at batch 2 has a train/eval gap of at least {MARGIN} in size": abs(gap["BN 2"]) >= MARGIN,
        f"BN's gap at batch 2 exceeds its gap at batch 32 by at least {MARGIN}": gap["BN 2"] - gap["BN 32"] >= MARGIN,
        f"BN's gap at batch 2 exceeds GN's by at least {MARGIN}": gap["BN 2"] - gap["GN 2"] >= MARGIN,
        f"GN's gap is 0 (within {GN_GAP}): its output does not depend on the batch": abs(gap["GN 2"]) <= GN_GAP,
        f"BN's gap at batch 2 exceeds batch renorm's by at least {MARGIN}": gap["BN 2"] - gap["renorm 2"] >= MARGIN,
        f"ghost BN's gap (virtual batches of 2 in batches of 32) exceeds BN's at batch 32 by at least {MARGIN}":
            gap["ghost 32/2"] - gap["BN 32"] >= MARGIN,
    }


# --------------------------------------------------------------------------
# The checks

def check_layer_norm(layer_norm, hidden=False):
    """Check layer_norm(x, gamma, beta, eps=1e-5) for (N, D) and (N, C, H, W) input."""
    __tracebackhide__ = True
    recorded_check(check_layer_norm, "layer_norm", layer_norm, _run_layer_norm, hidden)


def check_group_norm(group_norm, hidden=False):
    """Check group_norm(x, num_groups, gamma, beta, eps=1e-5) for (N, C, H, W) input."""
    __tracebackhide__ = True
    recorded_check(check_group_norm, "group_norm", group_norm, _run_group_norm, hidden)


def check_ghost_batch_norm(GhostBatchNorm, hidden=False):
    """Check a GhostBatchNorm module over seeded train/eval sequences, written from scratch."""
    __tracebackhide__ = True
    recorded_check(check_ghost_batch_norm, "GhostBatchNorm", GhostBatchNorm, _run_ghost, hidden)


def check_batch_renorm(BatchRenorm1d, hidden=False):
    """Check a BatchRenorm1d module over seeded train/eval sequences, written from scratch."""
    __tracebackhide__ = True
    recorded_check(check_batch_renorm, "BatchRenorm1d", BatchRenorm1d, _run_renorm, hidden)


def check_batch_statistics_variance(batch_statistics_variance, hidden=False):
    """Check batch_statistics_variance(m, sigma) -> (Var[mu_B], Var[sigma_B^2])."""
    __tracebackhide__ = True
    recorded_check(check_batch_statistics_variance, "batch_statistics_variance", batch_statistics_variance,
                   _run_variances, hidden)


def check_group_norm_module(GroupNorm, hidden=False):
    """Check a GroupNorm(num_groups, num_channels, eps=1e-5) module, written from scratch."""
    __tracebackhide__ = True
    recorded_check(check_group_norm_module, "GroupNorm", GroupNorm, _run_group_norm_module, hidden)


def check_small_batch_experiment(small_batch_experiment, hidden=False):
    """Run small_batch_experiment(seed) and check that it shows the chapter's phenomenon."""
    __tracebackhide__ = True
    recorded_check(check_small_batch_experiment, "small_batch_experiment", small_batch_experiment,
                   _run_experiment, hidden)
