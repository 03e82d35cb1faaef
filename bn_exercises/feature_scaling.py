"""Chapter 1 - feature scaling: the exercise's visible checks.

Each ``check_*`` runs the learner's class or function on the visible cases
recorded from the grader's check of the same name (``answers/feature_scaling.npz``)
and says what is wrong, naming the misconception when a known wrong
implementation gave the same outputs. The ``_run_*`` functions are the only code
that touches the learner's object: they pass the case's arrays to it unchanged
and return plain data. The grader runs the same ``_run_*`` functions on its
hidden cases.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .checking import CheckFailed, recorded_check

__all__ = [
    "check_min_max_scaler",
    "check_standard_scaler",
    "check_mse_gradient",
    "check_gradient_descent",
    "check_steps_to_tolerance",
    "check_hessian_condition_number",
]

#: The misconception of a scaler that hands the work to scikit-learn's.
LIBRARY_SCALER = "scikit-learn's scaler used instead of your own code"

#: Case data that are functions (none in this chapter): see bn_exercises.codec.resolver.
CASE_HELPERS: dict = {}


@contextlib.contextmanager
def _refusing_library_scalers():
    """While the learner's scaler runs, scikit-learn's scalers refuse to work: the exercise
    is to write them (subclassing, wrapping or calling them inside fit is caught too)."""
    from sklearn import preprocessing

    message = (f"the scaler calls scikit-learn's {{}} - {LIBRARY_SCALER}. The exercise is to write min-max "
               f"scaling and standardization with NumPy: compute the statistics in fit, apply them in transform.")

    def refuse(name):
        def refused(*args, **kwargs):
            raise CheckFailed(message.format(name), LIBRARY_SCALER)
        return refused

    saved = []
    for name in ("StandardScaler", "MinMaxScaler", "RobustScaler", "MaxAbsScaler"):
        cls = getattr(preprocessing, name)
        for method in ("fit", "partial_fit", "transform", "fit_transform", "inverse_transform"):
            if hasattr(cls, method):
                saved.append((cls, method, vars(cls).get(method)))
                setattr(cls, method, refuse(f"{name}.{method}"))
    for name in ("scale", "minmax_scale", "robust_scale", "maxabs_scale"):
        saved.append((preprocessing, name, getattr(preprocessing, name)))
        setattr(preprocessing, name, refuse(name))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _run_scaler(cls, case):
    """Fit on X_train, then transform test and train, invert, and fit_transform."""
    kw, X, X_test = case.data["kwargs"], case.data["X_train"], case.data["X_test"]
    with _refusing_library_scalers():
        scaler = cls(**kw)
        fitted = scaler.fit(X)
        return {
            "fit(X) returns the scaler itself": fitted is scaler,
            "transform(X_test)": scaler.transform(X_test),
            "transform(X_train)": scaler.transform(X),
            "inverse_transform(transform(X_test))": scaler.inverse_transform(scaler.transform(X_test)),
            "fit_transform(X_train) on a new scaler": cls(**kw).fit_transform(X),
        }


def _number(value):
    """A learner's scalar output as a float64 array of shape () (also from a 1-element
    array); anything larger keeps its shape, so that the comparison shows it."""
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(()) if value.size == 1 else value


def _run_gradient(fn, case):
    d = case.data
    dw, db = fn(d["X"], d["y"], d["w"], d["b"])
    return {"dw": np.asarray(dw), "db": _number(db)}


def _run_gd(fn, case):
    d = case.data
    w, b, losses = fn(d["X"], d["y"], d["lr"], d["n_steps"])
    return {"w": np.asarray(w), "b": _number(b), "losses": np.asarray(losses, dtype=np.float64)}


def _run_steps(fn, case):
    d = case.data
    return int(fn(d["X"], d["y"], d["lr"], d["tol"], d["max_steps"]))


def _run_condition(fn, case):
    return float(fn(case.data["X"]))


def check_min_max_scaler(MinMaxScaler, hidden=False):
    """Check a MinMaxScaler class (fit / transform / inverse_transform, feature_range)."""
    __tracebackhide__ = True
    recorded_check(check_min_max_scaler, "MinMaxScaler", MinMaxScaler, _run_scaler, hidden)


def check_standard_scaler(StandardScaler, hidden=False):
    """Check a StandardScaler class against scikit-learn's conventions (population std)."""
    __tracebackhide__ = True
    recorded_check(check_standard_scaler, "StandardScaler", StandardScaler, _run_scaler, hidden)


def check_mse_gradient(mse_gradient, hidden=False):
    """Check mse_gradient(X, y, w, b) -> (dw, db)."""
    __tracebackhide__ = True
    recorded_check(check_mse_gradient, "mse_gradient", mse_gradient, _run_gradient, hidden)


def check_gradient_descent(gradient_descent, hidden=False):
    """Check gradient_descent(X, y, lr, n_steps) -> (w, b, losses)."""
    __tracebackhide__ = True
    recorded_check(check_gradient_descent, "gradient_descent", gradient_descent, _run_gd, hidden)


def check_steps_to_tolerance(steps_to_tolerance, hidden=False):
    """Check steps_to_tolerance(X, y, lr, tol, max_steps) -> int."""
    __tracebackhide__ = True
    recorded_check(check_steps_to_tolerance, "steps_to_tolerance", steps_to_tolerance, _run_steps, hidden)


def check_hessian_condition_number(hessian_condition_number, hidden=False):
    """Check hessian_condition_number(X) -> float."""
    __tracebackhide__ = True
    recorded_check(check_hessian_condition_number, "hessian_condition_number", hessian_condition_number,
                   _run_condition, hidden)
