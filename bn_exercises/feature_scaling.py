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
    "check_scaling_experiment",
    "wine_split",
    "SCALINGS",
    "FITS",
]

#: The misconception of a scaler that hands the work to scikit-learn's.
LIBRARY_SCALER = "scikit-learn's scaler used instead of your own code"

#: The misconception of an experiment whose result is not the dict the task asks for.
EXPERIMENT_RESULT = "the experiment's result is not the dict of numbers the task asks for"

#: Case data that are functions (none in this chapter): see bn_exercises.codec.resolver.
CASE_HELPERS: dict = {}

#: The three versions of the training features the experiment compares (its result's keys).
SCALINGS = ("raw", "min-max", "standardized")
#: The two ways of fitting the min-max scaler whose effect on the test set the experiment shows.
FITS = ("fit on train", "fit on all")


def wine_split(seed: int, test_size: float = 0.3):
    """scikit-learn's wine data (178 wines, 13 chemical measurements, shipped inside the
    library: nothing is downloaded) as a regression: predict the alcohol content (% by
    volume, the first measurement) from the 12 others, whose units and sizes differ
    widely (proline in mg/l, around 750; hue around 1). The wines are split at random
    with ``seed``: ``round(test_size * 178)`` go to the test set.

    Returns ``X_train`` (n_train, 12), ``y_train`` (n_train,), ``X_test`` (n_test, 12),
    ``y_test`` (n_test,), all float64.
    """
    from sklearn.datasets import load_wine

    data = load_wine().data
    order = np.random.default_rng(seed).permutation(len(data))
    n_test = int(round(test_size * len(data)))
    test, train = order[:n_test], order[n_test:]
    X, y = data[:, 1:], data[:, 0]
    return X[train], y[train], X[test], y[test]


@contextlib.contextmanager
def _refusing_library_scalers():
    """While the learner's scaler runs, scikit-learn's scalers refuse to work: the exercise
    is to write them (subclassing, wrapping or calling them inside fit is caught too)."""
    from sklearn import preprocessing

    message = (f"your code calls scikit-learn's {{}} - {LIBRARY_SCALER}. The exercise is to write min-max "
               f"scaling and standardization with NumPy (compute the statistics in fit, apply them in transform) "
               f"and to use those scalers of yours in the experiment.")

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


def _numbers(result, key: str, names: tuple[str, ...]) -> dict[str, float]:
    """``result[key][name]`` for each name, as floats; a CheckFailed that says what is
    missing when the result does not have that shape."""
    shape = ("{" + ", ".join(f"{k!r}: {{{', '.join(repr(n) for n in ns)}}}" for k, ns in
             [("kappa", SCALINGS), ("steps", SCALINGS), ("outside [0, 1]", FITS)]) + "}")
    try:
        part = result[key]
        return {name: float(np.asarray(part[name], dtype=np.float64).reshape(())) for name in names}
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckFailed(f"scaling_experiment must return a dict of numbers shaped {shape}; reading "
                          f"result[{key!r}] failed ({type(exc).__name__}: {exc}). Keep the return line of the "
                          f"notebook's template.", EXPERIMENT_RESULT) from None


def _claims(kappa: dict, steps: dict, outside: dict, max_steps: int) -> dict[str, str]:
    """The chapter's phenomenon on one split, as statements with margins that every
    correct experiment meets on the course's cases (the tests prove it on many splits):
    each ``"holds"`` or ``"does not hold"`` (words, so that a failure reads as one)."""
    claims = {
        "standardizing lowers kappa(H) at least 10^5-fold": kappa["raw"] >= 1e5 * kappa["standardized"],
        "min-max scaling lowers kappa(H) at least 10^4-fold": kappa["raw"] >= 1e4 * kappa["min-max"],
        "kappa(H) after standardizing is at most a third of min-max's": 3 * kappa["standardized"] <= kappa["min-max"],
        "raw features: GD does not reach tol within max_steps": steps["raw"] >= max_steps,
        "min-max: GD reaches tol within max_steps": steps["min-max"] < max_steps,
        "standardized: GD needs at most a fifth of min-max's steps": 5 * steps["standardized"] <= steps["min-max"],
        "min-max fitted on the training split: a test value lies outside [0, 1] (by more than 1e-4)":
            outside["fit on train"] > 1e-4,
        "min-max fitted on all the data: no test value lies outside [0, 1] (by more than 1e-9)":
            outside["fit on all"] <= 1e-9,
    }
    return {claim: "holds" if bool(true) else "does not hold" for claim, true in claims.items()}


def _run_experiment(fn, case):
    """The learner's experiment on one split: its numbers, and the phenomenon they show."""
    d = case.data
    with _refusing_library_scalers():
        result = fn(d["X_train"], d["y_train"], d["X_test"], d["tol"], d["max_steps"])
    kappa, steps = _numbers(result, "kappa", SCALINGS), _numbers(result, "steps", SCALINGS)
    outside = _numbers(result, "outside [0, 1]", FITS)
    return {"kappa": kappa, "steps": steps, "outside [0, 1]": outside,
            "claims": _claims(kappa, steps, outside, d["max_steps"])}


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


def check_scaling_experiment(scaling_experiment, hidden=False):
    """Check scaling_experiment(X_train, y_train, X_test, tol, max_steps) -> dict: its numbers
    on wine splits, and that they show what scaling and leakage do."""
    __tracebackhide__ = True
    recorded_check(check_scaling_experiment, "scaling_experiment", scaling_experiment, _run_experiment, hidden)
