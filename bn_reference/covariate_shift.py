"""Chapter 2 - internal covariate shift: the reference implementations.

Ioffe & Szegedy (2015, Sec. 2) define internal covariate shift (ICS) as "the
change in the distribution of network activations due to the change in network
parameters during training" and propose BN to reduce it. Their Fig. 1 shows it
on MNIST: the 15th, 50th and 85th percentiles of the input to one sigmoid of
the last hidden layer drift during training without BN and stay steady with it.
Santurkar et al. (2018) question the explanation with three measurements, all
reproduced here at CPU scale:

* "noisy BN" (Sec. 2.1): BN followed by noise whose mean and variance change at
  every step makes layer inputs *less* stable, yet trains about as well as BN;
* ICS as a change of gradient (Sec. 2.2): for layer i, G_i is the gradient of
  the loss with respect to its weights and G'_i the same gradient after the
  layers before it (1..i-1) took a gradient step on the same batch;
  ||G_i - G'_i|| and cos(G_i, G'_i) measure how much the update of the earlier
  layers changes what layer i should do;
* smoothness (Sec. 3): the loss and its gradient at the points w - eta * grad
  along the gradient direction, for several step sizes eta.

The networks of the chapter page are those of the paper's Fig. 1: 3 fully
connected hidden layers of 100 sigmoid units, mini-batches of 60, here trained
with plain SGD on scikit-learn's digits (8x8 images, standardized).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from bn_exercises.covariate_shift import load_digits_split, make_mlp  # the notebook's helpers: one implementation

__all__ = [
    "ActivationRecorder",
    "parameterized_layers",
    "gradient_shift",
    "NoisyBatchNorm1d",
    "ActivationNoise",
    "landscape_along_gradient",
    "loss_along_gradient",
    "load_digits_split",
    "make_mlp",
    "train",
    "steps_to_accuracy",
    "outputs_across_batches",
    "ics_experiment",
]

DEFAULT_PERCENTILES = (15, 50, 85)  # the paper's Fig. 1 (b, c)


# --------------------------------------------------------------------------
# Recording a unit's input distribution (Fig. 1 b, c)

class ActivationRecorder:
    """Percentiles of the input to one unit of ``module``, recorded at every call.

    A forward hook on ``module`` takes the module's (first) input x, of shape
    (N, C) or (N, C, *S), and the values of unit (channel) ``unit``,
    ``x[:, unit]`` - N values, or N * prod(S) values for a feature map - and
    appends ``numpy.percentile(values, percentiles)`` (linear interpolation,
    NumPy's default) to ``records``: one float64 array of shape (P,) per call.
    ``history`` stacks them into (calls, P).

    The hook is registered on construction and removed by ``remove()``; as a
    context manager (``with ActivationRecorder(m, 3) as rec: ...``) the recorder
    removes it on exit. Other hooks of the module are left alone.
    """

    def __init__(self, module: nn.Module, unit: int, percentiles: Sequence[float] = DEFAULT_PERCENTILES):
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module (e.g. model[4]), got {type(module).__name__}.")
        if isinstance(unit, bool) or int(unit) != unit or unit < 0:
            raise ValueError(f"unit must be a non-negative integer (a feature index on axis 1), got {unit!r}.")
        q = np.asarray(percentiles, dtype=np.float64)
        if q.ndim != 1 or q.size == 0 or not np.all((q >= 0) & (q <= 100)):
            raise ValueError(f"percentiles must be a non-empty sequence of numbers in [0, 100], got {percentiles!r}.")
        self.module, self.unit, self.percentiles = module, int(unit), q
        self.records: list[np.ndarray] = []
        self._handle = module.register_forward_hook(self._record)

    def _record(self, module, inputs, output) -> None:
        x = inputs[0]
        if x.dim() < 2 or self.unit >= x.shape[1]:
            raise ValueError(f"ActivationRecorder: unit {self.unit} does not exist in an input of shape "
                             f"{tuple(x.shape)} (units are on axis 1).")
        values = x.detach()[:, self.unit].reshape(-1).to(torch.float64).cpu().numpy()
        self.records.append(np.percentile(values, self.percentiles))

    @property
    def history(self) -> np.ndarray:
        """The records as one (calls, P) array."""
        return np.array(self.records).reshape(len(self.records), len(self.percentiles))

    def remove(self) -> None:
        """Remove the hook (again: nothing happens)."""
        self._handle.remove()

    def __enter__(self) -> "ActivationRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# --------------------------------------------------------------------------
# Santurkar et al.'s gradient measures, on the model's parameters as a dict

def parameterized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module of ``model`` that owns parameters itself
    (Linear, Conv, affine BN, ...), in ``model.named_modules()`` order - the forward
    order for ``nn.Sequential``. Each must own a parameter named ``weight``."""
    layers = [(name, m) for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    for name, m in layers:
        if not isinstance(getattr(m, "weight", None), nn.Parameter):
            raise ValueError(f"layer {name!r} ({type(m).__name__}) owns parameters but none named 'weight'; "
                             f"gradient_shift measures the gradient of each layer's weight.")
    if not layers:
        raise ValueError("the model has no layer with parameters.")
    return layers


class _Training:
    """Context: every module in training mode (BN with batch statistics), restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.train()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


def _loss_at(model, params, x, y, loss_fn):
    """loss_fn(model(x), y) with ``params`` in place of the model's parameters, and
    copies of its buffers (so BN's running statistics stay as they are)."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return loss_fn(functional_call(model, {**params, **buffers}, (x,)), y)


def _check_loss_fn(loss_fn):
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable as loss_fn(output, y) -> scalar tensor, got {loss_fn!r}.")


def gradient_shift(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, lr: float):
    """ICS as a change of gradient (Santurkar et al. 2018, Sec. 2.2), per layer.

    For each layer i of ``parameterized_layers(model)`` (L layers):
    G_i = dL/dW_i at the current parameters, and G'_i = dL/dW_i after a plain SGD
    step W_j <- W_j - lr * dL/dW_j (every parameter of layers j = 1..i-1, the
    gradients taken at the current parameters) on the same batch (x, y). The
    measurement runs in training mode. Returns ``(distances, cosines)``, two
    float64 arrays of shape (L,): ||G_i - G'_i|| (L2 norm over all entries) and
    <G_i, G'_i> / (||G_i|| ||G'_i||). For layer 1 nothing before it moves, so
    the distance is 0 and the cosine 1. The model is left exactly as it was:
    parameters, buffers, ``.grad`` and every module's train/eval mode.
    """
    _check_loss_fn(loss_fn)
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0 (the SGD step size), got {lr!r}.")
    layers = parameterized_layers(model)
    params = {name: p.detach() for name, p in model.named_parameters()}
    owned = [[f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False)] for name, m in layers]
    weights = [f"{name}.weight" if name else "weight" for name, _ in layers]
    with _Training(model):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = _loss_at(model, leaves, x, y, loss_fn)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
        distances, cosines = [], []
        for i, weight in enumerate(weights):
            moved = {k for names in owned[:i] for k in names}
            shifted = {k: (v - lr * grads[k] if k in moved and grads[k] is not None else v).detach()
                       for k, v in params.items()}
            shifted[weight] = shifted[weight].clone().requires_grad_()
            g_after, = torch.autograd.grad(_loss_at(model, shifted, x, y, loss_fn), shifted[weight])
            g, g2 = grads[weight].double().flatten(), g_after.double().flatten()
            distances.append((g - g2).norm().item())
            cosines.append((g @ g2 / (g.norm() * g2.norm())).item())
    return np.array(distances), np.array(cosines)


def landscape_along_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                             step_sizes: Sequence[float]) -> dict[str, np.ndarray]:
    """The loss landscape along the gradient direction (Santurkar et al. 2018, Sec. 3).

    With g = dL/dw at the current parameters w (every parameter of the model, on
    the batch (x, y), in training mode), for each eta of ``step_sizes`` (K values)
    at w' = w - eta * g: ``loss`` L(w'), ``grad_norm`` ||dL/dw(w')|| (L2 norm of
    the whole gradient) and ``grad_change`` ||dL/dw(w') - g||, Santurkar et al.'s
    "gradient predictiveness". Float64 arrays of shape (K,). Also ``step``,
    the distance moved, eta * ||g||. The model is left exactly as it was.
    """
    _check_loss_fn(loss_fn)
    etas = np.asarray(step_sizes, dtype=np.float64)
    if etas.ndim != 1 or etas.size == 0 or not np.isfinite(etas).all():
        raise ValueError(f"step_sizes must be a non-empty 1-D sequence of finite numbers, got {step_sizes!r}.")
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_and_grad(point):
        leaves = {k: point[k].clone().requires_grad_() for k in names}
        loss = _loss_at(model, {**point, **leaves}, x, y, loss_fn)
        return loss.item(), torch.autograd.grad(loss, list(leaves.values()))

    out = {key: [] for key in ("loss", "grad_norm", "grad_change", "step")}
    with _Training(model):
        _, g = loss_and_grad(params)
        g_flat = torch.cat([t.double().flatten() for t in g])
        for eta in etas:
            point = {**params, **{k: params[k] - float(eta) * gk for k, gk in zip(names, g)}}
            loss, g2 = loss_and_grad(point)
            g2_flat = torch.cat([t.double().flatten() for t in g2])
            out["loss"].append(loss)
            out["grad_norm"].append(g2_flat.norm().item())
            out["grad_change"].append((g2_flat - g_flat).norm().item())
            out["step"].append(abs(eta) * g_flat.norm().item())
    return {key: np.array(v, dtype=np.float64) for key, v in out.items()}


def loss_along_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable,
                        step_sizes: Sequence[float]):
    """``(losses, grad_norms)``: L(w - eta * g) and ||dL/dw(w - eta * g)|| for each eta
    of ``step_sizes``, g the gradient at the current parameters w, in training mode
    (see :func:`landscape_along_gradient`). The model is left exactly as it was."""
    landscape = landscape_along_gradient(model, x, y, loss_fn, step_sizes)
    return landscape["loss"], landscape["grad_norm"]


# --------------------------------------------------------------------------
# Noisy BN (Santurkar et al. 2018, Sec. 2.1)

def _time_varying_noise(y: torch.Tensor, generator: torch.Generator, noise_mean: float,
                        noise_std: float) -> torch.Tensor:
    """``y`` (N, C) or (N, C, L) plus noise whose distribution is drawn anew at this call:
    from ``generator``, in this order and in y's dtype, ``mean = noise_mean * (2 * rand(C) - 1)``,
    ``std = noise_std * rand(C)`` and ``z = randn(y.shape)``; returns ``y + mean + std * z``
    (mean and std broadcast over every axis but 1)."""
    c, view = y.shape[1], (1, -1) + (1,) * (y.dim() - 2)
    options = {"generator": generator, "dtype": y.dtype}
    mean = noise_mean * (2 * torch.rand(c, **options) - 1)
    std = noise_std * torch.rand(c, **options)
    z = torch.randn(y.shape, **options)
    return y + mean.view(view) + std.view(view) * z


def _check_noise(generator, noise_mean, noise_std) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (torch.Generator().manual_seed(0)), "
                         f"got {type(generator).__name__}.")
    if not (noise_mean >= 0 and noise_std >= 0):
        raise ValueError(f"noise_mean and noise_std must be >= 0, got {noise_mean!r} and {noise_std!r}.")


class NoisyBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` followed, in training mode only, by noise whose distribution
    changes at every call (Santurkar et al. 2018, Sec. 2.1).

    In each training-mode forward pass, with y = BN(x) of shape (N, C) or (N, C, L),
    three draws from ``generator``, in this order and in y's dtype:

        mean = noise_mean * (2 * rand(C) - 1)    # the noise's mean per feature,  U(-noise_mean, noise_mean)
        std  = noise_std * rand(C)               # the noise's standard deviation, U(0, noise_std)
        z    = randn(y.shape)                    # one standard normal per activation

    and the output is y + mean + std * z (mean and std broadcast over every axis
    but 1): each activation of each example gets i.i.d. noise N(mean_c, std_c^2),
    and the distribution is new at every step. The paper fixes only that the noise
    has non-zero mean and non-unit variance and changes at every step; the uniform
    ranges and the Gaussian shape are this course's choice. Eval mode is plain BN
    and draws nothing.
    """

    def __init__(self, num_features: int, generator: torch.Generator, noise_mean: float = 1.0,
                 noise_std: float = 1.0, **kwargs):
        super().__init__(num_features, **kwargs)
        _check_noise(generator, noise_mean, noise_std)
        self.generator, self.noise_mean, self.noise_std = generator, noise_mean, noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            return y
        return _time_varying_noise(y, self.generator, self.noise_mean, self.noise_std)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, noise_mean={self.noise_mean}, noise_std={self.noise_std}"


class ActivationNoise(nn.Module):
    """The noise of :class:`NoisyBatchNorm1d` without the normalization - the same draws
    from ``generator`` at every training-mode call, added to the input itself; eval mode
    passes the input through. In place of BN it is Santurkar et al.'s control run
    (Sec. 2.1): the same noise in the network without BN."""

    def __init__(self, num_features: int, generator: torch.Generator, noise_mean: float = 1.0,
                 noise_std: float = 1.0):
        super().__init__()
        _check_noise(generator, noise_mean, noise_std)
        self.num_features, self.generator = num_features, generator
        self.noise_mean, self.noise_std = noise_mean, noise_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"ActivationNoise({self.num_features}) got an input of shape {tuple(x.shape)}.")
        return _time_varying_noise(x, self.generator, self.noise_mean, self.noise_std) if self.training else x

    def extra_repr(self) -> str:
        return f"{self.num_features}, noise_mean={self.noise_mean}, noise_std={self.noise_std}"


# --------------------------------------------------------------------------
# The page's experiments: training (the data and the networks come from
# bn_exercises.covariate_shift: load_digits_split, make_mlp)

@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    acc = (model(x).argmax(1) == y).double().mean().item()
    for m, mode in modes:
        m.training = mode
    return acc


def train(model: nn.Module, data, steps: int, lr: float, *, batch_size: int = 60, seed: int = 0,
          eval_every: int = 50, record: tuple[nn.Module, int] | None = None,
          measure: Callable | None = None, measure_every: int | None = None) -> dict:
    """Train ``model`` with plain SGD (no momentum, no weight decay) on cross-entropy.

    ``data`` is ``(X_train, y_train, X_test, y_test)``. Each step's mini-batch is
    ``batch_size`` different training examples drawn at random, the first ones of
    ``torch.randperm(len(X_train), generator=gen)`` with ``gen`` a generator seeded with
    ``seed`` (one permutation per step): the same seed gives the same batches whatever
    the model.

    Returns a dict: ``eval_steps`` and ``test_accuracy`` (eval mode, every
    ``eval_every`` steps, step 0 included); ``train_loss`` (steps,); with
    ``record=(module, unit)``, ``percentiles`` (steps, 3): the 15th, 50th and 85th
    percentiles of the input to that unit on each training batch (an
    :class:`ActivationRecorder` on the module, which drops the module's calls inside
    ``measure`` and the evaluations); with
    ``measure``, ``measure_steps`` and ``measurements``: ``measure(model, x, y)`` on
    the step's batch, before the update, every ``measure_every`` steps.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"steps must be >= 1 and batch_size >= 2, got {steps!r} and {batch_size!r}.")
    X_train, y_train, X_test, y_test = data
    if len(X_train) < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the training split ({len(X_train)}).")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    log = {"eval_steps": [0], "test_accuracy": [_accuracy(model, X_test, y_test)], "train_loss": [],
           "percentiles": [], "measure_steps": [], "measurements": []}
    recorder = ActivationRecorder(*record) if record is not None else None

    def unrecorded(fn, *args):
        """fn(*args), its forward passes through the recorded module dropped from the records."""
        kept = len(recorder.records) if recorder is not None else 0
        try:
            return fn(*args)
        finally:
            if recorder is not None:
                del recorder.records[kept:]

    try:
        model.train()
        for step in range(1, steps + 1):
            idx = torch.randperm(len(X_train), generator=gen)[:batch_size]
            xb, yb = X_train[idx], y_train[idx]
            if measure is not None and measure_every and (step - 1) % measure_every == 0:
                log["measure_steps"].append(step - 1)
                log["measurements"].append(unrecorded(measure, model, xb, yb))
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log["train_loss"].append(loss.item())
            if step % eval_every == 0:
                log["eval_steps"].append(step)
                log["test_accuracy"].append(unrecorded(_accuracy, model, X_test, y_test))
    finally:
        if recorder is not None:
            recorder.remove()
    log["percentiles"] = recorder.records if recorder is not None else []
    return {key: (value if key == "measurements" else np.array(value)) for key, value in log.items()}


def steps_to_accuracy(log: dict, level: float) -> int | None:
    """The first evaluated step of a :func:`train` log whose test accuracy is at least
    ``level``, or None when no evaluation reached it."""
    reached = np.flatnonzero(np.asarray(log["test_accuracy"]) >= level)
    return int(log["eval_steps"][reached[0]]) if reached.size else None


@torch.no_grad()
def outputs_across_batches(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, batch_size: int,
                           n_batches: int, seed: int = 0) -> torch.Tensor:
    """The training-mode output for the single example ``x`` (shape (F,)) when it shares
    its batch with ``batch_size - 1`` others drawn at random (without replacement)
    from ``pool``, for ``n_batches`` such batches: a tensor (n_batches, outputs).
    With BN the output depends on the batch-mates; the model's running statistics and
    modes are left as they were."""
    if batch_size < 2 or batch_size - 1 > len(pool):
        raise ValueError(f"batch_size must be in [2, len(pool) + 1] = [2, {len(pool) + 1}], got {batch_size!r}.")
    gen = torch.Generator().manual_seed(seed)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rows = []
    with _Training(model):
        for _ in range(n_batches):
            mates = pool[torch.randperm(len(pool), generator=gen)[:batch_size - 1]]
            rows.append(model(torch.cat([x[None], mates]))[0])
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    return torch.stack(rows)


# --------------------------------------------------------------------------
# The exercise's graded experiment: ICS measured both ways, with and without BN

def ics_experiment(seed: int, steps: int = 300, lr: float = 0.5, measure_every: int = 25, unit: int = 0) -> dict:
    """The network of Fig. 1 without and with BN, trained on digits while both measures of
    internal covariate shift watch it.

    For each network - ``"no BN"``: ``make_mlp(None, seed=seed)``, ``"BN"``:
    ``make_mlp(nn.BatchNorm1d, seed=seed)``, so both start from the same weights - ``steps``
    steps of plain SGD at learning rate ``lr`` on cross-entropy, each step's batch the first
    60 indices of ``torch.randperm(len(X_train), generator=gen)`` with ``gen`` seeded with
    ``seed`` anew for each network (both see the same batches) (:func:`train`). On each
    training forward pass an :class:`ActivationRecorder` records the 15th, 50th and 85th
    percentiles of the input to unit ``unit`` of the last Sigmoid; at steps 0,
    ``measure_every``, ... :func:`gradient_shift` runs on the step's batch, before the
    update, with the training ``lr``.

    Returns ``{"no BN": r, "BN": r}`` with ``r["percentiles"]`` (steps, 3),
    ``r["distances"]`` and ``r["cosines"]`` (ceil(steps / measure_every), 4): the values of
    the 4 Linear layers, and ``r["test_accuracy"]`` after training (eval mode).
    """
    data = load_digits_split()
    results = {}
    for name, norm in (("no BN", None), ("BN", nn.BatchNorm1d)):
        model = make_mlp(norm, seed=seed)
        sigmoid = [m for m in model.modules() if isinstance(m, nn.Sigmoid)][-1]
        linear = np.array([isinstance(m, nn.Linear) for _, m in parameterized_layers(model)])
        log = train(model, data, steps, lr, seed=seed, eval_every=steps, record=(sigmoid, unit),
                    measure=lambda m, x, y: gradient_shift(m, x, y, F.cross_entropy, lr),
                    measure_every=measure_every)
        results[name] = {"percentiles": log["percentiles"],
                         "distances": np.array([d[linear] for d, _ in log["measurements"]]),
                         "cosines": np.array([c[linear] for _, c in log["measurements"]]),
                         "test_accuracy": float(log["test_accuracy"][-1])}
    return results
