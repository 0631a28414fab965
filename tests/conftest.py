"""Shared fixtures: the synthetic dataset and the tiny test configuration.

Tests that need the real MNIST/Fashion-MNIST, a package registry or the FID
Inception weights are marked `@pytest.mark.data` (markers: setup.cfg);
`pytest -m "not data"` runs the rest with no network and an empty cache.
"""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
  sys.path.insert(0, TESTS)

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

# The script that trains on the synthetic dataset in a subprocess.
SYNTHETIC_MAIN = os.path.join(TESTS, "synthetic.py")


@pytest.fixture(scope="session")
def synthetic_dataset():
  """(images uint8 (64, 28, 28, 1), labels int32 (64,)): `tests/synthetic.py`."""
  return synthetic.dataset()
