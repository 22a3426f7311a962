"""Shared fixtures and the Hypothesis profiles.

Profiles (pick one with the environment variable ``HYPOTHESIS_PROFILE``; ``ci`` when unset):
- ``ci``: derandomized (the same examples on every run and machine), 1000 examples per
  property. A test's own ``@settings(max_examples=...)`` still wins for that test.
- ``long``: 10000 fresh random examples per property, for a soak run on demand:
  ``HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py``. A failure prints the
  seed and a ``@reproduce_failure`` blob to replay it.
Neither writes an example database into the checkout.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# tiny tensors still take ~1 ms an example, and some draws (a [T, E] grid) are large
_QUIET = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
              database=None)
settings.register_profile("ci", max_examples=1000, derandomize=True, **_QUIET)
settings.register_profile("long", max_examples=10_000, print_blob=True, **_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine idle-waiting threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
