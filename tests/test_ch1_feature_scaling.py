"""Chapter 1 - feature scaling: the reference against its oracles
(scikit-learn, PyTorch autograd and optimizers, numerical differentiation),
the graded experiment's margins, and the grading checks against the
misconception catalogue."""

import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
import scipy.optimize
import sklearn.linear_model
import sklearn.preprocessing
import torch
from sklearn.datasets import load_wine

import alt_ch1_feature_scaling as alt
import bn_exercises.feature_scaling as learner
from chapter_suite import CatalogueSuite, CycleSuite
from bn_reference import feature_scaling as ref
from bn_reference.grading import INPUT_CHANGED, REFERENCE_USED, Case, CheckFailed
from bn_reference.grading import feature_scaling as grading

SHAPES = [(50, 3), (2, 1), (7, 5), (300, 10)]


def _data(seed, shape, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n, d = shape
    X = rng.normal(size=shape) * rng.uniform(0.01, 100, size=d) + rng.uniform(-1e3, 1e3, size=d)
    return X.astype(dtype), (rng.normal(size=(4, d)) * 50).astype(dtype)


# --- scalers against scikit-learn ------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, kwargs", [
    ("StandardScaler", {}),
    ("MinMaxScaler", {}),
    ("MinMaxScaler", {"feature_range": (-2.0, 3.0)}),
])
def test_scalers_match_sklearn(name, kwargs, shape, dtype):
    X, X_test = _data(sum(shape), shape, dtype)
    ours, theirs = getattr(ref, name)(**kwargs), getattr(sklearn.preprocessing, name)(**kwargs)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(ours.fit_transform(X), theirs.fit_transform(X), **tol)
    np.testing.assert_allclose(ours.transform(X_test), theirs.transform(X_test), **tol)
    np.testing.assert_allclose(ours.inverse_transform(X_test), theirs.inverse_transform(X_test), **tol)
    assert ours.transform(X_test).dtype == theirs.transform(X_test).dtype


@pytest.mark.parametrize("name", ["StandardScaler", "MinMaxScaler"])
@pytest.mark.parametrize("value", [0.0, 2.5, 0.1, -1e6 / 3])
def test_constant_features_match_sklearn(name, value):
    """Constants that are not exactly representable (0.1) leave rounding error
    in the variance: the reference must still treat them as constant."""
    X, X_test = _data(3, (13, 3))
    X[:, 1] = value
    X_test[:, 1] = value + 1.0
    ours, theirs = getattr(ref, name)(), getattr(sklearn.preprocessing, name)()
    np.testing.assert_allclose(ours.fit_transform(X), theirs.fit_transform(X), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.transform(X_test), theirs.transform(X_test), rtol=1e-10, atol=1e-10)
    assert np.isfinite(ours.transform(X_test)).all()


@pytest.mark.parametrize("bad, message", [
    (np.ones(5), "2-D"),
    (np.array([[1.0, np.nan], [2.0, 3.0]]), "NaN"),
])
def test_scalers_reject_bad_input_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        ref.StandardScaler().fit(bad)


def test_scalers_say_what_to_do_when_misused():
    with pytest.raises(ValueError, match="call fit"):
        ref.MinMaxScaler().transform(np.ones((2, 2)))
    with pytest.raises(ValueError, match="fitted on 2"):
        ref.StandardScaler().fit(np.eye(2)).transform(np.ones((3, 3)))
    with pytest.raises(ValueError, match="min < max"):
        ref.MinMaxScaler(feature_range=(1.0, 0.0))


# --- regression helpers against PyTorch, scipy and scikit-learn -------------

def _problem(seed, n, d):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d)
    return X, X @ rng.normal(size=d) + 3.0 + rng.normal(size=n), rng.normal(size=d), float(rng.normal())


@pytest.mark.parametrize("n, d", [(2, 1), (20, 3), (100, 7)])
def test_mse_gradient_matches_autograd_and_finite_differences(n, d):
    X, y, w, b = _problem(n * d, n, d)
    dw, db = ref.mse_gradient(X, y, w, b)
    wt = torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    ((torch.tensor(X) @ wt + bt - torch.tensor(y)) ** 2).mean().backward()
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(db, bt.grad.item(), rtol=1e-12)
    theta = np.append(w, b)
    numeric = scipy.optimize.approx_fprime(theta, lambda t: ref.mse_loss(X, y, t[:-1], t[-1]), 1e-6)
    np.testing.assert_allclose(np.append(dw, db), numeric, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n, d, lr, steps", [(30, 2, 0.05, 40), (5, 4, 0.01, 7), (2, 1, 0.1, 3)])
def test_gradient_descent_matches_torch_sgd(n, d, lr, steps):
    X, y, *_ = _problem(7 + n, n, d)
    w, b, losses = ref.gradient_descent(X, y, lr, steps)
    wt = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    bt = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([wt, bt], lr=lr)
    torch_losses = []
    for _ in range(steps + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.tensor(X) @ wt + bt, torch.tensor(y))
        torch_losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses.shape == (steps + 1,)
    np.testing.assert_allclose(losses, torch_losses, rtol=1e-12)


def test_least_squares_loss_matches_sklearn():
    X, y, *_ = _problem(11, 40, 3)
    fit = sklearn.linear_model.LinearRegression().fit(X, y)
    np.testing.assert_allclose(ref.least_squares_loss(X, y), np.mean((fit.predict(X) - y) ** 2), rtol=1e-10)


def test_steps_to_tolerance_is_the_first_step_within_tolerance():
    X, y, *_ = _problem(12, 40, 2)
    X = ref.StandardScaler().fit_transform(X)
    _, _, losses = ref.gradient_descent(X, y, 0.1, 300)
    best = ref.least_squares_loss(X, y)
    k = ref.steps_to_tolerance(X, y, 0.1, 1e-6, 300)
    assert 0 < k < 300 and losses[k] - best <= 1e-6 < losses[k - 1] - best
    assert ref.steps_to_tolerance(X, y, 1e-6, 1e-6, 25) == 25


@pytest.mark.parametrize("n, d", [(2, 1), (30, 3), (100, 6)])
def test_hessian_matches_autograd_and_cond(n, d):
    X, y, w, b = _problem(n + d, n, d)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    H = torch.autograd.functional.hessian(lambda t: ((Xt @ t[:-1] + t[-1] - yt) ** 2).mean(),
                                          torch.tensor(np.append(w, b)))
    np.testing.assert_allclose(ref.hessian(X), H.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.hessian_condition_number(X), np.linalg.cond(H.numpy()), rtol=1e-8)


def test_wine_split_is_a_seeded_partition_of_the_wine_data():
    data = load_wine().data
    X_train, y_train, X_test, y_test = ref.wine_split(7, test_size=0.25)
    assert X_train.shape == (134, 12) and X_test.shape == (44, 12) and y_train.shape == (134,)
    rows = np.vstack([np.column_stack([y_train, X_train]), np.column_stack([y_test, X_test])])
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(data, axis=0))  # every wine once, alcohol first
    np.testing.assert_array_equal(ref.wine_split(7, test_size=0.25)[2], X_test)
    assert not np.array_equal(ref.wine_split(8, test_size=0.25)[2], X_test)


def _torch_steps(Z, y, lr, tol, max_steps):
    """Steps to tol by torch.optim.SGD on nn.Linear, against scikit-learn's least-squares optimum."""
    best = np.mean((sklearn.linear_model.LinearRegression().fit(Z, y).predict(Z) - y) ** 2)
    model = torch.nn.Linear(Z.shape[1], 1, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    Zt, yt = torch.tensor(Z), torch.tensor(y)
    for k in range(max_steps + 1):
        loss = torch.nn.functional.mse_loss(model(Zt)[:, 0], yt)
        if loss.item() - best <= tol:
            return k
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max_steps


def test_scaling_experiment_matches_scikit_learn_and_torch():
    """Every number of the reference experiment from the oracles: scikit-learn's scalers and
    least squares, autograd's Hessian, torch's SGD."""
    X_train, y_train, X_test, _ = ref.wine_split(3)
    tol, max_steps = 1e-2, 1500
    result = ref.scaling_experiment(X_train, y_train, X_test, tol, max_steps)
    versions = {"raw": X_train, "min-max": sklearn.preprocessing.MinMaxScaler().fit_transform(X_train),
                "standardized": sklearn.preprocessing.StandardScaler().fit_transform(X_train)}
    for name, Z in versions.items():
        Zt, yt = torch.tensor(Z), torch.tensor(y_train)
        H = torch.autograd.functional.hessian(lambda t: ((Zt @ t[:-1] + t[-1] - yt) ** 2).mean(),
                                              torch.zeros(Z.shape[1] + 1, dtype=torch.float64)).numpy()
        eig = np.linalg.eigvalsh(H)
        np.testing.assert_allclose(result["kappa"][name], eig[-1] / eig[0], rtol=1e-6)
        assert result["steps"][name] == _torch_steps(Z, y_train, 1 / eig[-1], tol, max_steps)
    for fit, data in zip(["fit on train", "fit on all"], [X_train, np.vstack([X_train, X_test])]):
        T = sklearn.preprocessing.MinMaxScaler().fit(data).transform(X_test)
        np.testing.assert_allclose(result["outside [0, 1]"][fit], np.clip(np.abs(T - 0.5) - 0.5, 0, None).max(),
                                   atol=1e-12)
    assert result["steps"]["raw"] == max_steps and result["steps"]["standardized"] < result["steps"]["min-max"]


#: The case settings of the experiment's check (test size, tol, max_steps), visible and hidden.
EXPERIMENT_SETTINGS = [(0.3, 1e-3, 5000), (0.2, 1e-4, 4000), (0.25, 3e-4, 5000)]


def _slack(result, max_steps) -> dict:
    """How far each claim of the check is from failing (a ratio to its threshold; > 1 holds)."""
    k, s, o = result["kappa"], result["steps"], result["outside [0, 1]"]
    return {"kappa raw / standardized over 10^5": k["raw"] / k["standardized"] / 1e5,
            "kappa raw / min-max over 10^4": k["raw"] / k["min-max"] / 1e4,
            "kappa min-max / standardized over 3": k["min-max"] / k["standardized"] / 3,
            "raw steps / max_steps (= 1: capped)": s["raw"] / max_steps,
            "max_steps / min-max steps": max_steps / s["min-max"],
            "steps min-max / standardized over 5": s["min-max"] / s["standardized"] / 5,
            "outside, fit on train, over 1e-4": o["fit on train"] / 1e-4}


@pytest.mark.parametrize("impl", ["reference", "second implementation"])
def test_the_experiments_margins_hold_on_many_splits(impl):
    """The claims the check asserts hold for two independent correct experiments on 5
    splits for each case setting; prints the smallest slack of each claim."""
    experiment = ref.scaling_experiment if impl == "reference" else alt.scaling_experiment
    smallest = {}
    for test_size, tol, max_steps in EXPERIMENT_SETTINGS:
        for seed in range(100, 105):
            X_train, y_train, X_test, _ = ref.wine_split(seed, test_size)
            result = experiment(X_train, y_train, X_test, tol, max_steps)
            claims = learner._run_experiment(lambda *args: result, Case("", {
                "X_train": X_train, "y_train": y_train, "X_test": X_test, "tol": tol, "max_steps": max_steps}))["claims"]
            assert set(claims.values()) == {"holds"}, (seed, test_size, claims)
            assert result["outside [0, 1]"]["fit on all"] <= 1e-12
            for claim, value in _slack(result, max_steps).items():
                smallest[claim] = min(smallest.get(claim, np.inf), value)
    print({claim: round(value, 2) for claim, value in smallest.items()})
    assert min(smallest.values()) >= 1


def test_a_step_size_at_the_stability_limit_gets_the_name_that_covers_it():
    """2 / lambda_max leaves the scaled problems short of tol exactly as a step size that was
    not re-derived does: the one entry names both causes."""
    def at_the_limit(X_train, y_train, X_test, tol, max_steps):
        result = alt.scaling_experiment(X_train, y_train, X_test, tol, max_steps)
        for name, Z in [("min-max", alt.MinMaxScaler().fit_transform(X_train)),
                        ("standardized", alt.StandardScaler().fit_transform(X_train))]:
            A = np.hstack([Z, np.ones((len(Z), 1))])
            lr = 2 / np.linalg.eigvalsh(2 * A.T @ A / len(Z))[-1]
            result["steps"][name] = alt.steps_to_tolerance(Z, y_train, lr, tol, max_steps)
        return result

    entry = next(m for m in grading.SCALING_EXPERIMENT_CATALOGUE if "stability limit" in m.name)
    for check in (grading.check_scaling_experiment, learner.check_scaling_experiment):
        with pytest.raises(CheckFailed) as failure:
            check(at_the_limit)
        assert failure.value.misconception == entry.name


def test_an_experiment_with_the_wrong_result_says_what_to_return():
    def no_outside(X_train, y_train, X_test, tol, max_steps):
        result = alt.scaling_experiment(X_train, y_train, X_test, tol, max_steps)
        del result["outside [0, 1]"]
        return result
    for check in (grading.check_scaling_experiment, learner.check_scaling_experiment):
        with pytest.raises(CheckFailed, match=r"must return a dict of numbers shaped .*'fit on train'") as failure:
            check(no_outside)
        assert failure.value.misconception == learner.EXPERIMENT_RESULT


def test_the_experiment_must_use_the_learners_own_scalers():
    def with_sklearn(X_train, y_train, X_test, tol, max_steps):
        Z = sklearn.preprocessing.StandardScaler().fit_transform(X_train)
        return alt.scaling_experiment(Z, y_train, X_test, tol, max_steps)
    with pytest.raises(CheckFailed) as failure:
        learner.check_scaling_experiment(with_sklearn)
    assert failure.value.misconception == learner.LIBRARY_SCALER and "in the experiment" in str(failure.value)


def test_the_model_answer_quotes_the_numbers_the_notebook_prints():
    """The written question's model answer quotes the experiment on wine_split(seed=0)."""
    nb = nbformat.read(Path(__file__).resolve().parents[1] / "solutions" / "ch1_feature_scaling" /
                       "ch1_feature_scaling.ipynb", as_version=4)
    answer = next(c.source for c in nb.cells if c.metadata["nbgrader"]["grade_id"] == "written_experiment")
    run = next(c.source for c in nb.cells if c.metadata["nbgrader"]["grade_id"] == "run_experiment")
    assert "wine_split(seed=0)" in run and "tol, max_steps = 1e-3, 5000" in run
    X_train, y_train, X_test, _ = ref.wine_split(0)
    r = ref.scaling_experiment(X_train, y_train, X_test, 1e-3, 5000)
    M = ref.MinMaxScaler().fit_transform(X_train)
    mantissa, exponent = f"{r['kappa']['raw']:.4g}".split("e+")
    quoted = [f"{mantissa} \\times 10^{int(exponent)}", f"{r['kappa']['standardized']:.4g}",
              f"takes {r['steps']['standardized']} steps", f"{r['kappa']['min-max']:.4g}",
              f"{r['steps']['min-max']} steps", f"{r['kappa']['min-max'] / r['kappa']['standardized']:.0f} times",
              f"{r['steps']['min-max'] / r['steps']['standardized']:.0f} times its",
              f"between {M.mean(0).min():.2f} and {M.mean(0).max():.2f}",
              f"{M.std(0).min():.2f} to {M.std(0).max():.2f}",
              f"{r['outside [0, 1]']['fit on train']:.3f} outside", f"({r['outside [0, 1]']['fit on all']:.3f})"]
    assert r["steps"]["raw"] == 5000 and "does not get within tol in\n5000 steps" in answer
    missing = [q for q in quoted if q not in answer]
    assert not missing, missing


def test_scaling_lowers_the_condition_number():
    X, *_ = _problem(5, 200, 4)
    assert ref.hessian_condition_number(ref.StandardScaler().fit_transform(X)) < ref.hessian_condition_number(X) / 10


# --- grading: every check fails each catalogue entry with its own name -------

class TestGrading(CatalogueSuite):
    checks = {
        "MinMaxScaler": grading.check_min_max_scaler,
        "StandardScaler": grading.check_standard_scaler,
        "mse_gradient": grading.check_mse_gradient,
        "gradient_descent": grading.check_gradient_descent,
        "steps_to_tolerance": grading.check_steps_to_tolerance,
        "hessian_condition_number": grading.check_hessian_condition_number,
        "scaling_experiment": grading.check_scaling_experiment,
    }
    catalogue = grading.CATALOGUE
    alt = alt
    reference = ref
    learner = learner


class _WrappedSklearn:
    """Hands the work to scikit-learn's StandardScaler, created inside fit."""

    def fit(self, X):
        self.inner = sklearn.preprocessing.StandardScaler().fit(X)
        return self

    def transform(self, X):
        return self.inner.transform(X)

    def fit_transform(self, X):
        return self.fit(X).transform(X)

    def inverse_transform(self, X):
        return self.inner.inverse_transform(X)


class _SubclassedSklearn(sklearn.preprocessing.MinMaxScaler):
    pass


@pytest.mark.parametrize("side", ["grader", "learner"])
@pytest.mark.parametrize("name, impl", [("StandardScaler", sklearn.preprocessing.StandardScaler),
                                        ("MinMaxScaler", sklearn.preprocessing.MinMaxScaler),
                                        ("StandardScaler", _WrappedSklearn),
                                        ("MinMaxScaler", _SubclassedSklearn)])
def test_scikit_learns_scalers_are_refused(side, name, impl):
    """Handing in scikit-learn's scaler - as is, subclassed or wrapped - is named, and
    scikit-learn works again afterwards."""
    check = getattr(grading if side == "grader" else learner, TestGrading.checks[name].__name__)
    with pytest.raises(CheckFailed) as failure:
        check(impl)
    assert failure.value.misconception == learner.LIBRARY_SCALER
    assert "with NumPy" in str(failure.value)
    X = np.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(sklearn.preprocessing.StandardScaler().fit_transform(X).std(axis=0), 1.0)


def test_unknown_bug_reports_every_output_that_differs():
    def off_by_a_bit(X, y, w, b):
        dw, db = alt.mse_gradient(X, y, w, b)
        return dw * 1.01, db * 1.01
    with pytest.raises(CheckFailed) as failure:
        grading.check_mse_gradient(off_by_a_bit)
    message = str(failure.value)
    assert re.search(r"dw: \d+ of \d+ values differ; worst at index", message)
    assert re.search(r"db: expected \S+, got \S+ \(relative error 1.0e-02\)", message)
    assert failure.value.misconception is None


def test_stub_and_crash_get_clear_messages():
    def stub(X):
        raise NotImplementedError()
    with pytest.raises(CheckFailed, match="not implemented yet"):
        grading.check_hessian_condition_number(stub)
    with pytest.raises(CheckFailed, match="hessian_condition_number raised ZeroDivisionError") as failure:
        grading.check_hessian_condition_number(lambda X: 1 / 0)
    assert "lambda X: 1 / 0" in str(failure.value)  # the learner's own line


def test_a_wrapped_reference_is_refused():
    with pytest.raises(CheckFailed) as failure:
        grading.check_mse_gradient(lambda X, y, w, b: ref.mse_gradient(X, y, w, b))
    assert failure.value.misconception == REFERENCE_USED


def test_changing_the_input_in_place_is_named():
    def right_but_clears_x(X):
        kappa = alt.hessian_condition_number(X)
        X[:] = 0.0
        return kappa
    with pytest.raises(CheckFailed, match="changed its input X in place") as failure:
        grading.check_hessian_condition_number(right_but_clears_x)
    assert failure.value.misconception == INPUT_CHANGED


def test_hidden_cases_keep_their_labels_hidden():
    with pytest.raises(CheckFailed) as failure:
        grading.check_standard_scaler(grading.STANDARD_SCALER_CATALOGUE[0].impl, hidden=True)
    assert "hidden case 1 of" in str(failure.value) and "float64" not in str(failure.value)


# --- the nbgrader cycle -------------------------------------------------------

class TestNbgraderCycle(CycleSuite):
    slug = "ch1_feature_scaling"
    full_score = 12
    stubs = 7
    buggy = {  # student -> patches of the model answers, and the misconception the grader must name
        "ddof": ([("std = X.std(axis=0)", "std = X.std(axis=0, ddof=1)")],
                 "sample standard deviation (ddof=1) instead of the population one"),
        "no_range": ([("return a + (b - a) * (np.asarray(X, dtype=float) - self.data_min_) / self.data_range_",
                       "return (np.asarray(X, dtype=float) - self.data_min_) / self.data_range_")],
                     "transform ignores feature_range (inverse_transform uses it)"),
        "no_two": ([("return 2 / n * X.T @ r, 2 / n * r.sum()", "return 1 / n * X.T @ r, 1 / n * r.sum()")],
                   "the factor 2 is missing"),
        "test_refit": ([("T = MinMaxScaler().fit(data).transform(X_test)",
                         "T = MinMaxScaler().fit_transform(X_test) if fit == 'fit on train' "
                         "else MinMaxScaler().fit(data).transform(X_test)")],
                       "the test set is scaled with statistics of its own (fit_transform on X_test)"),
    }
