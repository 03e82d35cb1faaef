"""Reference implementations and grading checks for the course
*Batch Normalization, from feature scaling to its limits*.

One module per chapter topic holds the reference code (``feature_scaling`` for
Chapter 1, ...); ``bn_reference.grading`` holds the checks that the exercise
notebooks' grade cells call, each with its catalogue of known misconceptions.
"""

__version__ = "0.1.0"
