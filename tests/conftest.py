"""Test-wide settings: the hidden cases' secret.

The grader draws hidden cases from the course's grading secret (kept in the
gradebook by ``bncourse``). Tests that call checks with ``hidden=True`` directly
use this fixed secret, so that they reproduce; ``test_grading_core`` shows that
another secret draws other hidden cases.
"""

import os

import pytest

os.environ.setdefault("BN_GRADING_SECRET", "the test suite's grading secret")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (``make test`` runs ``-n auto --dist loadgroup``): the tests that
    share a module- or class-scoped fixture (a class graded once, a fresh environment, a
    browser) go to one worker, so the fixture is built once; every other test goes to
    whichever worker is free."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        scopes = {d.scope for defs in (info.name2fixturedefs.values() if info else ()) for d in defs}
        if "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
        elif "class" in scopes:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{item.cls.__name__}"))
