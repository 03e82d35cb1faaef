"""A second correct Chapter 1 implementation, written differently from the
reference (column loops, PyTorch autograd and optimizers, SVD, a GD that stops
at the tolerance), that every check must accept."""

import numpy as np
import torch


class StandardScaler:
    def fit(self, X):
        X = np.asarray(X, dtype=np.float64)
        self.mu, self.sd = [], []
        for col in X.T:  # one feature at a time
            m = col.sum() / len(col)
            s = np.sqrt(((col - m) ** 2).sum() / len(col))
            self.mu.append(m)
            self.sd.append(s if s > 0 else 1.0)
        self.mu, self.sd = np.array(self.mu), np.array(self.sd)
        return self

    def transform(self, X):
        return (np.asarray(X, dtype=np.float64) - self.mu) / self.sd

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, Z):
        return np.asarray(Z) * self.sd + self.mu


class MinMaxScaler:
    def __init__(self, feature_range=(0.0, 1.0)):
        self.a, self.b = feature_range

    def fit(self, X):
        X = np.sort(np.asarray(X, dtype=np.float64), axis=0)
        self.lo, span = X[0], X[-1] - X[0]
        self.span = np.where(span > 0, span, 1.0)
        return self

    def transform(self, X):
        t = (np.asarray(X, dtype=np.float64) - self.lo) / self.span
        return self.a + t * (self.b - self.a)

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, Z):
        return (np.asarray(Z) - self.a) / (self.b - self.a) * self.span + self.lo


def _loss(X, y, w, b):
    return ((X @ w + b - y) ** 2).mean()


def mse_gradient(X, y, w, b):
    w = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(float(b), dtype=torch.float64, requires_grad=True)
    _loss(torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64), w, b).backward()
    return w.grad.numpy(), b.grad.item()


def gradient_descent(X, y, lr, n_steps):
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr)
    losses = []
    for _ in range(n_steps):
        opt.zero_grad()
        loss = _loss(X, y, w, b)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    losses.append(_loss(X, y, w, b).item())
    return w.detach().numpy(), b.item(), losses


def steps_to_tolerance(X, y, lr, tol, max_steps):
    """Its own GD on theta = (w, b), stopping as soon as the loss is within tol."""
    A = np.hstack([X, np.ones((len(X), 1))])
    best = np.mean((A @ np.linalg.pinv(A) @ y - y) ** 2)
    theta = np.zeros(A.shape[1])
    for k in range(max_steps + 1):
        r = A @ theta - y
        if np.mean(r ** 2) - best <= tol:
            return k
        theta = theta - lr * 2 / len(y) * (A.T @ r)
    return max_steps


def hessian_condition_number(X):
    A = np.hstack([X, np.ones((len(X), 1))])
    return np.linalg.cond(2 * A.T @ A / len(X))


def scaling_experiment(X_train, y_train, X_test, tol, max_steps):
    versions = [("raw", np.asarray(X_train, dtype=np.float64)),
                ("min-max", MinMaxScaler().fit_transform(X_train)),
                ("standardized", StandardScaler().fit_transform(X_train))]
    kappa, steps = {}, {}
    for name, Z in versions:
        A = np.hstack([Z, np.ones((len(Z), 1))])
        singular = np.linalg.svd(A, compute_uv=False)
        kappa[name] = hessian_condition_number(Z)
        steps[name] = steps_to_tolerance(Z, y_train, len(Z) / (2 * singular[0] ** 2), tol, max_steps)
    outside = {}
    for fit, data in [("fit on train", X_train), ("fit on all", np.concatenate([X_train, X_test]))]:
        T = MinMaxScaler().fit(data).transform(X_test)
        outside[fit] = float(np.clip(np.abs(T - 0.5) - 0.5, 0, None).max())
    return {"kappa": kappa, "steps": steps, "outside [0, 1]": outside}
