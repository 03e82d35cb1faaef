"""The learner package of the course *Batch Normalization, from feature scaling to its
limits*: what an exercise notebook needs, and no answer.

One module per chapter topic (``feature_scaling`` for Chapter 1, ...) holds that
chapter's visible checks - the code that runs the learner's function on a case,
compares its outputs with the recorded answers (``answers/<topic>.npz``) and names
the mistake it recognises - and the helpers the notebook provides. The reference
implementations, the catalogue of wrong implementations and the hidden cases stay
with the grader (``bn_reference``, which instructors install).
"""

__version__ = "0.2.0"
