"""nbgrader configuration: this repository is the course directory.

solutions/<slug>/<slug>.ipynb is the instructor source, exercises/<slug>/ the
released student version (committed). See book/instructors.md: `bncourse grade`
uses this file too, and replaces only how notebooks are run (in a sandbox).
"""

import os

from bncourse.autograde import NormalizeMetadata, RestoreCells
from bncourse.feedback import TEMPLATES, HideHiddenTests, PendingManualGrades
from bncourse.release import InstallLearnerPackage
from bncourse.secret import ProvideGradingSecret
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.converters import Autograde, GenerateAssignment
from nbgrader.preprocessors import CheckCellMetadata, ClearOutput, DeduplicateIds, GetGrades, OverwriteKernelspec

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.course_id = "batchnorm"

# The released notebooks install the learner package (no answers) from the site _config.yml names.
c.GenerateAssignment.preprocessors = [InstallLearnerPackage, *GenerateAssignment.class_traits()["preprocessors"].default()]
c.InstallLearnerPackage.book_config = os.path.join(c.CourseDirectory.root, "_config.yml")

# A submission's nbgrader metadata is checked against the gradebook first (a malformed or
# duplicated claim is a warning, not an unreadable notebook); deleted grade cells are put
# back (and graded); the checksum change that every
# released grade cell shows by design (its hidden tests were removed) is not a warning.
c.Autograde.sanitize_preprocessors = [NormalizeMetadata, ClearOutput, DeduplicateIds, OverwriteKernelspec,
                                      RestoreCells, CheckCellMetadata]

# The hidden tests draw their cases from the course's grading secret, kept in the gradebook.
c.Autograde.autograde_preprocessors = [ProvideGradingSecret,
                                       *Autograde.class_traits()["autograde_preprocessors"].default()]

# Feedback shows neither the hidden tests' code nor their tracebacks, and written
# answers not yet graded by hand are "pending", not 0.
c.GenerateFeedback.preprocessors = [GetGrades, PendingManualGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]
c.HTMLExporter.extra_template_basedirs = TEMPLATES
c.HTMLExporter.template_name = "bn_feedback"
c.HTMLExporter.template_file = "pending.html.j2"

# Per-cell time limit for plain `nbgrader autograde` (seconds); `bncourse grade` has its own limits.
c.ExecutePreprocessor.timeout = 300
