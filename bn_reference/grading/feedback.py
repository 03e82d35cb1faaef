"""An nbgrader preprocessor for ``generate_feedback``: hide the hidden tests.

nbgrader 0.9.6 puts the full autograded notebook, hidden test code included,
into the feedback HTML. ``HideHiddenTests`` removes the hidden-test regions
from each grade cell and shortens that cell's error output to the exception's
own message (a check's message names the mistake; the traceback would show
the hidden call).
"""

from nbgrader.preprocessors import ClearHiddenTests


class HideHiddenTests(ClearHiddenTests):
    """ClearHiddenTests for feedback: also trims tracebacks of the cells it changed."""

    def preprocess_cell(self, cell, resources, cell_index):
        had_hidden = self.begin_test_delimeter in cell.source
        cell, resources = super().preprocess_cell(cell, resources, cell_index)
        if had_hidden:
            for output in cell.get("outputs", []):
                if output.output_type == "error":
                    output.traceback = [f"{output.ename}: {output.evalue}"]
        return cell, resources
