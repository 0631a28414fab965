"""Shared fixtures: the synthetic dataset and the tiny test configuration.

Tests that need the real MNIST/Fashion-MNIST, a package registry or the FID
Inception weights are marked `@pytest.mark.data` (markers: setup.cfg);
`pytest -m "not data"` runs the rest with no network and an empty cache.
"""

import contextlib
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
  sys.path.insert(0, TESTS)

# Faster CPU compiles, in this process and the subprocesses the tests start
# (they inherit the environment), before JAX starts its backend.
import fast_compile  # pylint: disable=g-import-not-at-top,wrong-import-position

fast_compile.apply()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from cign_jax import utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from cign_jax.configs import quick  # pylint: disable=g-import-not-at-top,wrong-import-position

# One persistent compilation cache for every test (and, through
# $JAX_COMPILATION_CACHE_DIR, their subprocesses and the pytest-xdist
# workers): a program compiled by one test is loaded, not compiled, by the
# next that builds the same one.
os.environ["JAX_COMPILATION_CACHE_DIR"] = utils.enable_compilation_cache()

# The script that trains on the synthetic dataset in a subprocess.
SYNTHETIC_MAIN = os.path.join(TESTS, "synthetic.py")
ROOT = os.path.dirname(TESTS)


def start_synthetic_training(workdir, overrides):
  """The tiny config's training on the synthetic dataset, in a subprocess
  (`tests/synthetic.py`) with `--config.KEY=VALUE` for each override; its
  stderr is piped, for the test to read when it ends."""
  import subprocess  # pylint: disable=g-import-not-at-top

  return subprocess.Popen(
      [
          sys.executable,
          SYNTHETIC_MAIN,
          f"--config={ROOT}/configs/quick.py:tiny",
          f"--workdir={workdir}",
      ]
      + [f"--config.{k}={v}" for k, v in overrides.items()],
      env=dict(os.environ, PYTHONPATH=ROOT),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )


def flip_bytes(step_dir):
  """Flips 16 bytes in the middle of the largest file of a checkpoint step
  (a tensor's data)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  target = max(files, key=os.path.getsize)
  with open(target, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, min(mid + 16, len(data))):
      data[i] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def tiny_config(**overrides):
  """The tests' configuration, `configs/quick.py:tiny`, with overrides by
  dotted name (`tiny_config(**{"model.latent_dim": 3}, num_train_steps=2)`).
  Tests that keep to it share its compiled train step (the persistent
  compilation cache above)."""
  config = quick.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture
def inception_stand_in(monkeypatch, tmp_path):
  """An empty cache (classifiers, features) and `synthetic.PooledFeatures`
  as the FID Inception (`fid.extract_features`): evaluation without the
  Inception's weights or its CPU time."""
  from cign_jax.evaluation import fid  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("CIGN_JAX_CACHE", str(tmp_path / "cache"))
  extractor = synthetic.PooledFeatures()
  monkeypatch.setattr(fid, "extract_features", extractor)
  return extractor


@pytest.fixture(scope="session")
def synthetic_dataset():
  """(images uint8 (64, 28, 28, 1), labels int32 (64,)): `tests/synthetic.py`."""
  return synthetic.dataset()


@contextlib.contextmanager
def step_programs_put_back(clear: bool):
  """The train steps this process keeps (`step_programs.get`) are the same
  after the block as before it (those built in it are dropped); with
  `clear`, none is kept during the block."""
  from cign_jax import step_programs  # pylint: disable=g-import-not-at-top

  kept = dict(step_programs._PROGRAMS)  # pylint: disable=protected-access
  if clear:
    step_programs.forget()
  try:
    yield
  finally:
    step_programs.forget()
    step_programs._PROGRAMS.update(kept)  # pylint: disable=protected-access


@pytest.fixture(autouse=True)
def _fresh_step_programs(request):
  """A test that monkeypatches the library neither gets nor leaves a train
  step built from other code than its own: `step_programs.get` keeps a
  process's compiled steps by config, not by the code that built them. The
  steps kept before the test are put back after it (they were built from
  the unpatched code), so the next test does not build them again."""
  if "monkeypatch" not in request.fixturenames:
    yield
    return
  with step_programs_put_back(clear=True):
    yield
