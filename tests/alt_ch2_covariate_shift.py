"""A second correct Chapter 2 implementation, written differently from the
reference (a forward *pre*-hook with torch.quantile, deep copies of the model
stepped by torch.optim.SGD with .backward(), BN computed by hand with noise from
uniform_ / normal_, and flat parameter vectors), that every check must accept."""

import copy

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters


class ActivationRecorder:
    def __init__(self, module, unit, percentiles=(15, 50, 85)):
        self.unit = unit
        self.q = torch.tensor([float(p) / 100 for p in percentiles], dtype=torch.float64)
        self.records = []
        self.handles = [module.register_forward_pre_hook(self._pre)]

    def _pre(self, module, args):
        values = args[0].detach().transpose(0, 1)[self.unit].reshape(-1).to(torch.float64)
        self.records.append(torch.quantile(values, self.q).numpy())

    def remove(self):
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.remove()
        return False


def _layers(model):
    return [m for m in model.modules() if len(m._parameters) and any(p is not None for p in m._parameters.values())]


def _grads_of_copy(model, x, y, loss_fn):
    """A training-mode deep copy of ``model`` with its gradients on batch (x, y)."""
    clone = copy.deepcopy(model).train()
    for p in clone.parameters():
        p.grad = None
    loss_fn(clone(x), y).backward()
    return clone


def gradient_shift(model, x, y, loss_fn, lr):
    base = _grads_of_copy(model, x, y, loss_fn)
    out_d, out_c = [], []
    for i, layer in enumerate(_layers(base)):
        clone = copy.deepcopy(base)  # (deepcopy does not copy a Parameter's .grad)
        moved = [(p, q) for m, n in zip(_layers(base)[:i], _layers(clone)[:i])
                 for p, q in zip(m.parameters(recurse=False), n.parameters(recurse=False))]
        for p, q in moved:
            q.grad = p.grad.clone()
        if moved:
            torch.optim.SGD([q for _, q in moved], lr=lr).step()
        for p in clone.parameters():
            p.grad = None
        loss_fn(clone(x), y).backward()
        g, g2 = layer.weight.grad.reshape(-1), _layers(clone)[i].weight.grad.reshape(-1)
        out_d.append(torch.linalg.vector_norm(g - g2).item())
        out_c.append(torch.nn.functional.cosine_similarity(g, g2, dim=0, eps=0.0).item())
    return np.asarray(out_d), np.asarray(out_c)


class NoisyBatchNorm1d(nn.BatchNorm1d):
    def __init__(self, num_features, generator, noise_mean=1.0, noise_std=1.0, **kwargs):
        super().__init__(num_features, **kwargs)
        self.gen, self.spread, self.scale = generator, noise_mean, noise_std

    def forward(self, x):
        dims = [d for d in range(x.dim()) if d != 1]
        if self.training:
            n = x.numel() // x.shape[1]
            var, mu = torch.var_mean(x, dim=dims, correction=0)
            with torch.no_grad():
                self.num_batches_tracked += 1
                w = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mu, w)
                self.running_var.lerp_(var * n / (n - 1), w)
        else:
            mu, var = self.running_mean, self.running_var
        shape = [1] * x.dim()
        shape[1] = -1
        y = (x - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps) * self.weight.reshape(shape) \
            + self.bias.reshape(shape)
        if not self.training:
            return y
        centre = torch.empty(self.num_features, dtype=y.dtype).uniform_(-self.spread, self.spread, generator=self.gen)
        sd = torch.empty(self.num_features, dtype=y.dtype).uniform_(0.0, self.scale, generator=self.gen)
        eps = torch.empty_like(y).normal_(generator=self.gen)
        return y + (centre.reshape(shape) + sd.reshape(shape) * eps)


def loss_along_gradient(model, x, y, loss_fn, step_sizes):
    base = _grads_of_copy(model, x, y, loss_fn)
    params = [p for p in base.parameters() if p.requires_grad]
    w = parameters_to_vector(params).detach()
    g = torch.cat([p.grad.reshape(-1) for p in params])
    losses, norms = [], []
    for eta in step_sizes:
        probe = copy.deepcopy(base)
        probe_params = [p for p in probe.parameters() if p.requires_grad]
        with torch.no_grad():
            vector_to_parameters(w - eta * g, probe_params)
        for p in probe_params:
            p.grad = None
        loss = loss_fn(probe(x), y)
        loss.backward()
        losses.append(loss.item())
        norms.append(torch.cat([p.grad.reshape(-1) for p in probe_params]).norm().item())
    return losses, norms


def ics_experiment(seed):
    """The graded experiment as a learner might write it: SGD by hand, one recorder per
    step around the training forward pass, this module's own tools."""
    from bn_exercises.covariate_shift import load_digits_split, make_mlp

    X_train, y_train, X_test, y_test = load_digits_split()
    results = {}
    for label, norm_layer in [("no BN", None), ("BN", nn.BatchNorm1d)]:
        net = make_mlp(norm_layer, seed=seed)
        last_sigmoid = [m for m in net.modules() if isinstance(m, nn.Sigmoid)][-1]
        is_linear = [isinstance(m, nn.Linear) for m in _layers(net)]
        draw = torch.Generator().manual_seed(seed)
        rows, dists, coss = [], [], []
        for step in range(300):
            batch = torch.randperm(X_train.shape[0], generator=draw)[:60]
            xb, yb = X_train[batch], y_train[batch]
            if step % 25 == 0:
                d, c = gradient_shift(net, xb, yb, torch.nn.functional.cross_entropy, 0.5)
                dists.append([v for v, keep in zip(d, is_linear) if keep])
                coss.append([v for v, keep in zip(c, is_linear) if keep])
            recorder = ActivationRecorder(last_sigmoid, 0)
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            recorder.remove()
            rows.extend(recorder.records)
            for p in net.parameters():
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p -= 0.5 * p.grad
        net.eval()
        with torch.no_grad():
            accuracy = (net(X_test).argmax(1) == y_test).float().mean().item()
        results[label] = {"percentiles": np.stack(rows), "distances": np.array(dists), "cosines": np.array(coss),
                          "test_accuracy": accuracy}
    return results
