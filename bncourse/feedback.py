"""nbgrader preprocessors and template for ``generate_feedback``.

- :class:`HideHiddenTests`: nbgrader 0.9.6 puts the full autograded notebook,
  hidden test code included, into the feedback HTML. This removes the
  hidden-test regions of the grade cells and shortens their error output to the
  exception's own message (a check's message names the mistake; a traceback
  would show the hidden call). Only grade cells are touched: the marker text
  inside a learner's own cell is just text.
- :class:`PendingManualGrades`: a written answer that nobody has graded yet is
  shown as "pending manual grading", not as "Score: 0.0 / 3.0"; the template
  ``bn_feedback`` says so next to the cell and in the notebook's total.
"""

from pathlib import Path

import nbgrader
from nbgrader import utils
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor

#: Template folders for the HTML exporter: ours (``bn_feedback``), then nbgrader's (``feedback``, its base).
TEMPLATES = [str(Path(__file__).resolve().parent / "templates"),
             str(Path(nbgrader.__file__).resolve().parent / "server_extensions" / "formgrader" / "templates")]


class HideHiddenTests(ClearHiddenTests):
    """ClearHiddenTests for feedback, on grade cells only; also trims their tracebacks."""

    def preprocess_cell(self, cell, resources, cell_index):
        if not (utils.is_grade(cell) and not utils.is_solution(cell) and self.begin_test_delimeter in cell.source):
            return cell, resources
        cell, resources = super().preprocess_cell(cell, resources, cell_index)
        for output in cell.get("outputs", []):
            if output.output_type == "error":
                output.traceback = [f"{output.ename}: {output.evalue}"]
        return cell, resources


class PendingManualGrades(NbGraderPreprocessor):
    """Marks grade cells that wait for a grader (``metadata.nbgrader.pending``) and
    puts the points they hold back in ``resources['nbgrader']['pending_points']``."""

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        self.pending_points = 0.0
        with Gradebook(info["db_url"]) as gb:
            self.grade = lambda grade_id: gb.find_grade(grade_id, info["notebook"], info["assignment"],
                                                        info["student"])
            nb, resources = super().preprocess(nb, resources)
        resources["nbgrader"]["pending_points"] = self.pending_points
        return nb, resources

    def preprocess_cell(self, cell, resources, cell_index):
        if utils.is_grade(cell):
            try:
                grade = self.grade(cell.metadata.nbgrader["grade_id"])
            except MissingEntry:
                return cell, resources
            pending = grade.manual_score is None and grade.auto_score is None
            cell.metadata.nbgrader["pending"] = pending
            if pending:
                self.pending_points += float(grade.max_score)
        return cell, resources
