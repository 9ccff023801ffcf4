"""Suite-wide switches: hypothesis profiles and whether the RTL tests may skip.

Hypothesis profiles, chosen by the environment variable ``QS4D_HYPOTHESIS_PROFILE``:

* ``dev`` (default): fresh random examples on every run, each test's own ``max_examples``;
* ``ci`` (``.ci/run``): the same examples on every run (``derandomize=True``, no example
  database), so a CI failure reproduces locally with ``QS4D_HYPOTHESIS_PROFILE=ci``;
* ``thorough``: random examples, every test's ``max_examples`` times ``THOROUGH_FACTOR``
  (for a search before a release: ``QS4D_HYPOTHESIS_PROFILE=thorough pytest``; slow).

Tests keep their small ``@settings(max_examples=...)``: the profile fills the settings a test
does not give (loaded here, before any test module is imported), and ``thorough`` scales the
count at collection.

``QS4D_REQUIRE_RTL=1`` (``.ci/run`` sets it): a skipped test of ``tests/test_rtl.py`` (no
``iverilog`` or no cocotb) fails instead, so CI cannot pass without simulating the RTL.
"""
import os

import pytest
from hypothesis import settings

PROFILE_ENV = "QS4D_HYPOTHESIS_PROFILE"
REQUIRE_RTL = os.environ.get("QS4D_REQUIRE_RTL") == "1"
RTL_TESTS = "test_rtl.py"
THOROUGH_FACTOR = 10

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("thorough", deadline=None)

PROFILE = os.environ.get(PROFILE_ENV, "dev")
if PROFILE not in ("dev", "ci", "thorough"):
    raise pytest.UsageError(f"{PROFILE_ENV}={PROFILE!r}: expected dev, ci or thorough")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(items):
    if PROFILE != "thorough":
        return
    scaled = set()  # parametrized items share one function: scale it once
    for item in items:
        test = getattr(item, "obj", None)
        # where @given keeps the test's settings (read on every call; hypothesis 6)
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if own is not None and id(test) not in scaled:
            scaled.add(id(test))
            test._hypothesis_internal_use_settings = settings(own, max_examples=own.max_examples * THOROUGH_FACTOR)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_RTL and report.skipped and item.path.name == RTL_TESTS:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"QS4D_REQUIRE_RTL=1, but this RTL test would be skipped: {reason}"
