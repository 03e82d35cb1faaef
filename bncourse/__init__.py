"""Instructor tooling for the course: grade a whole class safely and fast.

``bncourse grade SLUG SUBMISSIONS`` imports a folder or an LMS zip of
submissions, runs every notebook in a sandbox (:mod:`bncourse.sandbox`,
:mod:`bncourse.kernel`) while the checks run outside it (:mod:`bncourse.judge`),
records the grades in nbgrader's gradebook, and writes feedback, grade sheets
and a report of the class's misconceptions. Learners never import this package:
it is the instructor's room, apart from ``bn_reference`` and its checks.
"""
