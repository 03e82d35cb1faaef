"""Chapter 1 - feature scaling: the reference implementations.

Scalers follow scikit-learn's ``MinMaxScaler`` and ``StandardScaler`` (the
oracle in ``tests/test_ch1_feature_scaling.py``): statistics per feature
(column) from the data given to ``fit`` only, population standard deviation
(``ddof=0``), and a constant feature scaled by 1 instead of divided by 0.

The regression helpers study gradient descent (GD) on the mean squared error

    L(w, b) = mean((X @ w + b - y) ** 2),   X: (n, d), y: (n,), w: (d,), b: scalar,

whose Hessian with respect to (w, b) is H = (2 / n) A^T A with A = [X, 1].

``scaling_experiment`` is the exercise's graded experiment: the scalers' effect on
the condition number and on the GD step count on a real data set (scikit-learn's
wine data, split by the learner package's ``wine_split``), and what fitting a
scaler on all the data does to the test set.
"""

from __future__ import annotations

import numpy as np

from bn_exercises.feature_scaling import FITS, SCALINGS, wine_split

__all__ = [
    "MinMaxScaler",
    "StandardScaler",
    "mse_loss",
    "mse_gradient",
    "gradient_descent_path",
    "gradient_descent",
    "least_squares_loss",
    "steps_to_tolerance",
    "hessian",
    "hessian_condition_number",
    "outside_unit_interval",
    "scaling_experiment",
    "wine_split",
]


def _check_matrix(X, name: str = "X") -> np.ndarray:
    """``X`` as a finite 2-D float array (n_samples, n_features), or a clear ValueError."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}; "
            f"for a single feature use X.reshape(-1, 1)."
        )
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinity; remove or impute those values first.")
    return X


def _constant_feature(var: np.ndarray, mean: np.ndarray, n: int) -> np.ndarray:
    """True where a feature is constant up to rounding: scikit-learn's bound on
    the floating-point error of a computed variance (``_is_constant_feature``)."""
    eps = np.finfo(np.float64).eps
    return var <= n * eps * var + (n * mean * eps) ** 2


class _Scaler:
    """Shared ``fit_transform`` and fitted-state check; subclasses define
    ``fit``, ``transform`` and ``inverse_transform``."""

    n_features_in_: int

    def fit_transform(self, X):
        """``fit(X)`` then ``transform(X)``; returns an array shaped like X."""
        return self.fit(X).transform(X)

    def _check_fitted(self, X) -> np.ndarray:
        if not hasattr(self, "n_features_in_"):
            raise ValueError(f"This {type(self).__name__} is not fitted yet: call fit(X_train) first.")
        X = _check_matrix(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but this scaler was fitted on {self.n_features_in_}."
            )
        return X


class MinMaxScaler(_Scaler):
    """Scale each feature to ``feature_range`` using the training min and max.

    x' = (x - min) / (max - min) * (hi - lo) + lo, per feature; a constant
    feature (max == min) maps to ``lo``.
    """

    def __init__(self, feature_range=(0.0, 1.0)):
        lo, hi = feature_range
        if not lo < hi:
            raise ValueError(f"feature_range must be (min, max) with min < max, got {feature_range!r}.")
        self.feature_range = (float(lo), float(hi))

    def fit(self, X):
        """Learn per-feature min and max from X (n, d); returns self."""
        X = _check_matrix(X)
        lo, hi = self.feature_range
        self.data_min_ = X.min(axis=0)
        self.data_max_ = X.max(axis=0)
        data_range = self.data_max_ - self.data_min_
        # scikit-learn's _handle_zeros_in_scale: a (near-)zero range is replaced by 1
        data_range = np.where(data_range < 10 * np.finfo(data_range.dtype).eps, 1.0, data_range)
        self.scale_ = ((hi - lo) / data_range).astype(X.dtype)
        self.min_ = (lo - self.data_min_ * self.scale_).astype(X.dtype)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """Scale X (m, d) with the fitted statistics; returns (m, d)."""
        X = self._check_fitted(X)
        return X * self.scale_ + self.min_

    def inverse_transform(self, X):
        """Undo ``transform``: (m, d) scaled values back to original units."""
        X = self._check_fitted(X)
        return (X - self.min_) / self.scale_


class StandardScaler(_Scaler):
    """Standardize each feature: z = (x - mean) / std with the training mean and
    the population std (``ddof=0``); a constant feature is divided by 1."""

    def fit(self, X):
        """Learn per-feature mean and std from X (n, d); returns self."""
        X = _check_matrix(X)
        # accumulate in float64 as scikit-learn does, store in X's dtype
        X64 = X.astype(np.float64)
        mean = X64.mean(axis=0)
        var = X64.var(axis=0)
        scale = np.where(_constant_feature(var, mean, X.shape[0]), 1.0, np.sqrt(var))
        self.mean_ = mean.astype(X.dtype)
        self.var_ = var.astype(X.dtype)
        self.scale_ = scale.astype(X.dtype)
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X):
        """Standardize X (m, d) with the fitted statistics; returns (m, d)."""
        X = self._check_fitted(X)
        return (X - self.mean_) / self.scale_

    def inverse_transform(self, X):
        """Undo ``transform``: (m, d) standardized values back to original units."""
        X = self._check_fitted(X)
        return X * self.scale_ + self.mean_


def _check_regression(X, y, w=None):
    """Validate X (n, d), y (n,) and optionally w (d,); return them as float64."""
    X = _check_matrix(X).astype(np.float64)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (X.shape[0],):
        raise ValueError(f"y must have shape ({X.shape[0]},) to match X {X.shape}, got {y.shape}.")
    if w is None:
        return X, y
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (X.shape[1],):
        raise ValueError(f"w must have shape ({X.shape[1]},) to match X {X.shape}, got {w.shape}.")
    return X, y, w


def mse_loss(X, y, w, b) -> float:
    """L(w, b) = mean((X @ w + b - y)^2) for X (n, d), y (n,), w (d,), scalar b."""
    X, y, w = _check_regression(X, y, w)
    return float(np.mean((X @ w + b - y) ** 2))


def mse_gradient(X, y, w, b):
    """Gradient of the MSE: dL/dw = (2/n) X^T r (shape (d,)), dL/db = (2/n) sum(r),
    with residuals r = X @ w + b - y. Returns ``(dw, db)``."""
    X, y, w = _check_regression(X, y, w)
    r = X @ w + b - y
    n = X.shape[0]
    return 2.0 / n * (X.T @ r), 2.0 / n * float(r.sum())


def gradient_descent_path(X, y, lr: float, n_steps: int):
    """The iterates of plain GD on the MSE from w = 0, b = 0,
    (w, b) <- (w, b) - lr * grad L(w, b).

    Returns ``(W, B)``: W (n_steps + 1, d) and B (n_steps + 1,), row k after k steps.
    """
    X, y = _check_regression(X, y)
    W, B = np.zeros((n_steps + 1, X.shape[1])), np.zeros(n_steps + 1)
    for k in range(n_steps):
        dw, db = mse_gradient(X, y, W[k], B[k])
        W[k + 1], B[k + 1] = W[k] - lr * dw, B[k] - lr * db
    return W, B


def gradient_descent(X, y, lr: float, n_steps: int):
    """Plain GD on the MSE from w = 0, b = 0 (``gradient_descent_path``).

    Returns ``(w, b, losses)``: w (d,), float b, and losses (n_steps + 1,) where
    ``losses[k]`` is the loss after k steps (``losses[0]`` at the start).
    """
    W, B = gradient_descent_path(X, y, lr, n_steps)
    losses = np.array([mse_loss(X, y, w, b) for w, b in zip(W, B)])
    return W[-1], float(B[-1]), losses


def least_squares_loss(X, y) -> float:
    """The optimum L* = min over (w, b) of the MSE, by least squares on [X, 1]."""
    X, y = _check_regression(X, y)
    A = np.column_stack([X, np.ones(len(X))])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(np.mean((A @ coef - y) ** 2))


def steps_to_tolerance(X, y, lr: float, tol: float, max_steps: int) -> int:
    """The smallest k such that GD's loss after k steps is within ``tol`` of the
    least-squares optimum (L_k - L* <= tol); ``max_steps`` if no k <= max_steps is."""
    _, _, losses = gradient_descent(X, y, lr, max_steps)
    hits = np.flatnonzero(losses - least_squares_loss(X, y) <= tol)
    return int(hits[0]) if hits.size else int(max_steps)


def hessian(X) -> np.ndarray:
    """Hessian of the MSE with respect to (w, b): (2/n) A^T A with A = [X, 1], shape (d+1, d+1)."""
    X = _check_matrix(X).astype(np.float64)
    A = np.column_stack([X, np.ones(len(X))])
    return 2.0 / len(X) * A.T @ A


def hessian_condition_number(X) -> float:
    """kappa(H) = lambda_max / lambda_min of the Hessian above (inf if singular)."""
    eig = np.linalg.eigvalsh(hessian(X))
    return float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")


def outside_unit_interval(T) -> float:
    """How far the furthest value of ``T`` lies outside [0, 1] (0 if none does)."""
    T = np.asarray(T, dtype=np.float64)
    return float(max(0.0, -T.min(), T.max() - 1.0))


def scaling_experiment(X_train, y_train, X_test, tol: float, max_steps: int) -> dict:
    """The exercise's experiment on one train/test split (X_train (n, d), y_train (n,),
    X_test (m, d)).

    For the raw, the min-max scaled and the standardized training features (scalers
    fitted on X_train): kappa(H) of the MSE's Hessian, and the GD steps to within
    ``tol`` of the optimum (``steps_to_tolerance``, capped at ``max_steps``) with the
    step size 1 / lambda_max(H) of *that* problem's Hessian. Then leakage: how far the
    min-max scaled test set reaches outside [0, 1] when the scaler is fitted on the
    training split, and when it is fitted on training and test data together.

    Returns ``{"kappa": {scaling: float}, "steps": {scaling: int},
    "outside [0, 1]": {fit: float}}`` with scalings ``SCALINGS`` and fits ``FITS``.
    """
    problems = dict(zip(SCALINGS, (np.asarray(X_train, dtype=np.float64), MinMaxScaler().fit_transform(X_train),
                                   StandardScaler().fit_transform(X_train))))
    kappa, steps = {}, {}
    for name, Z in problems.items():
        kappa[name] = hessian_condition_number(Z)
        lr = 1.0 / np.linalg.eigvalsh(hessian(Z))[-1]
        steps[name] = steps_to_tolerance(Z, y_train, lr, tol, max_steps)
    scalers = (MinMaxScaler().fit(X_train), MinMaxScaler().fit(np.vstack([X_train, X_test])))
    outside = {fit: outside_unit_interval(scaler.transform(X_test)) for fit, scaler in zip(FITS, scalers)}
    return {"kappa": kappa, "steps": steps, "outside [0, 1]": outside}
