"""Test-wide settings: the hidden cases' secret.

The grader draws hidden cases from the course's grading secret (kept in the
gradebook by ``bncourse``). Tests that call checks with ``hidden=True`` directly
use this fixed secret, so that they reproduce; ``test_grading_core`` shows that
another secret draws other hidden cases.
"""

import os

import torch

os.environ.setdefault("BN_GRADING_SECRET", "the test suite's grading secret")

#: One PyTorch thread per test process, as in the grader's sandbox: ``make test`` runs one
#: process per core, and PyTorch's own threads on top of them would fight over the cores
#: (small networks then train several times slower than on one thread).
torch.set_num_threads(1)


#: The slowest test modules, started first: with ``make test``'s one worker per core
#: (pytest-xdist, ``--dist loadscope``), the quick ones then fill in and the workers
#: finish together instead of one waiting for the last slow module.
SLOW_FIRST = ["test_ch2_covariate_shift", "test_class_grading", "test_learner_package", "test_cluster",
              "test_watch", "test_gradebook_postgres"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
