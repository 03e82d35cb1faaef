"""Chapter 6 - the limits of the batch: reference implementations.

Batch normalization (BN) normalizes with statistics *estimated* from the
mini-batch; this module measures how noisy those estimates are, implements the
normalizations that do without the batch and the BN variants built for small or
odd batches, and trains the small networks of the chapter's figures.

* Batch statistics: :func:`batch_statistics`, :func:`batch_statistics_variance`
  and :func:`theoretical_spread` (for Gaussian data m * sigma_B^2 / sigma^2
  follows chi-square with m - 1 degrees of freedom).
* Normalizations without the batch (Wu & He 2018, Sec. 3): :func:`group_norm`
  normalizes each example over groups of C / G contiguous channels and H, W;
  :func:`layer_norm` is its G = 1 extreme and :func:`instance_norm` its G = C
  extreme; :class:`GroupNorm` is group_norm as a PyTorch module;
  :func:`statistic_groups` labels which elements share a mean and a variance
  (the chapter's drawing of Wu & He's Figure 2).
* BN for small or odd batches: :class:`GhostBatchNorm` (Hoffer et al. 2017),
  :class:`BatchRenorm1d` and :func:`renorm_schedule` (Ioffe 2017, Algorithm 1
  and Sec. 4), :func:`combine_batch_statistics` (what synchronized BN computes).
* The chapter's experiments on scikit-learn's digits: :func:`load_digits_images`,
  :func:`make_convnet`, :func:`train_convnet`, :func:`accuracy`,
  :func:`batch_size_sweep`, :func:`fine_tune` (which freezes BN with Chapter 5's
  :func:`~bn_reference.inference.freeze_batchnorm`); the exercise's experiment
  :func:`small_batch_experiment` with :func:`train_eval_errors`, on the learner
  package's helpers (:mod:`bn_exercises.small_batches`).
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bn_exercises.small_batches import load_digits_data, make_mlp, train_mlp

from .inference import TorchBatchNorm, freeze_batchnorm

__all__ = [
    "WU_HE_2018",
    "batch_statistics",
    "batch_statistics_variance",
    "theoretical_spread",
    "group_norm",
    "layer_norm",
    "instance_norm",
    "GroupNorm",
    "statistic_groups",
    "GhostBatchNorm",
    "BatchRenorm1d",
    "renorm_schedule",
    "combine_batch_statistics",
    "load_digits_images",
    "NORMS",
    "make_convnet",
    "train_convnet",
    "accuracy",
    "batch_size_sweep",
    "fine_tune",
    "train_eval_errors",
    "small_batch_experiment",
]

#: ResNet-50 on ImageNet, validation error (%) (Wu & He 2018, Figure 1 and Table 1).
WU_HE_2018 = {
    "images per GPU": (32, 16, 8, 4, 2),
    "BN": (23.6, 23.7, 24.8, 27.3, 34.7),
    "GN": (24.1, 24.2, 24.0, 24.2, 24.1),
    "batch 32 (Table 1)": {"BN": 23.6, "LN": 25.3, "IN": 28.4, "GN": 24.1},
}

_SIZE_1_MESSAGE = ("Expected more than 1 value per channel when training, got input of shape {}: "
                   "one value per channel has variance 0; use batches of 2 or more, or eval().")


# --------------------------------------------------------------------------
# Batch statistics are estimates

def batch_statistics(x, batch_size: int):
    """Means and biased variances of consecutive mini-batches.

    ``x`` (K * m, *F) is cut into K batches of m = ``batch_size`` rows; returns
    ``(means, variances)``, each (K, *F): mu_B and sigma_B^2 (divide by m) of
    Algorithm 1 of Ioffe & Szegedy 2015, per batch and feature.
    """
    x = np.asarray(x, dtype=np.float64)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if x.ndim == 0 or len(x) % batch_size:
        raise ValueError(f"x must have a multiple of batch_size={batch_size} rows, got shape {x.shape}; "
                         f"drop the last {len(x) % batch_size if x.ndim else 0} rows or change batch_size.")
    batches = x.reshape(len(x) // int(batch_size), int(batch_size), *x.shape[1:])
    return batches.mean(axis=1), batches.var(axis=1)


def batch_statistics_variance(m: int, sigma: float = 1.0) -> tuple[float, float]:
    """Var[mu_B] and Var[sigma_B^2] of a batch of m independent draws from N(mu, sigma^2).

    Var[mu_B] = sigma^2 / m (the variance of a mean of m independent values), and,
    since m * sigma_B^2 / sigma^2 follows chi-square with m - 1 degrees of freedom
    (variance 2 (m - 1)), Var[sigma_B^2] = 2 (m - 1) sigma^4 / m^2, with sigma_B^2 the
    biased batch variance of Algorithm 1 (Ioffe & Szegedy 2015). m = 1 gives
    (sigma^2, 0): one value has variance 0, whatever it is.
    """
    if int(m) != m or m < 1:
        raise ValueError(f"m must be a positive integer, got {m!r}.")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}.")
    m = int(m)
    return sigma ** 2 / m, 2 * (m - 1) * sigma ** 4 / m ** 2


def theoretical_spread(batch_size: int, std: float = 1.0) -> tuple[float, float]:
    """Standard deviations of mu_B and of the biased sigma_B^2 for Gaussian data:
    the square roots of :func:`batch_statistics_variance`,
    sd(mu_B) = std / sqrt(m) and sd(sigma_B^2) = std^2 * sqrt(2 (m - 1)) / m.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std!r}.")
    var_mean, var_var = batch_statistics_variance(batch_size, std)
    return math.sqrt(var_mean), math.sqrt(var_var)


# --------------------------------------------------------------------------
# Normalizations that do not use the batch

def _affine_vectors(x, gamma, beta):
    """gamma and beta as (C,) arrays shaped to broadcast over x's channel axis 1."""
    c = x.shape[1]
    gamma, beta = np.asarray(gamma), np.asarray(beta)
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"gamma and beta must have shape ({c},), one value per channel (axis 1 of x), "
                         f"got {gamma.shape} and {beta.shape}.")
    shape = (1, c) + (1,) * (x.ndim - 2)
    return gamma.reshape(shape), beta.reshape(shape)


def group_norm(x, num_groups: int, gamma, beta, eps: float = 1e-5):
    """Group normalization (Wu & He 2018, Sec. 3.1).

    ``x`` (N, C, H, W) (or any (N, C, *S)). The C channels are split into
    ``num_groups`` = G groups of C / G *contiguous* channels (channel c is in group
    c // (C / G), as in torch.nn.functional.group_norm); each example's group is
    normalized with its own mean and biased variance over (C / G, *S), then
    scaled and shifted per channel: y = gamma_c * x_hat + beta_c, gamma and beta
    of shape (C,). Returns an array shaped like x.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got shape {x.shape}.")
    c = x.shape[1]
    if int(num_groups) != num_groups or num_groups < 1 or c % num_groups:
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of the number of channels "
                         f"C={c}, so that every group holds C / G channels; choose one of {divisors}.")
    g_shape, b_shape = _affine_vectors(x, gamma, beta)
    grouped = x.reshape(x.shape[0], int(num_groups), -1)  # (N, G, C/G * prod(S))
    mean = grouped.mean(axis=2, keepdims=True)
    var = grouped.var(axis=2, keepdims=True)
    x_hat = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return x_hat * g_shape + b_shape


def layer_norm(x, gamma, beta, eps: float = 1e-5):
    """Layer normalization (Ba et al. 2016): group_norm with G = 1.

    ``x`` (N, D) or (N, C, H, W): each example is normalized with the mean and
    biased variance of all its values (every axis but N), then scaled and
    shifted per feature (D) or per channel (C), as in Wu & He's comparison
    (Figure 2). (torch.nn.LayerNorm([C, H, W]) instead learns one gamma per
    element, shape (C, H, W).)
    """
    return group_norm(x, 1, gamma, beta, eps)


def instance_norm(x, gamma, beta, eps: float = 1e-5):
    """Instance normalization (Ulyanov et al. 2016): group_norm with G = C.

    ``x`` (N, C, H, W): each channel of each example is normalized over H, W.
    """
    x = np.asarray(x)
    return group_norm(x, x.shape[1] if x.ndim >= 2 else 1, gamma, beta, eps)


class GroupNorm(nn.Module):
    """Group normalization as a PyTorch module (Wu & He 2018, Sec. 3.1), for (N, C, *) input.

    :func:`group_norm` with autograd: each example's group of C / G contiguous channels
    is normalized with its own mean and biased variance, then scaled and shifted per
    channel by ``weight`` (gamma, ones) and ``bias`` (beta, zeros), both (C,). No
    running statistics: training and eval mode compute the same thing. Same
    constructor and outputs as ``nn.GroupNorm(num_groups, num_channels, eps)``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        if int(num_groups) != num_groups or num_groups < 1 or num_channels % num_groups:
            raise ValueError(f"num_groups={num_groups!r} must be a positive divisor of num_channels={num_channels}.")
        self.num_groups, self.num_channels, self.eps = int(num_groups), int(num_channels), eps
        self.weight = nn.Parameter(torch.ones(self.num_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_channels))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected (N, {self.num_channels}, ...) input, got shape {tuple(x.shape)}.")
        groups = x.reshape(x.shape[0], self.num_groups, -1)  # (N, G, C/G * prod(S))
        mean = groups.mean(dim=2, keepdim=True)
        var = groups.var(dim=2, correction=0, keepdim=True)
        x_hat = ((groups - mean) / torch.sqrt(var + self.eps)).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)


def statistic_groups(kind: str, shape, num_groups: int | None = None) -> np.ndarray:
    """Integer labels, shaped like an (N, C, H, W) tensor, of the elements that
    share one mean and one variance under normalization ``kind``:

    ``"batch"``: per channel over (N, H, W); ``"layer"``: per example over
    (C, H, W); ``"instance"``: per example and channel over (H, W);
    ``"group"``: per example and group of C / G contiguous channels over
    (C / G, H, W).
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (N, C, H, W), got {tuple(shape)}.")
    n, c, h, w = shape
    example = np.arange(n).reshape(n, 1, 1, 1)
    channel = np.arange(c).reshape(1, c, 1, 1)
    if kind == "batch":
        labels = channel + 0 * example
    elif kind == "layer":
        labels = example + 0 * channel
    elif kind == "instance":
        labels = example * c + channel
    elif kind == "group":
        if num_groups is None or c % num_groups:
            raise ValueError(f"kind 'group' needs num_groups dividing C={c}, got {num_groups!r}.")
        labels = example * num_groups + channel // (c // num_groups)
    else:
        raise ValueError(f"kind must be 'batch', 'layer', 'instance' or 'group', got {kind!r}.")
    return np.broadcast_to(labels, shape).copy()


# --------------------------------------------------------------------------
# Keeping BN with small or odd batches

class GhostBatchNorm(TorchBatchNorm):
    """Ghost batch normalization (Hoffer et al. 2017, Sec. 4): BN over virtual batches.

    In training mode the input (N, C), (N, C, L) or (N, C, H, W) is cut along N
    into consecutive virtual batches of ``virtual_batch_size`` examples with
    ``torch.split`` (the last one holds the remainder when N is not a multiple);
    each is normalized with its own mean and biased variance, and the running
    statistics are updated once per virtual batch, in order, exactly as
    ``nn.BatchNorm2d`` applied to each virtual batch in turn would update them
    (momentum on the new value, unbiased variance). A virtual batch with one
    value per channel raises ValueError, as BN does. Eval mode normalizes the
    whole input with the running statistics: virtual batches are a training-time
    device only. Other keyword arguments are those of
    :class:`~bn_reference.inference.TorchBatchNorm`.
    """

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float = 0.1,
                 **kwargs):
        if int(virtual_batch_size) != virtual_batch_size or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}.")
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm, self).forward(chunk)
                          for chunk in torch.split(x, self.virtual_batch_size)])


class BatchRenorm1d(nn.Module):
    """Batch renormalization (Ioffe 2017, Algorithm 1) for (N, C) input.

    Training mode, per feature, with the batch's mu_B and
    sigma_B = sqrt(biased variance + eps) and the running mu and sigma::

        r = clip(sigma_B / sigma, 1 / r_max, r_max),   d = clip((mu_B - mu) / sigma, -d_max, d_max),
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta,

    where r and d are constants for backprop (no gradient flows through them);
    then mu += momentum * (mu_B - mu) and sigma += momentum * (sigma_B - sigma)
    (the paper keeps the moving average of the standard deviation, not of the
    variance). Eval mode: y = gamma * (x - mu) / sigma + beta. With r_max = 1
    and d_max = 0 training is exactly BN. ``r_max`` and ``d_max`` are plain
    attributes, so a training loop can follow :func:`renorm_schedule`.
    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros); buffers
    ``running_mean`` (zeros) and ``running_std`` (ones).
    """

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.01, r_max: float = 3.0,
                 d_max: float = 5.0):
        super().__init__()
        if int(num_features) != num_features or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}.")
        if eps < 0 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"need eps >= 0 and 0 <= momentum <= 1, got eps={eps!r}, momentum={momentum!r}.")
        if r_max < 1 or d_max < 0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0 (r_max=1, d_max=0 is plain BN), "
                             f"got r_max={r_max!r}, d_max={d_max!r}.")
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.r_max, self.d_max = r_max, d_max
        self.weight = nn.Parameter(torch.ones(self.num_features))
        self.bias = nn.Parameter(torch.zeros(self.num_features))
        self.register_buffer("running_mean", torch.zeros(self.num_features))
        self.register_buffer("running_std", torch.ones(self.num_features))

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) input, got shape {tuple(x.shape)}.")
        if not self.training:
            return self.weight * (x - self.running_mean) / self.running_std + self.bias
        if x.shape[0] < 2:
            raise ValueError(_SIZE_1_MESSAGE.format(tuple(x.shape)))
        mean = x.mean(dim=0)
        std = torch.sqrt(x.var(dim=0, correction=0) + self.eps)
        with torch.no_grad():  # r and d are constants for backprop; the running statistics have no graph
            r = (std / self.running_std).clamp(1.0 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / self.running_std).clamp(-self.d_max, self.d_max)
            self.running_mean.add_(self.momentum * (mean - self.running_mean))
            self.running_std.add_(self.momentum * (std - self.running_std))
        return self.weight * ((x - mean) / std * r + d) + self.bias


def renorm_schedule(step: int, warmup: int = 5000, r_max_step: int = 40_000, d_max_step: int = 25_000,
                    r_max: float = 3.0, d_max: float = 5.0) -> tuple[float, float]:
    """(r_max, d_max) at training ``step`` (Ioffe 2017, Sec. 4).

    The paper uses r_max = 1, d_max = 0 (plain BN) for the first 5000 steps, then
    relaxes the bounds "gradually" to reach r_max = 3 at 40k steps and d_max = 5
    at 25k steps. The ramp's shape is not given; this one is linear.
    """
    if step < 0 or not warmup < min(r_max_step, d_max_step):
        raise ValueError(f"need step >= 0 and warmup < r_max_step, d_max_step; got step={step}, "
                         f"warmup={warmup}, r_max_step={r_max_step}, d_max_step={d_max_step}.")

    def ramp(end_step):
        return min(1.0, max(0.0, (step - warmup) / (end_step - warmup)))

    return 1.0 + (r_max - 1.0) * ramp(r_max_step), d_max * ramp(d_max_step)


def combine_batch_statistics(counts, means, variances):
    """Mean and biased variance of the union of K batches from each batch's
    (count, mean, biased variance): what synchronized BN computes from the
    devices' statistics (torch.nn.SyncBatchNorm gathers each process's mean,
    inverse std and count; torch/nn/modules/_functions.py).

    ``counts`` (K,), ``means`` and ``variances`` (K, *F)::

        mu = sum_k n_k mu_k / n,     sigma^2 = sum_k n_k (sigma_k^2 + (mu_k - mu)^2) / n.
    """
    counts = np.asarray(counts, dtype=np.float64)
    means, variances = np.asarray(means, dtype=np.float64), np.asarray(variances, dtype=np.float64)
    if counts.ndim != 1 or means.shape != variances.shape or means.shape[:1] != counts.shape:
        raise ValueError(f"counts must be (K,) and means, variances (K, ...) with the same K, got "
                         f"{counts.shape}, {means.shape} and {variances.shape}.")
    if (counts <= 0).any() or (variances < 0).any():
        raise ValueError("counts must be positive and variances non-negative.")
    w = counts.reshape(-1, *[1] * (means.ndim - 1)) / counts.sum()
    mean = (w * means).sum(axis=0)
    return mean, (w * (variances + (means - mean) ** 2)).sum(axis=0)


# --------------------------------------------------------------------------
# The chapter's experiments: a small CNN on scikit-learn's digits

def load_digits_images():
    """scikit-learn's digits as (N, 1, 8, 8) float32 images in [0, 1].

    Returns ``(X_train, X_test, y_train, y_test)`` tensors: the exercise's split
    (:func:`bn_exercises.small_batches.load_digits_data`, stratified, 1257 training
    and 540 test images), reshaped to images.
    """
    X_train, X_test, y_train, y_test = load_digits_data()
    return X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8), y_train, y_test


@contextlib.contextmanager
def _small_convolutions():
    """PyTorch's own convolution kernels instead of oneDNN's: for 8x8 maps and a few
    images, oneDNN's set-up costs about as much as the convolution (measured: a training
    step at batch 2 takes half the time without it). Restored on exit."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


NORMS = ("bn", "gn", "ln", "none", "ghost")


def _norm_layer(norm: str, channels: int, group_size: int, virtual_batch_size: int | None) -> nn.Module:
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(channels // group_size, channels)
    if norm == "ln":  # LN with per-channel gamma and beta, as in Wu & He: GN with one group
        return nn.GroupNorm(1, channels)
    if norm == "ghost":
        return GhostBatchNorm(channels, virtual_batch_size)
    return nn.Identity()


def make_convnet(norm: str = "bn", width: int = 16, group_size: int = 4, virtual_batch_size: int | None = None,
                 seed: int = 0) -> nn.Module:
    """The chapter's small CNN for 8x8 digits, with normalization ``norm``.

    Three 3x3 convolutions (``width``, 2 ``width``, 2 ``width`` channels; the last
    two with stride 2, so the maps are 8x8, 4x4 and 2x2), each followed by the
    normalization and a ReLU, then global average pooling and a linear layer to
    10 classes. ``norm``: ``"bn"`` (nn.BatchNorm2d), ``"gn"`` (nn.GroupNorm with
    ``group_size`` channels per group), ``"ln"`` (nn.GroupNorm with one group),
    ``"ghost"`` (:class:`GhostBatchNorm` with ``virtual_batch_size``) or
    ``"none"`` (convolutions with a bias instead). The same ``seed`` gives the
    same initial convolution and linear weights for every ``norm``.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
    if norm == "ghost" and virtual_batch_size is None:
        raise ValueError("norm='ghost' needs virtual_batch_size.")
    if width % group_size:
        raise ValueError(f"width={width} must be a multiple of group_size={group_size}.")
    layers, channels_in = [], 1
    for i, (channels, stride) in enumerate([(width, 1), (2 * width, 2), (2 * width, 2)]):
        torch.manual_seed(seed * 10 + i)  # each layer's weights do not depend on the others' biases
        layers += [nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1, bias=norm == "none"),
                   _norm_layer(norm, channels, group_size, virtual_batch_size), nn.ReLU()]
        channels_in = channels
    torch.manual_seed(seed * 10 + 3)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels_in, 10))


def train_convnet(model: nn.Module, X, y, batch_size: int, epochs: int, base_lr: float = 0.2,
                  seed: int = 0) -> nn.Module:
    """Train ``model`` in place with SGD (momentum 0.9) and return it.

    The learning rate follows the linear scaling rule as Wu & He use it (Sec. 4.1):
    ``base_lr * batch_size / 32``, with a one-cycle schedule (warm-up over the
    first 15 % of the steps, then cosine decay; torch.optim.lr_scheduler.OneCycleLR).
    Every epoch visits the training set in a new seeded random order, in batches
    of exactly ``batch_size`` (the last, incomplete batch is dropped), so the
    same number of epochs means ``epochs * (len(X) // batch_size)`` steps.
    """
    if batch_size < 1 or batch_size > len(X) or epochs < 1:
        raise ValueError(f"need 1 <= batch_size <= {len(X)} and epochs >= 1, got {batch_size}, {epochs}.")
    steps_per_epoch = len(X) // batch_size
    lr = base_lr * batch_size / 32
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15, cycle_momentum=False)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with _small_convolutions():
        for _ in range(epochs):
            order = torch.randperm(len(X), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss = F.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, X, y, mode: str = "eval", batch_size: int | None = None) -> float:
    """Fraction of correct predictions of ``model`` on (X, y).

    ``mode="eval"``: the model in eval mode (BN uses its running statistics),
    all of X at once. ``mode="train"``: a copy of the model in training mode
    predicts X in consecutive batches of ``batch_size`` (the remainder that does
    not fill a batch is left out), so that BN normalizes each batch with its own
    statistics, as in training; ``model`` itself, and its running statistics,
    do not change. ``model`` is left in eval mode.
    """
    if mode == "eval":
        model.eval()
        with _small_convolutions():
            return (model(X).argmax(1) == y).float().mean().item()
    if mode != "train" or not batch_size or batch_size > len(X):
        raise ValueError(f"mode must be 'eval', or 'train' with 1 <= batch_size <= {len(X)}; "
                         f"got mode={mode!r}, batch_size={batch_size!r}.")
    twin = copy.deepcopy(model).train()
    n = len(X) // batch_size * batch_size
    with _small_convolutions():
        preds = torch.cat([twin(X[i:i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    model.eval()
    return (preds == y[:n]).float().mean().item()


def batch_size_sweep(data, norms=("bn", "gn", "ln", "none"), batch_sizes=(2, 4, 8, 16, 32, 64), epochs: int = 4,
                     base_lr: float = 0.2, seed: int = 0, **model_kwargs):
    """Train :func:`make_convnet` for every (norm, batch size) with the same
    number of ``epochs`` and the same seeds; ``data`` = (X_train, X_test,
    y_train, y_test).

    Returns ``(rows, models)``: one dict per run with ``norm``, ``batch_size``,
    ``steps``, ``lr``, ``eval_acc`` (test accuracy in eval mode) and
    ``train_mode_acc`` (test accuracy in training mode with test batches of the
    training batch size, for the norms whose output depends on the batch: BN
    and ghost BN; None otherwise); ``models`` maps (norm, batch size) to the
    trained network.
    """
    X_train, X_test, y_train, y_test = data
    rows, models = [], {}
    for norm in norms:
        for batch_size in batch_sizes:
            model = train_convnet(make_convnet(norm, seed=seed, **model_kwargs), X_train, y_train, batch_size,
                                  epochs, base_lr, seed)
            batch_dependent = norm in ("bn", "ghost")
            rows.append({"norm": norm, "batch_size": batch_size, "steps": epochs * (len(X_train) // batch_size),
                         "lr": base_lr * batch_size / 32, "eval_acc": accuracy(model, X_test, y_test),
                         "train_mode_acc": accuracy(model, X_test, y_test, "train", batch_size)
                         if batch_dependent else None})
            models[norm, batch_size] = model
    return rows, models


def fine_tune(model: nn.Module, X, y, batch_size: int, steps: int, lr: float, freeze_bn: bool = False,
              seed: int = 0) -> nn.Module:
    """Fine-tune ``model`` in place for ``steps`` SGD steps (momentum 0.9,
    constant ``lr``) on random batches of ``batch_size`` from (X, y), with the
    model in training mode and, if ``freeze_bn``, its BN layers frozen
    (:func:`~bn_reference.inference.freeze_batchnorm`). Returns ``model``.
    """
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    with _small_convolutions():
        for _ in range(steps):
            idx = torch.randint(len(X), (batch_size,), generator=gen)
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


# --------------------------------------------------------------------------
# The exercise's experiment: BN's train/eval gap at small batches, and what each
# alternative does to it (a small MLP on the digits, bn_exercises' helpers)

@torch.no_grad()
def train_eval_errors(model: nn.Module, X, y, batch_size: int) -> tuple[float, float]:
    """(training-mode error, eval-mode error) of ``model`` on (X, y), as fractions.

    Training mode: a copy of the model in training mode predicts X in consecutive
    batches of ``batch_size`` (the remainder that does not fill a batch is left out),
    so that a batch-dependent normalization sees batches like those of training; the
    copy keeps the model's running statistics out of it. Eval mode: the model itself,
    in eval mode, on all of X. The model is left in eval mode.
    """
    return 1.0 - accuracy(model, X, y, "train", batch_size), 1.0 - accuracy(model, X, y)


#: The experiment's runs: name -> (normalization for C features, training batch size).
EXPERIMENT_SETUP = {
    "BN 32": (lambda c: GhostBatchNorm(c, 32), 32),
    "BN 2": (lambda c: GhostBatchNorm(c, 2), 2),
    "GN 2": (lambda c: GroupNorm(8, c), 2),
    "renorm 2": (lambda c: BatchRenorm1d(c), 2),
    "ghost 32/2": (lambda c: GhostBatchNorm(c, 2), 32),
}


def small_batch_experiment(seed: int) -> dict[str, tuple[float, float]]:
    """The exercise's experiment: for each run of :data:`EXPERIMENT_SETUP`, the network
    of :func:`~bn_exercises.small_batches.make_mlp` with that normalization, trained
    with :func:`~bn_exercises.small_batches.train_mlp` (300 Adam steps) at its batch
    size, seeded with ``seed``; returns {run: (training-mode error, eval-mode error)}
    on the test set (:func:`train_eval_errors`, training mode in batches of the
    training batch size). The train/eval gap of a run is the first minus the second.
    """
    X_train, X_test, y_train, y_test = load_digits_data()
    results = {}
    for name, (norm, batch_size) in EXPERIMENT_SETUP.items():
        model = train_mlp(make_mlp(norm, seed=seed), X_train, y_train, batch_size, seed=seed)
        results[name] = train_eval_errors(model, X_test, y_test, batch_size)
    return results
