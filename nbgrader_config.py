"""nbgrader configuration: this repository is the course directory.

solutions/<slug>/<slug>.ipynb is the instructor source, exercises/<slug>/ the
released student version (committed). See book/instructors.md.
"""

import os

from bn_reference.grading.feedback import HideHiddenTests
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
from nbgrader.preprocessors import GetGrades

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

c.CourseDirectory.root = os.path.dirname(os.path.abspath(__file__))
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"
c.CourseDirectory.course_id = "batchnorm"

# Feedback shows neither the hidden tests' code nor their tracebacks.
c.GenerateFeedback.preprocessors = [GetGrades, HideHiddenTests, CSSHTMLHeaderPreprocessor]

# Per-cell time limit for autograding (seconds).
c.ExecutePreprocessor.timeout = 300
