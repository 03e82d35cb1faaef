"""Chapter 5 - inference, running statistics and moving averages: the reference implementations.

Training normalizes with the mini-batch's statistics (Algorithm 1 of Ioffe &
Szegedy 2015); inference needs estimates of the population's (Algorithm 2).
Frameworks keep them as an exponential moving average (EMA) of the batch
statistics. This module follows PyTorch's conventions
(torch/nn/modules/batchnorm.py, torch/nn/functional.py):

    running = (1 - momentum) * running + momentum * batch_stat,   momentum = 0.1,

where the running variance averages the *unbiased* batch variance (divide by
n - 1) while the forward pass normalizes with the *biased* one (divide by n);
``momentum=None`` gives the cumulative average (factor 1 / num_batches_tracked).
Keras writes the same EMA with the momentum on the old value
(keras/src/layers/normalization/batch_normalization.py):
moving = momentum * moving + (1 - momentum) * batch_stat, momentum = 0.99.

Statistics are per channel: for (N, C), (N, C, L) and (N, C, H, W) input the
channel axis is 1 and the mean and variance run over every other axis, so a
channel of a (N, C, H, W) map has n = N * H * W values (Sec. 3.2 of the paper).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from bn_exercises.inference import digits_net, digits_split, train_digits

from .backprop import batchnorm_forward

__all__ = [
    "BatchNorm",
    "population_statistics",
    "ema_update",
    "convert_momentum",
    "TorchBatchNorm",
    "batchnorm_layers",
    "fold_batchnorm",
    "recalibrate_batchnorm",
    "freeze_batchnorm",
    "bn_parameter_counts",
    "inference_experiment",
]

_SIZE_1_MESSAGE = "Expected more than 1 value per channel when training, got input of shape {}"


def _channels_last(x: np.ndarray) -> np.ndarray:
    """(N, C, *S) -> (N * prod(S), C): one row per value of each channel."""
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _check_input(x, num_features: int) -> int:
    """Validate the (N, C), (N, C, L) or (N, C, H, W) shape; return the number
    of values per channel, n = N, N * L or N * H * W."""
    if not 2 <= x.ndim <= 4:
        raise ValueError(f"expected (N, C), (N, C, L) or (N, C, H, W) input, got shape {tuple(x.shape)}.")
    if x.shape[1] != num_features:
        raise ValueError(f"expected {num_features} channels on axis 1, got shape {tuple(x.shape)}.")
    return int(np.prod(x.shape)) // num_features


def _check_size(x, n: int, training: bool) -> None:
    """Batch statistics need n > 1 values per channel: (1, C) and (1, C, 1, 1) raise,
    (1, C, L) with L > 1 and (1, C, H, W) with H * W > 1 do not (as in PyTorch)."""
    if n <= 1:
        advice = ("use more values per channel (a batch of 2 or more, or a larger spatial size), or eval()"
                  if training else
                  "this layer keeps no running statistics (track_running_stats=False), so eval mode "
                  "normalizes with the batch's statistics too: pass more values per channel")
        raise ValueError(_SIZE_1_MESSAGE.format(tuple(x.shape)) + f": one value per channel has variance 0; {advice}.")


def _check_hyper(num_features, eps, momentum):
    if int(num_features) != num_features or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}.")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}.")


class BatchNorm:
    """Batch normalization in NumPy with PyTorch's conventions.

    ``forward(x)`` takes (N, C), (N, C, L) or (N, C, H, W) and returns an array
    of the same shape. In training mode (the default, ``train()``) it applies
    Algorithm 1 per channel with the batch's mean and biased variance and
    updates ``running_mean`` and ``running_var`` (unbiased variance) by the EMA
    with ``momentum``, or by the cumulative average when ``momentum`` is None.
    In eval mode (``eval()``) it applies the fixed affine map
    gamma * (x - running_mean) / sqrt(running_var + eps) + beta and updates nothing.
    Training needs more than one value per channel (N * L or N * H * W > 1); like
    PyTorch, a training step that fails for that reason has already added 1 to
    ``num_batches_tracked``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1):
        _check_hyper(num_features, eps, momentum)
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.gamma = np.ones(self.num_features)
        self.beta = np.zeros(self.num_features)
        self.running_mean = np.zeros(self.num_features)
        self.running_var = np.ones(self.num_features)
        self.num_batches_tracked = 0
        self.training = True

    def train(self):
        """Training mode: batch statistics, running statistics updated. Returns self."""
        self.training = True
        return self

    def eval(self):
        """Eval mode: running statistics, nothing updated. Returns self."""
        self.training = False
        return self

    def forward(self, x):
        """Normalize x (N, C, *S) per channel; returns an array shaped like x."""
        x = np.asarray(x)
        n = _check_input(x, self.num_features)
        flat = _channels_last(x)
        if self.training:
            self.num_batches_tracked += 1  # before the size check, as PyTorch does
            _check_size(x, n, training=True)
            out, cache = batchnorm_forward(flat, self.gamma, self.beta, self.eps)
            self._update(cache["mu"], cache["var"], n)
        else:
            out = (flat - self.running_mean) / np.sqrt(self.running_var + self.eps) * self.gamma + self.beta
        return np.moveaxis(out.reshape(np.moveaxis(x, 1, -1).shape), -1, 1)

    __call__ = forward

    def _update(self, mean, biased_var, n: int):
        """EMA (or cumulative average) of the batch mean and the unbiased batch variance
        (num_batches_tracked already counts this step)."""
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        self.running_mean = ema_update(self.running_mean, mean, factor)
        self.running_var = ema_update(self.running_var, biased_var * n / (n - 1), factor)


def ema_update(running, batch_stat, momentum: float, convention: str = "pytorch"):
    """One step of an exponential moving average.

    PyTorch: (1 - momentum) * running + momentum * batch_stat (default momentum 0.1);
    Keras:   momentum * running + (1 - momentum) * batch_stat (default momentum 0.99).
    """
    if convention == "pytorch":
        return (1.0 - momentum) * running + momentum * batch_stat
    if convention == "keras":
        return momentum * running + (1.0 - momentum) * batch_stat
    raise ValueError(f"convention must be 'pytorch' or 'keras', got {convention!r}.")


def convert_momentum(momentum: float) -> float:
    """Keras momentum -> PyTorch momentum and back: the weight of the new value
    in one convention is the weight of the old value in the other, so it is
    1 - momentum both ways (Keras 0.99 is PyTorch 0.01)."""
    return 1.0 - momentum


def population_statistics(batch_means, batch_vars, batch_size: int):
    """Algorithm 2 (Ioffe & Szegedy 2015): population statistics for inference.

    ``batch_means`` and ``batch_vars`` (K, *F) hold the means and *biased*
    variances (Algorithm 1) of K training mini-batches of size m = ``batch_size``
    (for a conv layer, m = N * H * W values per channel). Returns ``(mean, var)``,
    each of shape F:

        E[x] = mean_k mu_k,     Var[x] = m / (m - 1) * mean_k sigma2_k   (unbiased).
    """
    means, variances = np.asarray(batch_means, dtype=np.float64), np.asarray(batch_vars, dtype=np.float64)
    if means.shape != variances.shape or means.ndim == 0 or len(means) == 0:
        raise ValueError(f"batch_means and batch_vars must have the same shape (K, ...) with K >= 1, "
                         f"got {means.shape} and {variances.shape}.")
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (m / (m - 1) needs m > 1), got {batch_size!r}.")
    if (variances < 0).any():
        raise ValueError("batch_vars holds negative values; pass the (biased) batch variances.")
    m = int(batch_size)
    return means.mean(axis=0), m / (m - 1) * variances.mean(axis=0)


class TorchBatchNorm(nn.Module):
    """Batch normalization as a PyTorch module, written without nn.BatchNorm* or F.batch_norm.

    Same constructor, ``state_dict`` keys (weight, bias, running_mean,
    running_var, num_batches_tracked), buffers and outputs as
    ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``, for (N, C), (N, C, L) and
    (N, C, H, W) input. Training mode normalizes with the batch's mean and
    biased variance (gradients flow through them) and, with
    ``track_running_stats``, updates the running statistics outside autograd.
    Eval mode uses the running statistics, or the batch's when none are tracked
    (so eval mode then needs more than one value per channel too).

    Conventions, as in PyTorch: weight, bias, running_mean and running_var have
    ``dtype`` and live on ``device``; num_batches_tracked is a ``torch.long``
    scalar on ``device``; a training step that fails for one value per channel
    has already added 1 to num_batches_tracked.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True):
        super().__init__()
        _check_hyper(num_features, eps, momentum)
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.register_parameter("weight", nn.Parameter(torch.ones(num_features, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(num_features, **factory))
                                if affine and bias else None)
        tracked = track_running_stats
        self.register_buffer("running_mean", torch.zeros(num_features, **factory) if tracked else None)
        self.register_buffer("running_var", torch.ones(num_features, **factory) if tracked else None)
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device) if tracked else None)

    def reset_running_stats(self) -> None:
        """running_mean <- 0, running_var <- 1, num_batches_tracked <- 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = weight * (x - mean) / sqrt(var + eps) + bias, per channel (axis 1)."""
        n = _check_input(x, self.num_features)
        update = self.training and self.track_running_stats
        if update:
            with torch.no_grad():
                self.num_batches_tracked += 1  # before the size check, as PyTorch does
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            _check_size(x, n, self.training)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if use_batch_stats:
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, correction=0)
            if update:
                self._update(mean.detach(), var.detach(), n)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update(self, mean, biased_var, n: int) -> None:
        """EMA (or cumulative average) in place; num_batches_tracked already counts this step."""
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(biased_var * (n / (n - 1)), alpha=factor)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch-normalization layers in ``model`` (itself included): PyTorch's
    nn.BatchNorm1d/2d/3d (and SyncBatchNorm) and :class:`TorchBatchNorm`."""
    return [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, TorchBatchNorm))]


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new nn.Linear / nn.Conv2d equal to ``layer`` followed by ``bn`` in eval mode.

    In eval mode BN is the affine map y = s * (z - running_mean) + beta per
    output channel, s = gamma / sqrt(running_var + eps). Folding it into
    z = W x + b gives W' = s * W (row / output channel c scaled by s_c) and
    b' = s * (b - running_mean) + beta. ``layer`` and ``bn`` are not changed.
    The new layer has ``layer.weight``'s dtype and device (a layer built without
    ``dtype=`` would be float32 and reject a float64 input), and always a bias.
    """
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"layer must be nn.Linear or nn.Conv2d, got {type(layer).__name__}.")
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if getattr(bn, "running_mean", None) is None:
        raise ValueError("bn has no running statistics (track_running_stats=False): eval mode "
                         "uses batch statistics, so it is not a fixed affine map and cannot be folded.")
    if bn.num_features != out_features:
        raise ValueError(f"bn normalizes {bn.num_features} features, but layer has {out_features} outputs.")
    w = layer.weight.detach()
    ones, zeros = torch.ones_like(bn.running_mean), torch.zeros_like(bn.running_mean)
    gamma = bn.weight.detach() if bn.weight is not None else ones
    beta = bn.bias.detach() if bn.bias is not None else zeros
    b = layer.bias.detach() if layer.bias is not None else zeros
    s = gamma / torch.sqrt(bn.running_var + bn.eps)
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, nn.Linear):
        folded = nn.Linear(layer.in_features, layer.out_features, **factory)
    else:
        folded = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                           padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                           padding_mode=layer.padding_mode, **factory)
    with torch.no_grad():
        folded.weight.copy_(w * s.view(-1, *[1] * (w.dim() - 1)))
        folded.bias.copy_((b - bn.running_mean) * s + beta)
    return folded


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> nn.Module:
    """Recompute every BN layer's running statistics from ``batches`` ("precise BN").

    Resets the running statistics of each BN layer that tracks them, then runs
    ``model`` on every input tensor in ``batches`` with the BN layers in
    training mode and ``momentum=None``, so the running statistics become the
    cumulative (equal-weight) average over the batches: Algorithm 2 when the
    batches have equal sizes. Every other layer runs in eval mode (Dropout off,
    as at inference). Weights, momenta and every module's train/eval mode are
    left as they were. Returns ``model``.
    """
    modes = {m: m.training for m in model.modules()}
    layers = [bn for bn in batchnorm_layers(model) if bn.track_running_stats]
    momenta = [bn.momentum for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x in batches:
            model(x)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        for m, training in modes.items():
            m.training = training
    return model


def freeze_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Freeze every BN layer of ``model`` for fine-tuning; return the frozen layers.

    A frozen layer is in eval mode - it normalizes with its running statistics and
    updates none of them - and its gamma and beta have ``requires_grad=False``.
    ``requires_grad_(False)`` alone is not enough: in training mode the layer still
    normalizes with batch statistics and still updates its running statistics.
    ``model.train()`` puts the layers back in training mode, so call this again after
    every ``model.train()``. Keras does both in one step: a BatchNormalization layer
    with ``trainable = False`` runs in inference mode (keras/src/layers/normalization/
    batch_normalization.py, ``if training and self.trainable``).
    """
    layers = batchnorm_layers(model)
    for bn in layers:
        bn.eval()
        for p in bn.parameters(recurse=False):
            p.requires_grad_(False)
    return layers


def bn_parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, non_trainable)`` numbers of values held by ``model``'s BN layers.

    Trainable: gamma (weight) and beta (bias) with ``requires_grad``.
    Non-trainable: frozen gamma / beta plus the running_mean and running_var
    buffers, which are estimated, not trained. The integer step counter
    num_batches_tracked is not counted (Keras has no such weight), so a BN
    layer over C features has 2C trainable and 2C non-trainable values, the
    4C weights that Keras's model summary shows for it.
    """
    trainable = non_trainable = 0
    for bn in batchnorm_layers(model):
        for p in bn.parameters(recurse=False):
            if p.requires_grad:
                trainable += p.numel()
            else:
                non_trainable += p.numel()
        for buffer in (bn.running_mean, bn.running_var):
            non_trainable += 0 if buffer is None else buffer.numel()
    return trainable, non_trainable


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``logits`` (n, classes) whose largest entry is at ``y[:n]``."""
    return (logits.argmax(1) == y[:len(logits)]).float().mean().item()


def _in_pairs(net: nn.Module, X: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``net``'s outputs for the images ``X[order]`` predicted two at a time, each put back at its
    image's index."""
    outputs = torch.cat([net(X[order[i:i + 2]]) for i in range(0, len(order), 2)])
    result = torch.empty_like(outputs)
    result[order] = outputs
    return result


def inference_experiment(seed: int) -> dict:
    """Chapter 5's graded experiment: the digits network with :class:`TorchBatchNorm`, trained
    (``train_digits(digits_net(TorchBatchNorm, seed), ..., seed)``), then measured in eval mode,
    in training mode, and folded (:func:`fold_batchnorm`).

    Returns the keys of ``bn_exercises.inference.EXPERIMENT_KEYS``: eval-mode accuracy with each
    test image alone and the largest difference from the whole test set at once; whether
    training mode refuses a single image; training-mode accuracy in consecutive pairs and on the
    whole test set; the fraction of images whose class changes when paired differently; how far
    those passes moved ``running_mean``; the largest eval-mode output difference after the BN
    state is restored; the folded network's largest output difference and its agreement.
    """
    X_train, y_train, X_test, y_test = digits_split()
    net = train_digits(digits_net(TorchBatchNorm, seed), X_train, y_train, seed)
    bn = net[1]
    n = len(X_test) // 2 * 2
    with torch.no_grad():
        net.eval()
        alone = torch.cat([net(x[None]) for x in X_test])
        whole = net(X_test)
        saved = copy.deepcopy(bn.state_dict())  # a copy: the passes below change the buffers in place
        net.train()
        try:
            net(X_test[:1])
            refused = False
        except ValueError:
            refused = True
        consecutive = _in_pairs(net, X_test, torch.arange(n))
        shuffled = _in_pairs(net, X_test, torch.randperm(n, generator=torch.Generator().manual_seed(seed)))
        train_whole = net(X_test)
        shift = (bn.running_mean - saved["running_mean"]).abs().max().item()
        bn.load_state_dict(saved)
        net.eval()
        after = net(X_test)
        folded = nn.Sequential(fold_batchnorm(net[0], bn), net[2], net[3])(X_test)
    return {
        "eval_accuracy": _accuracy(alone, y_test),
        "eval_batch_difference": (alone - whole).abs().max().item(),
        "single_image_error": refused,
        "train_accuracy_pairs": _accuracy(consecutive, y_test),
        "train_accuracy_whole": _accuracy(train_whole, y_test),
        "pairing_changes": (consecutive.argmax(1) != shuffled.argmax(1)).float().mean().item(),
        "running_mean_shift": shift,
        "restored_difference": (after - whole).abs().max().item(),
        "fold_difference": (folded - after).abs().max().item(),
        "fold_agreement": (folded.argmax(1) == after.argmax(1)).float().mean().item(),
    }
