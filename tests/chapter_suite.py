"""The tests every chapter runs, written once.

A chapter's test file subclasses these with its own settings:

    class TestGrading(CatalogueSuite):   # the checks and their misconception catalogue
        checks = {...}; catalogue = grading.CATALOGUE; alt = alt_chN_slug; reference = ref
        learner = bn_exercises.<topic>       # the learner package's visible checks

    class TestNbgraderCycle(CycleSuite): # release, submit, autograde, feedback, export
        slug = "chN_slug"; buggy = {...}; full_score = 10; stubs = 6
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io

import nbformat
import pytest

from bn_reference.grading import REFERENCE_USED, CheckFailed, use_secret
from nbgrader_cycle import ROOT, run_cycle


#: A second grading secret: the hidden cases it draws must serve as well as the test suite's.
ANOTHER_SECRET = "another course's grading secret"


def _secret(hidden):
    """The grading secret to draw hidden cases from: the suite's, or ``hidden`` itself."""
    return use_secret(hidden) if isinstance(hidden, str) else contextlib.nullcontext()


def _verdict(check, impl) -> tuple:
    """(passed or the misconception named, the whole message) of ``check(impl)``."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            check(impl)
    except CheckFailed as failure:
        return failure.misconception, str(failure)
    return "passed", out.getvalue()


class CatalogueSuite:
    """Every catalogue entry fails its check with its own name (visible and hidden
    cases); a second, differently written correct implementation passes; the
    reference object itself is refused. The learner package's visible checks, which
    replay recorded answers, give every entry and the second implementation exactly
    the verdict and the message of the grader's live visible checks."""

    checks: dict       # task -> check function
    catalogue: dict    # task -> [Misconception, ...]
    alt: object        # module with the differently written correct implementation
    reference: object  # the bn_reference module of the chapter
    learner: object    # the bn_exercises module of the chapter
    min_entries = 2

    def pytest_generate_tests(self, metafunc):
        if "entry" in metafunc.fixturenames:
            entries = [(task, m) for task, c in self.catalogue.items() for m in c]
            metafunc.parametrize("task, entry", entries, ids=[f"{t}: {m.name}" for t, m in entries])
        elif "task" in metafunc.fixturenames:
            metafunc.parametrize("task", list(self.checks))
        if "hidden" in metafunc.fixturenames:
            # hidden cases come from each course's own random secret: they must work for any
            metafunc.parametrize("hidden", [False, True, ANOTHER_SECRET],
                                 ids=["visible", "hidden", "hidden, another secret"])

    def test_every_task_has_a_check_and_a_catalogue(self):
        assert set(self.checks) == set(self.catalogue)
        assert all(len(c) >= self.min_entries for c in self.catalogue.values())
        assert all(len({m.name for m in c}) == len(c) for c in self.catalogue.values())

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the wrong code's own nan warnings
    def test_check_names_each_misconception(self, task, entry, hidden):
        with pytest.raises(CheckFailed) as failure, _secret(hidden):
            self.checks[task](entry.impl, hidden=bool(hidden))
        assert failure.value.misconception == entry.name
        assert entry.name in str(failure.value) and entry.fix in str(failure.value)

    def test_a_differently_written_correct_implementation_passes(self, task, hidden, capsys):
        with _secret(hidden):
            self.checks[task](getattr(self.alt, task), hidden=bool(hidden))
        out, err = capsys.readouterr()
        assert err == "" and "agree" in out

    @pytest.mark.filterwarnings("ignore::RuntimeWarning")
    def test_the_learners_visible_check_names_each_entry_as_the_grader_does(self, task, entry):
        check = self.checks[task]
        assert _verdict(getattr(self.learner, check.__name__), entry.impl) == _verdict(check, entry.impl)

    def test_the_learners_visible_check_passes_the_second_implementation(self, task):
        check, impl = self.checks[task], getattr(self.alt, task)
        assert _verdict(getattr(self.learner, check.__name__), impl) == _verdict(check, impl)
        assert _verdict(check, impl)[0] == "passed"

    def test_the_reference_itself_is_refused(self, task):
        with pytest.raises(CheckFailed, match=f"write your own {task} in"):
            self.checks[task](getattr(self.reference, task))

    def test_the_reference_behind_a_wrapper_is_refused(self, task):
        fn = getattr(self.reference, task)
        with pytest.raises(CheckFailed) as failure:
            self.checks[task](lambda *args, **kwargs: fn(*args, **kwargs))
        assert failure.value.misconception == REFERENCE_USED


class CycleSuite:
    """The grading cycle on the chapter's exercise, with the sandboxed class grader:
    the committed release is what generate_assignment makes; the model answers score
    full marks, the untouched release 0, each buggy submission strictly in between
    with its misconception named in its feedback and counted in the class's
    misconception report; a corrupt notebook harms no one; feedback hides the
    hidden tests."""

    slug: str
    buggy: dict        # student -> ([(old, new), ...] patches of the model answers, misconception name)
    full_score: int    # autograded points of the notebook
    stubs: int         # the least number of `raise NotImplementedError()` stubs in the release

    @pytest.fixture(scope="class")
    @classmethod
    def cycle(cls, tmp_path_factory):
        return run_cycle(tmp_path_factory.mktemp(cls.slug), cls.slug,
                         {student: patches for student, (patches, _) in cls.buggy.items()})

    def test_committed_release_is_in_sync_with_solutions(self, cycle):
        committed = ROOT / "exercises" / self.slug / f"{self.slug}.ipynb"
        assert committed.read_text() == cycle.release.read_text(), \
            "exercises/ is out of date: run `make exercises` and commit the result"

    def test_release_hides_solutions_and_hidden_tests(self, cycle):
        text = cycle.release.read_text()
        assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text and "hidden=True" not in text
        assert text.count("raise NotImplementedError()") >= self.stubs

    def test_the_release_shares_no_code_with_the_reference(self, cycle):
        """Code the learner is given (helpers in the released notebook) must not look like a
        copy of the reference or of a catalogue entry: the grader would refuse every answer."""
        from bn_exercises.execution import Forbidden
        from bncourse.judge import source_fingerprints

        topic = self.slug.split("_", 1)[1]
        reference, grading = (importlib.import_module(f"bn_reference{m}.{topic}") for m in ("", ".grading"))
        course = [o for o in vars(reference).values()
                  if (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == reference.__name__]
        impls = [m.impl for entries in grading.CATALOGUE.values() for m in entries]
        forbidden = Forbidden.of(*course, *impls).fingerprints
        shared = source_fingerprints(nbformat.read(cycle.release, as_version=4)) & set(forbidden)
        assert not shared, [forbidden[fp] for fp in shared]

    def test_scores(self, cycle):
        print("scores:", {student: score for student, score in sorted(cycle.scores.items())})
        assert cycle.scores["solution"] == (self.full_score, self.full_score), cycle.log
        assert cycle.scores["blank"] == (0, self.full_score), cycle.log
        for student in self.buggy:
            assert 0 < cycle.scores[student][0] < self.full_score, (student, cycle.scores[student])

    def test_corrupt_submission_is_reported_and_harms_no_one(self, cycle):
        assert cycle.scores["corrupt"] is None or cycle.scores["corrupt"][0] == 0
        assert "NOT GRADED corrupt: the notebook is not valid JSON" in cycle.log
        assert cycle.exit_code == 1, cycle.log  # graded everyone else, and says someone was not
        graded = {row["student_id"] for row in cycle.grades_csv if row["status"] == "graded"}
        assert graded == {"solution", "blank", *self.buggy}

    def test_feedback_names_the_misconception_and_hides_hidden_tests(self, cycle):
        for student, (_, name) in self.buggy.items():
            assert name in cycle.feedback[student].replace("&#39;", "'"), student
        for student, html in cycle.feedback.items():
            assert "HIDDEN TESTS" not in html and "hidden=True" not in html, student
        solution = cycle.feedback["solution"]
        grade_cells = nbformat.read(cycle.release, as_version=4).cells
        checks = sum(1 for c in grade_cells if c.metadata.get("nbgrader", {}).get("grade") and c.cell_type == "code")
        assert "CheckFailed" not in solution and solution.count("cases agree") >= 2 * checks  # visible and hidden

    def test_written_answers_wait_for_a_grader_instead_of_scoring_zero(self, cycle):
        rows = {row["student_id"]: row for row in cycle.grades_csv}
        assert float(rows["solution"]["pending_manual_points"]) > 0 and rows["solution"]["pending_manual_cells"] != "0"
        assert float(rows["blank"]["pending_manual_points"] or 0) == 0  # no answer: nothing to wait for
        assert "pending manual grading" in cycle.feedback["solution"]
        canvas = (cycle.course / "reports" / self.slug / "grades_canvas.csv").read_text().splitlines()
        assert canvas[0].startswith("Student,ID,SIS User ID,SIS Login ID,Section,")
        assert any(line.startswith("blank,") and line.endswith(",0.0") for line in canvas)

    def test_the_report_counts_each_misconception(self, cycle):
        for student, (_, name) in self.buggy.items():
            named = {t["misconception"] for t in cycle.results[student]["tasks"]}
            assert name in named, (student, named)
        assert all(t["status"] == "passed" for t in cycle.results["solution"]["tasks"])
