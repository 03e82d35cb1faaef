"""The grading core, chapter-independent: what every check does for free, each
promise attacked - the course's reference wrapped, subclassed, copied or run in
a thread; inputs changed in place; warnings and stderr; hidden cases; several
wrong outputs at once; a crash; the instrumentation switched off."""

import inspect
import re
import sys
import threading
import warnings

import numpy as np
import pytest

from bn_reference import backprop as ref
from bn_reference import feature_scaling as fs_ref
from bn_exercises.checking import _pair
from bn_reference.grading import (INPUT_CHANGED, INSTRUMENTATION_OFF, NOT_IMPLEMENTED, REFERENCE_USED, Case,
                                  CheckFailed, Misconception, run_check)
from bn_reference.grading import backprop as grading
from bn_reference.grading import feature_scaling as fs_grading
from bn_exercises.execution import Forbidden, call_student, fingerprint


def _forward(x, gamma, beta, eps=1e-5):
    """A correct forward pass written here, independently of the reference."""
    mu = x.mean(axis=0)
    xc = x - mu
    var = (xc * xc).mean(axis=0)
    inv_std = 1 / np.sqrt(var + eps)
    x_hat = xc * inv_std
    return gamma * x_hat + beta, {"x_centered": xc, "x_hat": x_hat, "mu": mu, "var": var, "inv_std": inv_std,
                                  "gamma": gamma, "eps": eps}


def _run(fn, case):
    return {"out": fn(case.data["x"], case.data["gamma"], case.data["beta"])[0]}


def _cases(n=3):
    rng = np.random.default_rng(5)
    return [Case(f"visible case {i}: x of shape (6, 3)", {"x": rng.normal(size=(6, 3)) * 2 + 1,
                                                          "gamma": rng.normal(size=3), "beta": rng.normal(size=3)})
            for i in range(n)]


def _check(fn, hidden=False, catalogue=()):
    return run_check("forward", fn, ref.batchnorm_forward, _cases(), _run, catalogue, hidden=hidden)


def test_an_independent_correct_implementation_passes(capsys):
    assert _check(_forward) == 3
    assert capsys.readouterr().err == ""


# --- the reference is not a way to pass ---------------------------------------------

def test_the_reference_itself_is_refused():
    with pytest.raises(CheckFailed, match="write your own forward") as failure:
        _check(ref.batchnorm_forward)
    assert failure.value.misconception == REFERENCE_USED


def test_a_wrapper_around_the_reference_is_refused():
    with pytest.raises(CheckFailed, match=r"runs the course's own code \(bn_reference.backprop.batchnorm_forward\)") \
            as failure:
        _check(lambda x, gamma, beta, eps=1e-5: ref.batchnorm_forward(x, gamma, beta, eps))
    assert failure.value.misconception == REFERENCE_USED


def test_the_reference_run_in_a_thread_is_refused():
    def threaded(x, gamma, beta, eps=1e-5):
        box = []
        worker = threading.Thread(target=lambda: box.append(ref.batchnorm_forward(x, gamma, beta, eps)))
        worker.start()
        worker.join()
        return box[0]

    with pytest.raises(CheckFailed) as failure:
        _check(threaded)
    assert failure.value.misconception == REFERENCE_USED


def test_an_exec_copy_of_the_reference_source_is_refused():
    namespace = dict(vars(ref))
    exec(compile(inspect.getsource(ref.batchnorm_forward), "<copied>", "exec"), namespace)
    with pytest.raises(CheckFailed) as failure:
        _check(namespace["batchnorm_forward"])
    assert failure.value.misconception == REFERENCE_USED


def test_a_pasted_copy_with_renamed_variables_is_refused():
    source = re.sub(r'(?<!")\b(x_centered|inv_std)\b(?!")', lambda m: m[1][:2] + "_renamed",
                    inspect.getsource(ref.batchnorm_forward))
    assert "x__renamed" in source
    namespace = dict(vars(ref))
    exec(compile(source, "<pasted>", "exec"), namespace)
    with pytest.raises(CheckFailed) as failure:
        _check(namespace["batchnorm_forward"])
    assert failure.value.misconception == REFERENCE_USED


def test_a_subclass_of_the_reference_class_is_refused():
    class Scaler(fs_ref.StandardScaler):
        pass

    with pytest.raises(CheckFailed) as failure:
        fs_grading.check_standard_scaler(Scaler)
    assert failure.value.misconception == REFERENCE_USED


def test_a_catalogue_implementation_is_course_code_too():
    wrong = grading.CATALOGUE["batchnorm_forward"][0]
    assert Forbidden.of(wrong.impl).codes  # its code is forbidden to learners like the reference's


def test_fingerprints_ignore_names_and_docstrings_but_not_what_is_computed():
    def one(a, b):
        """first"""
        total = a * b + np.sqrt(a) - np.log(b) * 3.0
        scale = total / (np.abs(a) + 1.0) + np.exp(-b)
        return np.tanh(scale) * np.cos(total) + np.sin(scale) / 2.0, total - scale * 0.5, total * scale

    def two(p, q):
        """second, renamed"""
        t = p * q + np.sqrt(p) - np.log(q) * 3.0
        s = t / (np.abs(p) + 1.0) + np.exp(-q)
        return np.tanh(s) * np.cos(t) + np.sin(s) / 2.0, t - s * 0.5, t * s

    def three(p, q):
        t = p * q + np.sqrt(p) - np.log(q) * 4.0  # one constant differs
        s = t / (np.abs(p) + 1.0) + np.exp(-q)
        return np.tanh(s) * np.cos(t) + np.sin(s) / 2.0, t - s * 0.5, t * s

    assert fingerprint(one.__code__) is not None
    assert fingerprint(one.__code__) == fingerprint(two.__code__) != fingerprint(three.__code__)
    assert fingerprint((lambda a: a + 1).__code__) is None  # too small to tell a copy from a coincidence


# --- what the learner's code does to its inputs and to stderr ----------------------------

def test_an_input_changed_in_place_is_named():
    def in_place(x, gamma, beta, eps=1e-5):
        x -= x.mean(axis=0)
        return _forward(x, gamma, beta, eps)

    with pytest.raises(CheckFailed, match=r"changed its input x in place") as failure:
        _check(in_place)
    assert failure.value.misconception == INPUT_CHANGED


def test_a_declared_mutable_input_may_change():
    case = Case("a buffer the function fills", {"out": np.zeros(3)}, mutable=("out",))
    outcome = call_student(lambda fn, c: fn(c.data["out"]), lambda out: out.fill(1.0), case)
    assert outcome.mutated == [] and outcome.error is None


@pytest.mark.parametrize("noise", ["warn", "numpy", "stderr"])
def test_warnings_and_stderr_cost_nothing_and_become_a_note(noise, capsys):
    def noisy(x, gamma, beta, eps=1e-5):
        if noise == "warn":
            warnings.warn("my own warning")
        elif noise == "numpy":
            np.log(np.zeros(1))
        else:
            print("debug output", file=sys.stderr)
        return _forward(x, gamma, beta, eps)

    _check(noisy)
    out, err = capsys.readouterr()
    assert err == ""
    assert "Note: while forward was being checked" in out
    assert {"warn": "my own warning", "numpy": "divide by zero", "stderr": "debug output"}[noise] in out


def test_the_instrumentation_switched_off_is_named():
    def sneaky(x, gamma, beta, eps=1e-5):
        sys.setprofile(None)
        return ref.batchnorm_forward(x, gamma, beta, eps)

    with pytest.raises(CheckFailed) as failure:
        _check(sneaky)
    assert failure.value.misconception in (INSTRUMENTATION_OFF, REFERENCE_USED)
    assert sys.getprofile() is None


# --- what a failure says ------------------------------------------------------------

def test_hidden_cases_get_generic_labels():
    with pytest.raises(CheckFailed) as failure:
        _check(lambda x, gamma, beta, eps=1e-5: (x, {}), hidden=True)
    message = str(failure.value)
    assert "hidden case 1 of 3" in message and "shape (6, 3)" not in message


def _plus_one(x, gamma, beta, eps=1e-5):
    out, cache = _forward(x, gamma, beta, eps)
    return out + 1, cache


def _three_outputs(fn, case):
    out = fn(case.data["x"], case.data["gamma"], case.data["beta"])[0]
    return {"out": out, "doubled": out * 2, "column sums": out.sum(axis=0)}


def test_every_wrong_output_is_listed_and_the_first_named():
    wrong = lambda x, gamma, beta, eps=1e-5: _plus_one(x, gamma, beta, eps)  # noqa: E731 - the learner's
    with pytest.raises(CheckFailed) as failure:
        run_check("forward", wrong, ref.batchnorm_forward, _cases(), _three_outputs)
    message = str(failure.value)
    assert all(f"- {name}:" in message for name in ("out", "doubled", "column sums")), message
    assert failure.value.misconception is None
    catalogue = [Misconception("off by one", "subtract one", _plus_one)]
    with pytest.raises(CheckFailed) as failure:
        run_check("forward", wrong, ref.batchnorm_forward, _cases(), _three_outputs, catalogue)
    assert failure.value.misconception == "off by one" and "How to fix it: subtract one" in str(failure.value)
    assert "- column sums:" in str(failure.value)


def test_differences_show_the_digits_that_differ():
    assert _pair(-3.48442, -3.484421) == "expected -3.48442, got -3.484421 (relative error 2.9e-07)"
    assert _pair(1.0, 1.0000000000001) == "expected 1, got 1.0000000000001 (relative error 1.0e-13)"


def test_a_crash_names_the_function_and_shows_only_the_learners_frames():
    def crashing(x, gamma, beta, eps=1e-5):
        return np.linalg.inv(np.zeros((2, 3))), {}

    with pytest.raises(CheckFailed) as failure:
        _check(crashing)
    message = str(failure.value)
    assert message.startswith("forward raised LinAlgError")
    assert "in crashing" in message and "bn_reference" not in message


def test_a_stub_says_the_function_is_not_implemented():
    def stub(x, gamma, beta, eps=1e-5):
        raise NotImplementedError()

    with pytest.raises(CheckFailed, match="forward is not implemented yet: the function still raises") as failure:
        _check(stub)
    assert failure.value.misconception == NOT_IMPLEMENTED


def test_ipython_shows_the_learner_the_message_not_the_grading_frames():
    with pytest.raises(CheckFailed) as failure:
        _check(lambda x, gamma, beta, eps=1e-5: (x, {}))
    lines = failure.value._render_traceback_()  # what IPython prints instead of a traceback
    assert lines[0].startswith("CheckFailed: forward is wrong on case") and "bn_reference" not in "\n".join(lines)


_CALLS = []


def counting(fn, case):
    """A run function that counts its calls (a module-level list: a closure over it would
    make the function's digest change with every call)."""
    _CALLS.append(1)
    return _run(fn, case)


def test_course_outputs_are_remembered_only_for_identical_cases():
    """Grading a class computes the reference's outputs once per case, not once per student;
    a case whose data differ in one element, or cannot be digested, is computed again."""
    from bn_reference.grading import _course_output

    calls = _CALLS
    calls.clear()
    case = _cases(1)[0]
    first = _course_output(counting, ref.batchnorm_forward, case)
    again = _course_output(counting, ref.batchnorm_forward, Case(case.label, {k: v.copy() for k, v in case.data.items()}))
    assert len(calls) == 1 and again is first
    changed = {**case.data, "x": case.data["x"].copy()}
    changed["x"][0, 0] += 1e-12
    _course_output(counting, ref.batchnorm_forward, Case(case.label, changed))
    _course_output(counting, ref.batchnorm_forward, Case(case.label, {**case.data, "opaque": object()}))
    _course_output(counting, ref.batchnorm_forward, Case(case.label, {**case.data, "opaque": object()}))
    assert len(calls) == 4


# --- hidden cases come from the course's secret --------------------------------------

def test_hidden_cases_are_drawn_from_the_courses_secret(monkeypatch):
    """The same secret draws the same hidden cases (regrading is deterministic); another
    secret draws others; without one, hidden cases are refused with a clear message."""
    from bn_reference.grading import GradingSecretMissing, case_rng, hidden_seed, use_secret

    with use_secret("course A"):
        a = case_rng(True, 3).normal(size=4)
        assert np.array_equal(a, case_rng(True, 3).normal(size=4))
        assert hidden_seed(3) != hidden_seed(4)
    with use_secret("course B"):
        assert not np.array_equal(a, case_rng(True, 3).normal(size=4))
    assert np.array_equal(case_rng(False, 3).normal(size=4), np.random.default_rng(3).normal(size=4))
    monkeypatch.delenv("BN_GRADING_SECRET")
    with pytest.raises(GradingSecretMissing, match="grade with `bncourse`"):
        fs_grading.check_mse_gradient(None, hidden=True)


def test_an_exec_copy_claiming_a_library_file_name_is_refused():
    """Code is fingerprinted by what it is, not by the file name it claims: a copy exec'd
    under a name inside the Python installation is still found."""
    fake = f"{sys.prefix}/lib/python3.11/site-packages/numpy/core/_internal_helpers.py"
    namespace = dict(vars(ref))
    exec(compile(inspect.getsource(ref.batchnorm_forward), fake, "exec"), namespace)
    with pytest.raises(CheckFailed) as failure:
        _check(namespace["batchnorm_forward"])
    assert failure.value.misconception == REFERENCE_USED
