"""Chapter 1 - feature scaling: the grader's checks and the misconception catalogue.

Each ``check_*`` takes the learner's class or function, runs it and the
reference (``bn_reference.feature_scaling``) on seeded cases, and raises
:class:`~bn_reference.grading.CheckFailed` naming the misconception when one of
the catalogue's wrong implementations reproduces the learner's outputs.
``hidden=True`` runs the grader's own cases (seeded from the course's secret,
more edge cases). The ``_run_*`` functions that touch the learner's object live in
the learner package (:mod:`bn_exercises.feature_scaling`); its visible checks
replay this module's visible cases from recorded answers.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from bn_exercises.feature_scaling import (FITS, SCALINGS, _run_condition, _run_experiment, _run_gd, _run_gradient,
                                         _run_scaler, _run_steps, wine_split)

from .. import feature_scaling as ref
from . import Case, Misconception, case_rng, combined, report_pass, run_check

__all__ = [
    "check_min_max_scaler",
    "check_standard_scaler",
    "check_mse_gradient",
    "check_gradient_descent",
    "check_steps_to_tolerance",
    "check_hessian_condition_number",
    "check_scaling_experiment",
    "CATALOGUE",
]


# --------------------------------------------------------------------------
# Wrong implementations. One configurable class per scaler keeps each
# misconception a one-line variation of the same (otherwise right) code.

class _WrongStandardScaler:
    """Standardizer with switchable mistakes (ddof, axis, refit, no zero guard, variance)."""

    def __init__(self, ddof=0, whole_array=False, refit=False, guard_constant=True, by_variance=False):
        self.ddof, self.whole_array, self.refit = ddof, whole_array, refit
        self.guard, self.by_variance = guard_constant, by_variance

    def fit(self, X):
        X = np.asarray(X, dtype=np.float64)
        axis = None if self.whole_array else 0
        self.mean = X.mean(axis=axis)
        spread = X.var(axis=axis, ddof=self.ddof) if self.by_variance else X.std(axis=axis, ddof=self.ddof)
        self.std = np.where(spread == 0, 1.0, spread) if self.guard else spread
        return self

    def transform(self, X):
        if self.refit:
            self.fit(X)
        return (np.asarray(X, dtype=np.float64) - self.mean) / self.std

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, X):
        return np.asarray(X, dtype=np.float64) * self.std + self.mean


class _WrongMinMaxScaler:
    """Min-max scaler with switchable mistakes (axis, refit, no zero guard, range ignored in
    transform or everywhere, division by the maximum)."""

    def __init__(self, feature_range=(0.0, 1.0), whole_array=False, refit=False,
                 guard_constant=True, use_range=True, range_in_inverse=False, by_max=False):
        self.lo, self.hi = feature_range if use_range else (0.0, 1.0)
        self.inv_lo, self.inv_hi = feature_range if use_range or range_in_inverse else (0.0, 1.0)
        self.whole_array, self.refit, self.guard, self.by_max = whole_array, refit, guard_constant, by_max

    def fit(self, X):
        X = np.asarray(X, dtype=np.float64)
        axis = None if self.whole_array else 0
        self.min = X.min(axis=axis)
        span = X.max(axis=axis) if self.by_max else np.ptp(X, axis=axis)
        self.span = np.where(span == 0, 1.0, span) if self.guard else span
        return self

    def transform(self, X):
        if self.refit:
            self.fit(X)
        return (np.asarray(X, dtype=np.float64) - self.min) / self.span * (self.hi - self.lo) + self.lo

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, X):
        return (np.asarray(X, dtype=np.float64) - self.inv_lo) / (self.inv_hi - self.inv_lo) * self.span + self.min


_FIT_ON_TRAIN = ("fit must store the statistics of the data it is given; transform must only "
                 "apply them, so that test data are scaled with the training statistics.")

STANDARD_SCALER_CATALOGUE = [
    Misconception(
        "sample standard deviation (ddof=1) instead of the population one",
        "use X.std(axis=0) (ddof=0, dividing by n), as scikit-learn's StandardScaler does.",
        partial(_WrongStandardScaler, ddof=1)),
    Misconception(
        "statistics over the whole array instead of per feature",
        "compute the mean and std with axis=0, one value per column (feature).",
        partial(_WrongStandardScaler, whole_array=True)),
    Misconception(
        "transform recomputes the statistics from its own input",
        _FIT_ON_TRAIN, partial(_WrongStandardScaler, refit=True)),
    Misconception(
        "a constant feature gives nan or inf (division by a zero std)",
        "where a feature's std is 0, divide by 1 instead (scikit-learn does this), so it maps to 0.",
        partial(_WrongStandardScaler, guard_constant=False)),
    Misconception(
        "divides by the variance instead of the standard deviation",
        "z = (x - mean) / std with std = sqrt(var): X.std(axis=0), not X.var(axis=0).",
        partial(_WrongStandardScaler, by_variance=True)),
]

MIN_MAX_SCALER_CATALOGUE = [
    Misconception(
        "min-max ignores feature_range",
        "after mapping to [0, 1], stretch and shift to [lo, hi]: x01 * (hi - lo) + lo.",
        partial(_WrongMinMaxScaler, use_range=False)),
    Misconception(
        "transform ignores feature_range (inverse_transform uses it)",
        "transform must map to [lo, hi], the range inverse_transform undoes: after mapping to [0, 1], "
        "stretch and shift with x01 * (hi - lo) + lo.",
        partial(_WrongMinMaxScaler, use_range=False, range_in_inverse=True)),
    Misconception(
        "statistics over the whole array instead of per feature",
        "compute min and max with axis=0, one value per column (feature).",
        partial(_WrongMinMaxScaler, whole_array=True)),
    Misconception(
        "transform recomputes the statistics from its own input",
        _FIT_ON_TRAIN, partial(_WrongMinMaxScaler, refit=True)),
    Misconception(
        "a constant feature gives nan or inf (division by a zero range)",
        "where max == min, divide by 1 instead (scikit-learn does this), so the feature maps to lo.",
        partial(_WrongMinMaxScaler, guard_constant=False)),
    Misconception(
        "divides by the maximum instead of the range (max - min)",
        "x01 = (x - min) / (max - min): the distance from the minimum over the width of the range.",
        partial(_WrongMinMaxScaler, by_max=True)),
]


def _gradient(X, y, w, b, factor=2.0, mean=True, with_bias=True, sign=1.0, sum_bias=True):
    """MSE gradient with switchable mistakes; the right one is the default."""
    r = sign * (X @ w + b - y)
    scale = factor / (len(X) if mean else 1)
    db = (scale * r.sum() if sum_bias else scale * r) if with_bias else 0.0
    return scale * (X.T @ r), db


MSE_GRADIENT_CATALOGUE = [
    Misconception(
        "the factor 2 is missing",
        "d/dw of r^2 is 2 r dr/dw: dw = 2/n * X.T @ r.",
        partial(_gradient, factor=1.0)),
    Misconception(
        "the 1/n is missing (gradient of the sum, not of the mean)",
        "L is a mean, so divide by n: dw = 2/n * X.T @ r, db = 2/n * r.sum().",
        partial(_gradient, mean=False)),
    Misconception(
        "the bias gradient is left out (db = 0)",
        "b shifts every prediction, so db = 2/n * sum(r) with r = X @ w + b - y.",
        partial(_gradient, with_bias=False)),
    Misconception(
        "the residual has the wrong sign (y - prediction)",
        "use r = X @ w + b - y (prediction minus target), or flip the sign of the whole gradient.",
        partial(_gradient, sign=-1.0)),
    Misconception(
        "db is not summed over the examples (one value per example instead of one number)",
        "b is one number shared by all n predictions, so its gradient adds up their terms: db = 2/n * r.sum().",
        partial(_gradient, sum_bias=False)),
]


def _gd(X, y, lr, n_steps, grad=_gradient, update_bias=True, record_start=True, record_end=True,
        sequential=False):
    """GD with switchable mistakes; returns (w, b, losses) like the reference."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    w, b = np.zeros(X.shape[1]), 0.0
    losses = []
    for step in range(n_steps):
        if record_start or step > 0:
            losses.append(np.mean((X @ w + b - y) ** 2))
        dw, db = grad(X, y, w, b)
        w = w - lr * dw
        if sequential:  # the bias's gradient taken at the weights already updated
            db = grad(X, y, w, b)[1]
        b = b - lr * db if update_bias else b
    if record_end:
        losses.append(np.mean((X @ w + b - y) ** 2))
    return w, b, np.array(losses)


GRADIENT_DESCENT_CATALOGUE = [
    Misconception(
        "the bias is never updated",
        "update both parameters every step: w -= lr * dw and b -= lr * db.",
        partial(_gd, update_bias=False)),
    Misconception(
        "losses does not start with the loss at w = 0, b = 0",
        "append the starting loss before the first step, so losses has n_steps + 1 entries.",
        partial(_gd, record_start=False)),
    Misconception(
        "losses lacks the loss after the last step",
        "losses[k] is the loss after k steps, k = 0 .. n_steps: after the loop, append the loss "
        "at the final w and b too (n_steps + 1 entries).",
        partial(_gd, record_end=False)),
    Misconception(
        "the bias's gradient is computed after w was already updated",
        "compute dw and db at the same point (w, b), then update both: dw, db = gradient(X, y, w, b).",
        partial(_gd, sequential=True)),
    Misconception(
        "the gradient is missing its 1/n",
        "use the gradient of the mean: 2/n * X.T @ r (and 2/n * r.sum()).",
        partial(_gd, grad=partial(_gradient, mean=False))),
    Misconception(
        "the gradient is missing its factor 2",
        "the gradient of mean(r^2) is 2/n * X.T @ r.",
        partial(_gd, grad=partial(_gradient, factor=1.0))),
]


def _steps(X, y, lr, tol, max_steps, target_optimum=True, offset=0, with_bias=True):
    """steps_to_tolerance with switchable mistakes."""
    _, _, losses = ref.gradient_descent(X, y, lr, max_steps)
    A = np.column_stack([X, np.ones(len(X))]) if with_bias else np.asarray(X, dtype=np.float64)
    best = np.mean((A @ np.linalg.lstsq(A, y, rcond=None)[0] - y) ** 2)
    target = best + tol if target_optimum else tol
    hits = np.flatnonzero(losses <= target)
    return int(hits[0]) + offset if hits.size else int(max_steps)


STEPS_TO_TOLERANCE_CATALOGUE = [
    Misconception(
        "the loss is compared with tol instead of with the optimum plus tol",
        "noisy data never reach loss 0: compute L* by least squares on [X, 1] "
        "(np.linalg.lstsq) and stop when loss - L* <= tol.",
        partial(_steps, target_optimum=False)),
    Misconception(
        "the count is one step too many",
        "return k where losses[k] is the first loss within tol; losses[0] is before any step, "
        "so an already converged start gives 0.",
        partial(_steps, offset=1)),
    Misconception(
        "the optimum L* is computed without the bias column",
        "GD fits w and b, so its optimum is the least-squares fit on A = [X, 1] "
        "(np.column_stack([X, np.ones(len(X))])); without the ones L* is too high and GD 'arrives' too early.",
        partial(_steps, with_bias=False)),
]


def _condition(X, squared=True, with_bias=True, inverted=False):
    """Condition number with switchable mistakes."""
    X = np.asarray(X, dtype=np.float64)
    A = np.column_stack([X, np.ones(len(X))]) if with_bias else X
    kappa = float(np.linalg.cond(A) ** (2 if squared else 1))
    return 1.0 / kappa if inverted else kappa


HESSIAN_CATALOGUE = [
    Misconception(
        "the condition number of the data matrix, not of the Hessian",
        "H = (2/n) A^T A with A = [X, 1]; its condition number is cond(A) squared. "
        "Build H and use its eigenvalues (np.linalg.eigvalsh).",
        partial(_condition, squared=False)),
    Misconception(
        "the Hessian leaves out the bias",
        "the loss depends on (w, b): append a column of ones to X before forming H = (2/n) A^T A.",
        partial(_condition, with_bias=False)),
    Misconception(
        "the ratio is inverted (lambda_min / lambda_max)",
        "kappa = lambda_max / lambda_min >= 1; np.linalg.eigvalsh returns the eigenvalues in "
        "ascending order, so it is eigenvalues[-1] / eigenvalues[0].",
        partial(_condition, inverted=True)),
]

def _experiment(X_train, y_train, X_test, tol, max_steps, bugs=()):
    """The experiment with switchable mistakes (``bugs``, a tuple of the names below);
    without any it computes what ``ref.scaling_experiment`` does.

    - ``"fit_all"``: the scalers of the kappa and step-count problems fitted on train + test;
    - ``"test_refit"``: the "fit on train" min-max scaler refitted on the test set (fit_transform);
    - ``"raw_lr"`` / ``"standardized_lr"``: one step size, that problem's, for every problem;
    - ``"lr_without_2_over_n"``: step size 1 / lambda_max(A^T A), the Hessian without its 2/n;
    - ``"data_kappa"``: kappa = np.linalg.cond(Z), the data matrix's, not the Hessian's;
    - ``"scaled_targets"``: y standardized too on the standardized problem.
    """
    everything = np.vstack([X_train, X_test])
    fit_data = everything if "fit_all" in bugs else X_train
    problems = dict(zip(SCALINGS, (np.asarray(X_train, dtype=np.float64),
                                   ref.MinMaxScaler().fit(fit_data).transform(X_train),
                                   ref.StandardScaler().fit(fit_data).transform(X_train))))

    def curvature(Z):
        return np.linalg.eigvalsh(ref.hessian(Z))[-1]

    shared = {"raw_lr": "raw", "standardized_lr": "standardized"}
    kappa, steps = {}, {}
    for name, Z in problems.items():
        kappa[name] = float(np.linalg.cond(Z)) if "data_kappa" in bugs else ref.hessian_condition_number(Z)
        lr = 1.0 / curvature(next((problems[shared[b]] for b in bugs if b in shared), Z))
        if "lr_without_2_over_n" in bugs:
            lr = 2.0 / (len(Z) * curvature(Z))  # lambda_max(A^T A) = n/2 lambda_max(H)
        y = y_train
        if "scaled_targets" in bugs and name == "standardized":
            y = (y_train - y_train.mean()) / y_train.std()
        steps[name] = ref.steps_to_tolerance(Z, y, lr, tol, max_steps)
    fair = ref.MinMaxScaler().fit(X_test if "test_refit" in bugs else X_train)
    scalers = (fair, ref.MinMaxScaler().fit(everything))
    outside = {fit: ref.outside_unit_interval(scaler.transform(X_test)) for fit, scaler in zip(FITS, scalers)}
    return {"kappa": kappa, "steps": steps, "outside [0, 1]": outside}


_FIT_ALL = Misconception(
    "the scalers are fitted on the training and test data together",
    "fit every scaler on X_train only (scaler.fit(X_train)), then transform; np.vstack([X_train, X_test]) "
    "belongs only in the 'fit on all' scaler that shows the leak.",
    partial(_experiment, bugs=("fit_all",)))
_TEST_REFIT = Misconception(
    "the test set is scaled with statistics of its own (fit_transform on X_test)",
    "the 'fit on train' scaler is fitted on X_train and only transforms X_test: "
    "MinMaxScaler().fit(X_train).transform(X_test), never fit_transform(X_test).",
    partial(_experiment, bugs=("test_refit",)))
_RAW_LR = Misconception(  # both mistakes leave the scaled problems short of tol after max_steps: one name
    "the scaled problems never reach tol: a step size not re-derived after scaling (the raw problem's), "
    "or one at the stability limit 2 / lambda_max",
    "compute lr = 1 / lambda_max(H) for each version of the features, from that version's own Hessian "
    "H = (2/n) A^T A: the raw problem's step size is far too small for scaled features, and at 2 / lambda_max "
    "the error along the steepest direction flips sign forever instead of shrinking.",
    partial(_experiment, bugs=("raw_lr",)))
_DATA_KAPPA = Misconception(
    "kappa of the data matrix, not of the Hessian (np.linalg.cond(X))",
    "use your hessian_condition_number: the Hessian is H = (2/n) A^T A with A = [X, 1], and its kappa "
    "is cond(A) squared.",
    partial(_experiment, bugs=("data_kappa",)))

SCALING_EXPERIMENT_CATALOGUE = [
    _FIT_ALL,
    _TEST_REFIT,
    _RAW_LR,
    Misconception(
        "one step size for every problem, the standardized problem's",
        "each version of the features has its own Hessian: compute lr = 1 / lambda_max(H) inside the loop, "
        "from the features that GD runs on.",
        partial(_experiment, bugs=("standardized_lr",))),
    Misconception(
        "the step size ignores the Hessian's factor 2/n (1 / lambda_max of A^T A)",
        "the Hessian of the mean squared error is H = (2/n) A^T A: lr = 1 / lambda_max of that matrix.",
        partial(_experiment, bugs=("lr_without_2_over_n",))),
    _DATA_KAPPA,
    Misconception(
        "the targets y were standardized too (on the standardized problem)",
        "scale the features only: the loss, its optimum and tol are in the units of y, the same for every problem.",
        partial(_experiment, bugs=("scaled_targets",))),
    combined(_FIT_ALL, _TEST_REFIT, partial(_experiment, bugs=("fit_all", "test_refit"))),
    combined(_RAW_LR, _DATA_KAPPA, partial(_experiment, bugs=("raw_lr", "data_kappa"))),
]

CATALOGUE = {
    "MinMaxScaler": MIN_MAX_SCALER_CATALOGUE,
    "StandardScaler": STANDARD_SCALER_CATALOGUE,
    "mse_gradient": MSE_GRADIENT_CATALOGUE,
    "gradient_descent": GRADIENT_DESCENT_CATALOGUE,
    "steps_to_tolerance": STEPS_TO_TOLERANCE_CATALOGUE,
    "hessian_condition_number": HESSIAN_CATALOGUE,
    "scaling_experiment": SCALING_EXPERIMENT_CATALOGUE,
}


# --------------------------------------------------------------------------
# Cases. Visible case streams are seeded 0..; hidden ones from the course's secret
# (case_rng), and they add edge cases.
# Every case's arrays are random and every parameter takes non-default values
# in some case (feature_range, w and b away from 0, lr, n_steps, tol, max_steps).

_F32 = {"rtol": 1e-4, "atol": 1e-5}  # float32 resolves about 1e-7; the scaled data are O(1)


def _features(rng, n, d, dtype=np.float64):
    """n x d data whose features have very different means and spreads."""
    loc = rng.uniform(-50, 50, size=d)
    scale = rng.uniform(0.1, 20, size=d)
    return (rng.normal(size=(n, d)) * scale + loc).astype(dtype)


def _scaler_cases(hidden: bool, ranges):
    """Seeded fit/transform cases; ``ranges`` gives the feature_range of each (None: the default)."""
    rng = case_rng(hidden, 0)
    shapes = [(40, 3), (2, 4), (9, 1)] + ([(200, 6), (3, 2)] if hidden else [])
    cases = []
    for (n, d), feature_range in zip(shapes, ranges):
        kw = {} if feature_range is None else {"feature_range": feature_range}
        cases.append(Case(f"{n} x {d} float64 training data, other test data, {kw or 'defaults'}",
                          {"X_train": _features(rng, n, d), "X_test": _features(rng, 7, d), "kwargs": kw}))
    X = _features(rng, 12, 3)
    X[:, 1] = 2.5  # a constant feature, exactly representable so sums are exact
    X_test = _features(rng, 5, 3)
    X_test[:, 1] = [2.5, 3.0, 2.5, -1.0, 2.5]  # other values of it on test data pass through unscaled
    kw = {} if ranges[0] is None else {"feature_range": (-1.0, 1.0)}
    cases.append(Case(f"12 x 3 data whose 2nd feature is constant (test data has other values of it), "
                      f"{kw or 'defaults'}", {"X_train": X, "X_test": X_test, "kwargs": kw}))
    n = 30 if hidden else 10
    kw = {} if ranges[0] is None else {"feature_range": (-2.0, 3.0)}
    cases.append(Case(f"{n} x 4 float32 data, {kw or 'defaults'}",
                      {"X_train": _features(rng, n, 4, np.float32), "X_test": _features(rng, 6, 4, np.float32),
                       "kwargs": kw, **_F32}))
    return cases




def check_standard_scaler(StandardScaler, hidden=False):
    """Check a StandardScaler class against scikit-learn's conventions."""
    __tracebackhide__ = True
    cases = _scaler_cases(hidden, [None] * 5)
    report_pass("StandardScaler", run_check("StandardScaler", StandardScaler, ref.StandardScaler, cases,
                                            _run_scaler, STANDARD_SCALER_CATALOGUE, hidden=hidden))


def check_min_max_scaler(MinMaxScaler, hidden=False):
    """Check a MinMaxScaler class, feature_range included."""
    __tracebackhide__ = True
    cases = _scaler_cases(hidden, [(0.0, 1.0), (-1.0, 1.0), (2.0, 5.0), (-3.0, -1.0), (0.0, 1.0)])
    report_pass("MinMaxScaler", run_check("MinMaxScaler", MinMaxScaler, ref.MinMaxScaler, cases,
                                          _run_scaler, MIN_MAX_SCALER_CATALOGUE, hidden=hidden))


def _regression(rng, n, d, noise=0.5):
    """A linear-regression problem with unscaled features and noisy targets."""
    X = _features(rng, n, d) / 10
    y = X @ rng.normal(size=d) + rng.normal() + noise * rng.normal(size=n)
    return X, y


def _gradient_cases(hidden):
    rng = case_rng(hidden, 1)
    shapes = [(20, 3), (2, 1), (50, 5)] + ([(7, 2), (300, 8)] if hidden else [])
    cases = []
    for n, d in shapes:
        X, y = _regression(rng, n, d)
        cases.append(Case(f"X {n} x {d}, random w and b",
                          {"X": X, "y": y, "w": rng.normal(size=d), "b": float(rng.normal())}))
    X, y = _regression(rng, 12, 3)
    cases.append(Case("float32 X 12 x 3, y and w, random b",
                      {"X": X.astype(np.float32), "y": y.astype(np.float32),
                       "w": rng.normal(size=3).astype(np.float32), "b": float(rng.normal()), **_F32}))
    return cases






def check_mse_gradient(mse_gradient, hidden=False):
    """Check mse_gradient(X, y, w, b) -> (dw, db)."""
    __tracebackhide__ = True
    report_pass("mse_gradient", run_check("mse_gradient", mse_gradient, ref.mse_gradient,
                                          _gradient_cases(hidden), _run_gradient, MSE_GRADIENT_CATALOGUE,
                                          hidden=hidden))


def _scaled_problem(rng, n, d):
    """A standardized regression problem and the step size 1 / lambda_max of its Hessian."""
    X, y = _regression(rng, n, d)
    X = ref.StandardScaler().fit_transform(X)
    lr = 1.0 / np.linalg.eigvalsh(ref.hessian(X))[-1]
    return X, y, float(lr)


def _gd_cases(hidden):
    rng = case_rng(hidden, 2)
    settings = [(30, 2, 25, 1.0), (2, 1, 10, 0.5), (60, 4, 40, 1.5)]
    if hidden:
        settings += [(10, 3, 15, 0.3), (200, 6, 60, 1.0), (8, 2, 0, 1.0)]
    cases = []
    for n, d, n_steps, lr_factor in settings:
        X, y, lr = _scaled_problem(rng, n, d)
        lr *= lr_factor
        cases.append(Case(f"standardized X {n} x {d}, lr={lr:.3g}, n_steps={n_steps}",
                          {"X": X, "y": y, "lr": lr, "n_steps": n_steps}))
    X, y = _regression(rng, 20, 2)  # features not centred: db depends on w
    lr = 1.0 / np.linalg.eigvalsh(ref.hessian(X))[-1]
    cases.append(Case(f"unscaled X 20 x 2 (features not centred), lr={lr:.3g}, n_steps=20",
                      {"X": X, "y": y, "lr": float(lr), "n_steps": 20}))
    return cases




def check_gradient_descent(gradient_descent, hidden=False):
    """Check gradient_descent(X, y, lr, n_steps) -> (w, b, losses)."""
    __tracebackhide__ = True
    report_pass("gradient_descent", run_check("gradient_descent", gradient_descent, ref.gradient_descent,
                                              _gd_cases(hidden), _run_gd, GRADIENT_DESCENT_CATALOGUE,
                                              hidden=hidden))


def _steps_cases(hidden):
    rng = case_rng(hidden, 3)
    cases = []
    for n, d, tol in [(40, 2, 1e-3), (25, 3, 1e-6)] + ([(80, 4, 1e-4)] if hidden else []):
        X, y, lr = _scaled_problem(rng, n, d)
        cases.append(Case(f"standardized X {n} x {d}, tol={tol:g}",
                          {"X": X, "y": y, "lr": lr, "tol": tol, "max_steps": 500}))
    X, y, lr = _scaled_problem(rng, 20, 2)
    cases.append(Case("a step size too small to get there within max_steps=30",
                      {"X": X, "y": y, "lr": lr / 1000, "tol": 1e-6, "max_steps": 30}))
    X = rng.normal(size=(10, 2))
    cases.append(Case("targets that are all 0, so w = 0, b = 0 is already optimal",
                      {"X": X, "y": np.zeros(10), "lr": 0.1, "tol": 1e-8, "max_steps": 50}))
    return cases




def check_steps_to_tolerance(steps_to_tolerance, hidden=False):
    """Check steps_to_tolerance(X, y, lr, tol, max_steps) -> int."""
    __tracebackhide__ = True
    report_pass("steps_to_tolerance", run_check("steps_to_tolerance", steps_to_tolerance,
                                                ref.steps_to_tolerance, _steps_cases(hidden),
                                                _run_steps, STEPS_TO_TOLERANCE_CATALOGUE, hidden=hidden))


def _hessian_cases(hidden):
    rng = case_rng(hidden, 4)
    shapes = [(50, 2), (2, 1), (30, 4)] + ([(100, 6), (5, 3)] if hidden else [])
    cases = [Case(f"unscaled X {n} x {d}", {"X": _features(rng, n, d)}) for n, d in shapes]
    cases.append(Case("standardized X 50 x 3", {"X": ref.StandardScaler().fit_transform(_features(rng, 50, 3))}))
    return cases




def check_hessian_condition_number(hessian_condition_number, hidden=False):
    """Check hessian_condition_number(X) -> float."""
    __tracebackhide__ = True
    report_pass("hessian_condition_number", run_check(
        "hessian_condition_number", hessian_condition_number, ref.hessian_condition_number,
        _hessian_cases(hidden), _run_condition, HESSIAN_CATALOGUE, rtol=1e-6, hidden=hidden))



def _experiment_cases(hidden):
    """Random train/test splits of the wine data (split seeds from the case stream) with
    other test sizes, tolerances and step caps. A split is kept only if some test value lies
    outside the training range (about 1 split in 200 has none, and nothing to leak there);
    the wine data's measurement steps then put it at least 1e-3 outside [0, 1]."""
    rng = case_rng(hidden, 5)
    settings = [(0.3, 1e-3, 5000), (0.2, 1e-4, 4000)] + ([(0.25, 3e-4, 5000)] if hidden else [])
    cases = []
    for test_size, tol, max_steps in settings:
        while True:
            seed = int(rng.integers(2**32))
            X_train, y_train, X_test, _ = wine_split(seed, test_size)
            if ref.outside_unit_interval(ref.MinMaxScaler().fit(X_train).transform(X_test)) > 1e-3:
                break
        cases.append(Case(f"wine_split(seed={seed}, test_size={test_size}), tol={tol:g}, max_steps={max_steps}",
                          {"X_train": X_train, "y_train": y_train, "X_test": X_test, "tol": tol,
                           "max_steps": max_steps}))
    return cases


def check_scaling_experiment(scaling_experiment, hidden=False):
    """Check scaling_experiment(X_train, y_train, X_test, tol, max_steps) -> dict."""
    __tracebackhide__ = True
    report_pass("scaling_experiment", run_check(
        "scaling_experiment", scaling_experiment, ref.scaling_experiment, _experiment_cases(hidden),
        _run_experiment, SCALING_EXPERIMENT_CATALOGUE, rtol=1e-6, hidden=hidden))