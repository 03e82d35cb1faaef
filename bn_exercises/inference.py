"""Chapter 5 - inference, running statistics and moving averages: the exercise's visible checks
and the helpers the notebook uses.

Each ``check_*`` runs the learner's class or function on the visible cases recorded
from the grader's check of the same name (``answers/inference.npz``) and says what is
wrong, naming the misconception when a known wrong implementation gave the same
outputs. The ``_run_*`` functions are the only code that touches the learner's object:
they run it on a case and return plain data. The layer runs take seeded sequences of
``train()`` / ``eval()`` steps and record the output, the gradients (PyTorch) and every
running statistic after each step; a failure of the check's own calls on the learner's
result (a backward pass, a call of a folded layer) is reported as such, not as a crash
of the learner's function. The grader runs the same ``_run_*`` functions on its hidden
cases.

The case helpers (:data:`CASE_HELPERS`) build the small models some cases hand to the
learner's function - seeded layers, models with stale statistics, models to count -
and compute nothing the exercise asks for. The digits helpers (:func:`digits_split`,
:func:`digits_net`, :func:`train_digits`) are what the notebook's experiment, the
grader's reference experiment and the book's page train with.
"""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import torch
from sklearn.datasets import load_digits  # imported here, not in the checked call: imports under the
from sklearn.model_selection import train_test_split  # check's watcher cost seconds
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_batchnorm",
    "check_population_statistics",
    "check_torch_batchnorm",
    "check_fold_batchnorm",
    "check_recalibrate_batchnorm",
    "check_bn_parameter_counts",
    "check_inference_experiment",
    "digits_split",
    "digits_net",
    "train_digits",
    "EXPERIMENT_KEYS",
]

#: The misconception of a layer (or an experiment) that runs PyTorch's own batch-norm kernel.
BUILTIN_BATCH_NORM = "PyTorch's own batch norm used instead of your code"


# --------------------------------------------------------------------------
# The digits network of the experiment (the notebook, the grader and the book train it)

def digits_split():
    """scikit-learn's digits (8x8 images, pixel values 0..16, shipped with the library), split
    70/30 with ``random_state=0``: ``(X_train, y_train, X_test, y_test)``, the images as float32
    tensors of shape (1257, 64) and (540, 64), the labels as int64 tensors."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
    as_images = partial(torch.tensor, dtype=torch.float32)
    return as_images(X_train), torch.tensor(y_train), as_images(X_test), torch.tensor(y_test)


def digits_net(batch_norm, seed, hidden=32):
    """``nn.Sequential(nn.Linear(64, hidden), batch_norm(hidden), nn.ReLU(), nn.Linear(hidden, 10))``,
    its weights drawn from PyTorch's default initialization with ``seed`` (the global random
    state is left as it was). ``batch_norm`` is a BN class called with the number of features:
    your ``TorchBatchNorm``, or ``nn.BatchNorm1d``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), batch_norm(hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_digits(net, X, y, seed, steps=300, batch_size=32, lr=0.05, momentum=0.9):
    """Train ``net`` in training mode for ``steps`` steps of SGD with momentum (PyTorch's form:
    v <- momentum * v + grad, p <- p - lr * v) on the cross-entropy of random mini-batches of
    ``(X, y)`` drawn with ``seed``; returns ``net``, still in training mode. The optimizer is
    written out: building a ``torch.optim`` one imports modules that take seconds."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    velocities = [torch.zeros_like(p) for p in params]
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(X), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(net(X[idx]), y[idx])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, v, g in zip(params, velocities, grads):
                v.mul_(momentum).add_(g)
                p.sub_(lr * v)
    return net


# --------------------------------------------------------------------------
# PyTorch's own batch-norm kernels, refused while the learner's code runs

_BUILTIN_MESSAGE = (
    "{who} runs PyTorch's own batch-norm kernel ({kernel}), through nn.BatchNorm1d/2d, F.batch_norm, "
    "torch.batch_norm, F.instance_norm or a reference to one of them saved earlier: {advice}")
_BUILTIN_ADVICE = {
    "TorchBatchNorm": "compute the mean, the variance and the running statistics yourself with tensor operations.",
    "inference_experiment": "build the network with your own TorchBatchNorm (digits_net(TorchBatchNorm, seed)): "
                            "the experiment is about your layer.",
}


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

    def __init__(self, who="TorchBatchNorm"):
        super().__init__()
        self.who, self.used = who, None

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # otherwise the first use imports torch._dynamo: seconds per grading kernel

    def failure(self, kernel):
        return CheckFailed(_BUILTIN_MESSAGE.format(who=self.who, kernel=kernel, advice=_BUILTIN_ADVICE[self.who]),
                           misconception=BUILTIN_BATCH_NORM)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if "batch_norm" in name:
            self.used = self.used or name
            raise self.failure(name)
        return func(*args, **(kwargs or {}))


def _refusing_builtin_batch_norm(who="TorchBatchNorm"):
    return _RefusingBuiltinBatchNorm(who)


def _without_builtin_batch_norm(who, fn, *args):
    """``fn(*args)`` with PyTorch's batch-norm kernels refused (also when the learner's code
    catches the refusal and goes on)."""
    guard = _refusing_builtin_batch_norm(who)
    with guard:
        out = fn(*args)
    if getattr(guard, "used", None):
        raise guard.failure(guard.used)
    return out


# --------------------------------------------------------------------------
# Case helpers: the models some cases hand to the learner's function

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
    """(layer, bn): a Linear or Conv2d (``conv`` holds its settings) and a BN layer after it,
    both with random weights and running statistics drawn with ``seed``."""
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


def _frozen(module, names=("weight", "bias")):
    """``module`` with the parameters ``names`` set to requires_grad=False."""
    for name in names:
        getattr(module, name).requires_grad_(False)
    return module


def _count_model(kind):
    """The models of the visible counting cases."""
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
    raise ValueError(kind)


#: Case data that are functions: see bn_exercises.codec.resolver.
CASE_HELPERS = {"_fold_problem": _fold_problem, "_recalibration_model": _recalibration_model,
                "_count_model": _count_model}


# --------------------------------------------------------------------------
# The layers: NumPy and PyTorch, over train/eval sequences

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
    return _without_builtin_batch_norm("TorchBatchNorm", _torch_steps, cls, case)


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


# --------------------------------------------------------------------------
# Algorithm 2, folding, recalibration, counting

def _run_population(fn, case):
    d = case.data
    mean, var = fn(d["means"], d["vars"], d["m"])
    return {"mean": np.asarray(mean), "var": np.asarray(var)}


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


def _run_counts(fn, case):
    trainable, non_trainable = fn(case.data["make"]())
    return {"trainable": int(trainable), "non-trainable": int(non_trainable)}


# --------------------------------------------------------------------------
# The graded experiment: the learner's layer, trained, in eval and in training mode, then folded

#: What ``inference_experiment(seed)`` returns: {key: what it measures}.
EXPERIMENT_KEYS = {
    "eval_accuracy": "test accuracy in eval mode, each test image predicted alone",
    "eval_batch_difference": "largest |output| difference in eval mode between each image alone and the whole "
                             "test set at once",
    "single_image_error": "whether training mode refused a single image with a ValueError",
    "train_accuracy_pairs": "test accuracy in training mode, the test set predicted in consecutive pairs",
    "train_accuracy_whole": "test accuracy in training mode, the whole test set as one batch",
    "pairing_changes": "fraction of test images whose predicted class differs between consecutive pairs and "
                       "shuffled pairs (training mode)",
    "running_mean_shift": "largest change of running_mean caused by the training-mode passes",
    "restored_difference": "largest |output| difference in eval mode between before the training-mode passes and "
                           "after restoring the saved BN state",
    "fold_difference": "largest |output| difference between the folded network and Linear + BN, in eval mode",
    "fold_agreement": "fraction of test images for which the folded network predicts the same class",
}

#: The phenomenon, as the check states it: the margins hold for every correct implementation
#: (tests/test_ch5_inference.py proves them on seeds of the reference and of a second one).
LEARNED = 0.9            # eval-mode accuracy at least this
PAIRS_GAP = 0.2          # training mode in pairs at least this much less accurate than eval mode
WHOLE_GAP = 0.05         # training mode on the whole test set within this of eval mode
PAIRING_CHANGES = 0.25   # at least this fraction of the images change class with another pairing
SHIFT = 0.1              # the training-mode passes move running_mean by more than this
SAME_OUTPUTS = 1e-4      # float32 outputs that agree up to rounding
AGREEMENT = 0.99         # the folded network's predictions: the same class for at least this fraction


def _number(results, key):
    value = results[key]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise CheckFailed(f"inference_experiment's {key!r} must be a number (a Python float: use .item() on a "
                          f"tensor), got {type(value).__name__} {value!r:.80}.")
    return float(value)


def _one_thread(fn, *args):
    """``fn(*args)`` with one PyTorch intra-op thread: the network is tiny, so threads cost more
    than they save (ten times more on a busy two-core machine), and the run reproduces exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(fn, case):
    """Run the learner's experiment with the case's seed (on one thread, PyTorch's batch-norm
    kernels refused: it must use the learner's TorchBatchNorm) and state the phenomenon as
    claims with margins, each "holds" or "does not hold"."""
    results = _one_thread(_without_builtin_batch_norm, "inference_experiment", fn, case.data["seed"])
    if not isinstance(results, dict):
        raise CheckFailed(f"inference_experiment must return a dict with the keys {', '.join(EXPERIMENT_KEYS)}; "
                          f"got {type(results).__name__}.")
    missing = [key for key in EXPERIMENT_KEYS if key not in results]
    if missing:
        raise CheckFailed(f"inference_experiment's result has no {', '.join(map(repr, missing))}: return a dict "
                          f"with the keys {', '.join(EXPERIMENT_KEYS)}.")
    n = {key: _number(results, key) for key in EXPERIMENT_KEYS if key != "single_image_error"}
    claims = {
        f"the network learned: eval-mode accuracy at least {LEARNED}": n["eval_accuracy"] >= LEARNED,
        f"eval mode: each image alone gives the outputs of the whole test set at once (largest difference below "
        f"{SAME_OUTPUTS:g})": n["eval_batch_difference"] < SAME_OUTPUTS,
        "training mode refuses a single image (ValueError)": bool(results["single_image_error"]),
        f"training mode in pairs: accuracy at least {PAIRS_GAP} below eval mode's":
            n["eval_accuracy"] - n["train_accuracy_pairs"] >= PAIRS_GAP,
        f"training mode on the whole test set at once: accuracy within {WHOLE_GAP} of eval mode's":
            abs(n["eval_accuracy"] - n["train_accuracy_whole"]) <= WHOLE_GAP,
        f"training mode: at least {PAIRING_CHANGES:.0%} of the test images change class when paired differently":
            n["pairing_changes"] >= PAIRING_CHANGES,
        f"the training-mode passes moved running_mean (by more than {SHIFT})": n["running_mean_shift"] > SHIFT,
        f"after restoring the saved BN state, eval mode gives the outputs it gave before (largest difference "
        f"below {SAME_OUTPUTS:g})": n["restored_difference"] < SAME_OUTPUTS,
        f"the folded network gives the outputs of Linear + BN in eval mode (largest difference below "
        f"{SAME_OUTPUTS:g})": n["fold_difference"] < SAME_OUTPUTS,
        f"the folded network predicts the same class for at least {AGREEMENT:.0%} of the test images":
            n["fold_agreement"] >= AGREEMENT,
    }
    return {claim: "holds" if bool(ok) else "does not hold" for claim, ok in claims.items()}


# --------------------------------------------------------------------------
# The checks

def check_batchnorm(BatchNorm, hidden=False):
    """Check the NumPy BatchNorm class over seeded train/eval sequences."""
    __tracebackhide__ = True
    recorded_check(check_batchnorm, "BatchNorm", BatchNorm, _run_batchnorm, hidden)


def check_population_statistics(population_statistics, hidden=False):
    """Check population_statistics(batch_means, batch_vars, batch_size) -> (mean, var)."""
    __tracebackhide__ = True
    recorded_check(check_population_statistics, "population_statistics", population_statistics, _run_population,
                   hidden)


def check_torch_batchnorm(TorchBatchNorm, hidden=False):
    """Check a TorchBatchNorm module: structure, dtypes and devices, outputs, gradients and
    buffers after every step, written without PyTorch's own batch-norm kernels."""
    __tracebackhide__ = True
    recorded_check(check_torch_batchnorm, "TorchBatchNorm", TorchBatchNorm, _run_torch_batchnorm, hidden)


def check_fold_batchnorm(fold_batchnorm, hidden=False):
    """Check fold_batchnorm(layer, bn) -> a new nn.Linear / nn.Conv2d with layer's dtype and device."""
    __tracebackhide__ = True
    recorded_check(check_fold_batchnorm, "fold_batchnorm", fold_batchnorm, _run_fold, hidden)


def check_recalibrate_batchnorm(recalibrate_batchnorm, hidden=False):
    """Check recalibrate_batchnorm(model, batches): statistics, each module's mode, momenta, weights."""
    __tracebackhide__ = True
    recorded_check(check_recalibrate_batchnorm, "recalibrate_batchnorm", recalibrate_batchnorm, _run_recalibrate,
                   hidden)


def check_bn_parameter_counts(bn_parameter_counts, hidden=False):
    """Check bn_parameter_counts(model) -> (trainable, non_trainable)."""
    __tracebackhide__ = True
    recorded_check(check_bn_parameter_counts, "bn_parameter_counts", bn_parameter_counts, _run_counts, hidden)


def check_inference_experiment(inference_experiment, hidden=False):
    """Check inference_experiment(seed) -> dict: the phenomenon it measures, with margins."""
    __tracebackhide__ = True
    recorded_check(check_inference_experiment, "inference_experiment", inference_experiment, _run_experiment,
                   hidden)
