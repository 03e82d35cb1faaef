"""A second correct Chapter 6 implementation, written differently from the
reference (a loop over examples with explicit sums for layer norm, a loop over
channel blocks for group norm, index ranges and torch.var_mean / lerp_ for ghost
BN, the renormalization written as one affine map per feature for batch renorm),
that every check must accept."""

import numpy as np
import torch
from torch import nn


def layer_norm(x, gamma, beta, eps=1e-5):
    x = np.asarray(x)
    out = np.empty_like(x)
    extra = (1,) * (x.ndim - 2)
    g, b = np.reshape(gamma, (-1, *extra)), np.reshape(beta, (-1, *extra))
    for i in range(x.shape[0]):  # one example at a time
        values = x[i]
        mu = values.sum() / values.size
        var = ((values - mu) ** 2).sum() / values.size
        out[i] = g * (values - mu) / np.sqrt(var + eps) + b
    return out


def group_norm(x, num_groups, gamma, beta, eps=1e-5):
    x = np.asarray(x)
    c = x.shape[1]
    if c % num_groups != 0:
        raise ValueError(f"{c} channels cannot be split into {num_groups} equal groups")
    size = c // num_groups
    out = np.empty_like(x)
    for start in range(0, c, size):  # one block of consecutive channels at a time
        block = x[:, start:start + size]
        mu = block.mean(axis=(1, 2, 3), keepdims=True)
        sd = np.sqrt(((block - mu) ** 2).mean(axis=(1, 2, 3), keepdims=True) + eps)
        g = np.asarray(gamma)[start:start + size].reshape(1, size, 1, 1)
        b = np.asarray(beta)[start:start + size].reshape(1, size, 1, 1)
        out[:, start:start + size] = (block - mu) / sd * g + b
    return out


class GhostBatchNorm(nn.Module):
    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1):
        super().__init__()
        self.size, self.eps, self.momentum = virtual_batch_size, eps, momentum
        self.weight = nn.Parameter(torch.full((num_features,), 1.0))
        self.bias = nn.Parameter(torch.full((num_features,), 0.0))
        self.register_buffer("running_mean", torch.full((num_features,), 0.0))
        self.register_buffer("running_var", torch.full((num_features,), 1.0))

    def _norm(self, x, mean, var):
        view = [1, -1] + [1] * (x.dim() - 2)
        scale = self.weight.view(view) / torch.sqrt(var.view(view) + self.eps)
        return (x - mean.view(view)) * scale + self.bias.view(view)

    def forward(self, x):
        if not self.training:
            return self._norm(x, self.running_mean, self.running_var)
        dims = tuple(d for d in range(x.dim()) if d != 1)
        pieces = []
        for start in range(0, x.shape[0], self.size):
            part = x[start:start + self.size]
            n = part.numel() // part.shape[1]
            if n == 1:
                raise ValueError("Expected more than 1 value per channel when training")
            var, mean = torch.var_mean(part, dim=dims, unbiased=False)
            pieces.append(self._norm(part, mean, var))
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * (n / (n - 1)), self.momentum)
        return torch.cat(pieces, dim=0)


class BatchRenorm1d(nn.Module):
    def __init__(self, num_features, eps=1e-3, momentum=0.01, r_max=3.0, d_max=5.0):
        super().__init__()
        self.eps, self.momentum, self.r_max, self.d_max = eps, momentum, r_max, d_max
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))

    def forward(self, x):
        if not self.training:
            return (x - self.running_mean) * (self.weight / self.running_std) + self.bias
        if len(x) < 2:
            raise ValueError("Expected more than 1 value per channel when training")
        mu_b = x.sum(0) / len(x)
        sigma_b = ((x - mu_b).pow(2).mean(0) + self.eps).sqrt()
        mu_b0, sigma_b0 = mu_b.detach(), sigma_b.detach()
        r = torch.clip(sigma_b0 / self.running_std, min=1 / self.r_max, max=self.r_max)
        d = torch.clip((mu_b0 - self.running_mean) / self.running_std, min=-self.d_max, max=self.d_max)
        y = (x - mu_b) / sigma_b * (r * self.weight) + (d * self.weight + self.bias)  # one affine map per feature
        with torch.no_grad():
            self.running_mean.lerp_(mu_b0, self.momentum)
            self.running_std.lerp_(sigma_b0, self.momentum)
        return y


def batch_statistics_variance(m, sigma):
    # m * sigma_B^2 / sigma^2 ~ chi2(m - 1), whose variance is 2 (m - 1)
    scale = sigma * sigma / m
    return scale, scale * scale * 2.0 * (m - 1)


class GroupNorm(nn.Module):
    def __init__(self, num_groups, num_channels, eps=1e-5):
        super().__init__()
        self.g, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.full((num_channels,), 1.0))
        self.bias = nn.Parameter(torch.full((num_channels,), 0.0))

    def forward(self, x):
        size = x.shape[1] // self.g
        view = [1, -1] + [1] * (x.dim() - 2)
        pieces = []
        for block in torch.split(x, size, dim=1):  # one group of consecutive channels at a time
            dims = tuple(range(1, x.dim()))
            var, mean = torch.var_mean(block, dim=dims, keepdim=True, unbiased=False)
            pieces.append((block - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(pieces, dim=1) * self.weight.view(view) + self.bias.view(view)


def small_batch_experiment(seed):
    import copy

    from bn_exercises.small_batches import load_digits_data, make_mlp, train_mlp

    X_train, X_test, y_train, y_test = load_digits_data()
    setups = [("BN 32", lambda c: GhostBatchNorm(c, 32), 32), ("BN 2", lambda c: GhostBatchNorm(c, 2), 2),
              ("GN 2", lambda c: GroupNorm(8, c), 2), ("renorm 2", lambda c: BatchRenorm1d(c), 2),
              ("ghost 32/2", lambda c: GhostBatchNorm(c, 2), 32)]
    out = {}
    for name, norm, batch in setups:
        net = train_mlp(make_mlp(norm, seed=seed), X_train, y_train, batch, seed=seed)
        with torch.no_grad():
            twin = copy.deepcopy(net)  # training mode: batches of the training size, running statistics untouched
            full = len(X_test) - len(X_test) % batch
            wrong_train = sum(int((twin(xb).argmax(dim=1) != yb).sum())
                              for xb, yb in zip(X_test[:full].split(batch), y_test[:full].split(batch)))
            net.eval()
            wrong_eval = int((net(X_test).argmax(dim=1) != y_test).sum())
        out[name] = (wrong_train / full, wrong_eval / len(X_test))
    return out
