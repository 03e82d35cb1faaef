"""The grading machinery shared by every chapter.

A *check* runs a learner's implementation and the reference on the same seeded
cases. When they disagree, it runs the chapter's *catalogue* of known wrong
implementations on that case; if one of them reproduces the learner's wrong
output (its fingerprint), the failure names that misconception and says how to
fix it. Otherwise the failure says where the outputs differ (which output,
shape, worst element, expected vs got).

Grade cells call a chapter's ``check_*`` functions; a correct answer prints
nothing, so nbgrader (which scores a cell with stderr output as 0) gives full
marks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["CheckFailed", "Case", "Misconception", "run_check", "report_pass", "outputs_match"]


class CheckFailed(AssertionError):
    """A learner's implementation disagrees with the reference.

    ``misconception`` is the name of the catalogue entry that reproduced the
    learner's output, or ``None`` when no entry did.
    """

    def __init__(self, message: str, misconception: str | None = None):
        super().__init__(message)
        self.misconception = misconception


@dataclass(frozen=True)
class Case:
    """One input on which learner and reference are compared.

    ``label`` is shown to the learner; ``data`` holds whatever the chapter's
    ``run`` function needs (arrays, hyper-parameters).
    """

    label: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Misconception:
    """A known wrong implementation, recognised by its output (its fingerprint).

    ``name`` says what is wrong, ``fix`` how to put it right; ``impl`` is the
    wrong implementation, called exactly like the learner's.
    """

    name: str
    fix: str
    impl: Any


def _leaves(x: Any, path: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts, tuples and lists of arrays into (path, leaf) pairs.

    A list of plain numbers (a loss history, say) is one leaf.
    """
    if isinstance(x, Mapping):
        return [leaf for k, v in x.items() for leaf in _leaves(v, f"{path}[{k!r}]" if path else str(k))]
    if isinstance(x, (tuple, list)) and not all(np.isscalar(v) for v in x):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{path}[{i}]" if path else f"output {i}")]
    return [(path or "output", x)]


def _as_array(x: Any) -> np.ndarray | None:
    """``x`` as a float64 array, or ``None`` when it is not numeric."""
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return a


def _leaf_difference(expected: Any, got: Any, rtol: float, atol: float) -> str | None:
    """``None`` when two leaves agree, else a sentence saying how they differ."""
    e, g = _as_array(expected), _as_array(got)
    if e is None:
        return None if expected == got else f"expected {expected!r}, got {got!r}"
    if g is None:
        return f"expected a number or array, got {type(got).__name__} {got!r:.80}"
    if e.shape != g.shape:
        return f"expected shape {e.shape}, got shape {g.shape}"
    with np.errstate(invalid="ignore"):
        ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    bad = np.argwhere(~ok)
    with np.errstate(invalid="ignore"):
        err = np.where(ok, 0.0, np.nan_to_num(np.abs(g - e), nan=np.inf))
    worst = np.unravel_index(int(np.argmax(err)), e.shape) if e.ndim else ()
    where = f" at index {tuple(int(i) for i in worst)}" if e.ndim else ""
    return (f"{len(bad)} of {e.size} values differ; worst{where}: "
            f"expected {e[worst]:.6g}, got {g[worst]:.6g}")


def _differences(expected: Any, got: Any, rtol: float, atol: float) -> dict[str, str]:
    """{output path: how it differs} for every leaf of ``got`` that differs from ``expected``."""
    e_leaves, g_leaves = _leaves(expected), _leaves(got)
    if len(e_leaves) != len(g_leaves):
        return {"output": f"expected {len(e_leaves)} outputs, got {len(g_leaves)}"}
    diffs = {}
    for (path, e), (_, g) in zip(e_leaves, g_leaves):
        diff = _leaf_difference(e, g, rtol, atol)
        if diff is not None:
            diffs[path] = diff
    return diffs


def outputs_match(expected: Any, got: Any, rtol: float = 1e-7, atol: float = 1e-9) -> str | None:
    """Compare two nested outputs leaf by leaf (NaN equals NaN).

    Returns ``None`` when they match, otherwise a message naming the first
    output that differs and how.
    """
    diffs = _differences(expected, got, rtol, atol)
    return next((f"{path}: {diff}" for path, diff in diffs.items()), None)


def _fingerprint(wrong: Any, got: Any, diffs: dict[str, str], rtol: float, atol: float) -> int:
    """How many of the learner's wrong outputs (``diffs``) a wrong implementation
    reproduces; 0 unless it reproduces the first one, the primary symptom."""
    mismatched = _differences(wrong, got, rtol, atol)
    if "output" in diffs:  # the learner's outputs have the wrong structure: only a full match counts
        return int(not mismatched)
    if "output" in mismatched or next(iter(diffs)) in mismatched:
        return 0
    return sum(path not in mismatched for path in diffs)


def _quietly(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` with warnings and floating-point warnings silenced, so
    that diagnosing a wrong answer never writes to stderr."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


def run_check(
    task: str,
    student: Any,
    reference: Any,
    cases: Iterable[Case],
    run: Callable[[Any, Case], Any],
    catalogue: Sequence[Misconception] = (),
    rtol: float = 1e-7,
    atol: float = 1e-9,
) -> int:
    """Compare ``run(student, case)`` with ``run(reference, case)`` on every case.

    Raises :class:`CheckFailed` at the first case where they differ. The
    failure names the ``catalogue`` entry that reproduces the learner's first
    wrong output (the primary symptom) and, among those, most of the others;
    with no such entry it says where the outputs differ. Returns the number of
    cases checked.
    """
    __tracebackhide__ = True  # IPython and pytest: show the learner the message, not our frames
    if student is reference:
        raise CheckFailed(f"{task} is the course's reference implementation, imported from bn_reference: "
                          f"write your own {task} in the notebook instead.")
    n = 0
    for case in cases:
        expected = _quietly(lambda: run(reference, case))
        try:
            got = run(student, case)
        except NotImplementedError as exc:
            raise CheckFailed(
                f"{task} is not implemented yet: replace `raise NotImplementedError()` "
                f"with your code, then run this cell again."
            ) from exc
        except CheckFailed:
            raise
        except Exception as exc:  # the learner's code crashed: say where and on what
            raise CheckFailed(
                f"{task} raised {type(exc).__name__}: {exc}\n"
                f"  on case: {case.label}\n"
                f"  (the traceback above points to the line in your code)"
            ) from exc
        rtol_case = case.data.get("rtol", rtol)
        atol_case = case.data.get("atol", atol)
        diffs = _quietly(lambda: _differences(expected, got, rtol_case, atol_case))
        if diffs:
            best, best_score = None, 0
            for m in catalogue:
                try:
                    wrong = _quietly(lambda: run(m.impl, case))
                except Exception:
                    continue
                score = _quietly(lambda: _fingerprint(wrong, got, diffs, rtol_case, atol_case))
                if score > best_score:
                    best, best_score = m, score
            if best is not None:
                raise CheckFailed(
                    f"{task} is wrong on case: {case.label}\n"
                    f"  Your output matches a known mistake: {best.name}.\n"
                    f"  How to fix it: {best.fix}",
                    misconception=best.name,
                )
            path, diff = next(iter(diffs.items()))
            raise CheckFailed(f"{task} is wrong on case: {case.label}\n  {path}: {diff}")
        n += 1
    return n


def report_pass(task: str, n: int) -> None:
    """The one line a passing check prints (to stdout: stderr would cost the marks)."""
    print(f"{task}: all {n} cases agree with the reference.")
