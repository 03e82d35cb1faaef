"""Test-wide settings: the hidden cases' secret.

The grader draws hidden cases from the course's grading secret (kept in the
gradebook by ``bncourse``). Tests that call checks with ``hidden=True`` directly
use this fixed secret, so that they reproduce; ``test_grading_core`` shows that
another secret draws other hidden cases.
"""

import os

os.environ.setdefault("BN_GRADING_SECRET", "the test suite's grading secret")

