"""Data parallelism over several devices, checkpoints across device counts,
the batch/device check, mixed precision, and the multi-host entry point.

JAX fixes its device count when it starts, so the checks that need several
devices run in one subprocess with 4 simulated CPU devices
(`tests/multidevice_worker.py`, compiled steps shared between the checks);
each test below reports one of its checks. The checks of restoring a 4-device
checkpoint in a genuinely one-device process run here.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import sharding
from cign_jax import train_step as train_step_lib
from cign_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multidevice_worker.py")
CACHE = utils.enable_compilation_cache()


def _worker_env(**extra):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  # The worker sets its own device count; drop a parent's, if any.
  env["XLA_FLAGS"] = " ".join(
      f
      for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f
  )
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  """Runs every multi-device check once; (output dir, {check: result})."""
  out = str(tmp_path_factory.mktemp("multidevice"))
  proc = subprocess.run(
      [sys.executable, WORKER, out],
      env=_worker_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=1200,
  )
  path = os.path.join(out, "results.json")
  results = {}
  if os.path.isfile(path):
    with open(path) as f:
      results = json.load(f)
  if proc.returncode != 0:
    pytest.fail(
        f"the multi-device worker failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
  return out, results


def _expect(worker, name):
  _, results = worker
  assert name in results, f"the worker did not run {name}"
  result = results[name]
  assert result["ok"], result["detail"]
  print(f"{name}: {result['detail']}")


def test_dropout_masks_sharding_invariant(worker):
  _expect(worker, "dropout_masks_sharding_invariant")


def test_step_on_four_devices_equals_one_device(worker):
  _expect(worker, "channel_one_vs_four_devices")


def test_filter_network_on_four_devices_equals_one_device(worker):
  _expect(worker, "filter_network_one_vs_four_devices")


def test_checkpoints_across_device_counts(worker):
  _expect(worker, "checkpoints_across_device_counts")


def test_batch_not_divisible_by_devices(worker):
  _expect(worker, "batch_not_divisible")


def test_train_and_evaluate_on_four_devices(worker):
  _expect(worker, "train_and_evaluate_on_four_devices")


def test_bfloat16_step(worker):
  _expect(worker, "bfloat16_step")


def _tiny_config():
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import multidevice_worker  # pylint: disable=g-import-not-at-top

  return multidevice_worker.tiny_config("channel")


def _flat(state):
  leaves = jax.tree_util.tree_flatten_with_path(checkpoints.state_tree(state))[
      0
  ]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_four_device_checkpoint_restores_in_this_process(worker):
  """This process's own devices (one, usually) restore the worker's
  4-device checkpoint exactly: into a state placed with `put_replicated`
  (the training loop's), and into a fresh unplaced state (as a resumed run
  restores before placing)."""
  out, results = worker
  assert results["checkpoints_across_device_counts"]["ok"]
  config = _tiny_config()
  mesh = sharding.create_mesh(config)
  fresh = train_step_lib.create_train_state(config)
  saved = np.load(os.path.join(out, "ckpt_4to1_saved.npz"))
  for template in (sharding.put_replicated(jax.device_get(fresh), mesh), fresh):
    mngr = checkpoints.manager(os.path.join(out, "ckpt_4to1"), create=False)
    restored = checkpoints.restore(mngr, template)
    mngr.close()
    got = _flat(restored)
    assert sorted(got) == sorted(saved.files)
    for key in saved.files:
      np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    want_devices = {
        d
        for leaf in jax.tree_util.tree_leaves(template.params)
        for d in leaf.sharding.device_set
    }
    for leaf in jax.tree_util.tree_leaves(restored.params):
      assert leaf.sharding.device_set == want_devices


def test_load_model_of_four_device_run(worker):
  """`load_model` (the sample and evaluate commands) reads the run that
  `train_and_evaluate` wrote on 4 devices, in this process."""
  out, results = worker
  assert results["train_and_evaluate_on_four_devices"]["ok"]
  _, _, variables, step = checkpoints.load_model(os.path.join(out, "run_4dev"))
  assert step == 2
  run = np.load(os.path.join(out, "run_4dev.npz"))
  for key, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
    np.testing.assert_array_equal(
        np.asarray(value),
        run[jax.tree_util.keystr(key)],
        err_msg=jax.tree_util.keystr(key),
    )


def test_check_batch_divides_message():
  mesh = sharding.create_mesh(config_lib.base_config())
  config = config_lib.base_config()
  config.batch_size = mesh.size * 3
  sharding.check_batch_divides(config, mesh)  # divides: no error
  if mesh.size > 1:
    config.batch_size = mesh.size + 1
    with pytest.raises(ValueError, match="does not divide"):
      sharding.check_batch_divides(config, mesh)


class _Recorder:

  def __init__(self):
    self.calls = []

  def __call__(self, **kwargs):
    self.calls.append(kwargs)


def test_multihost_initialisation(monkeypatch):
  """main's --multihost: jax.distributed.initialize() with the env vars."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from cign_jax import sharding  # pylint: disable=g-import-not-at-top

  record = _Recorder()
  monkeypatch.setattr(jax.distributed, "initialize", record)
  assert not sharding.initialize_distributed(None, environ={})
  assert not sharding.initialize_distributed(
      False, environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}
  )
  assert record.calls == []
  # Auto-detection (SLURM, TPU pods, ...): no arguments.
  assert sharding.initialize_distributed(True, environ={})
  assert record.calls[-1] == {}
  # The coordinator's address alone turns it on.
  env = {
      "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "1",
  }
  assert sharding.initialize_distributed(None, environ=env)
  assert record.calls[-1] == {
      "coordinator_address": "10.0.0.1:1234",
      "num_processes": 2,
      "process_id": 1,
  }
  with pytest.raises(app.UsageError, match="JAX_PROCESS_ID"):
    sharding.initialize_distributed(True, environ={"JAX_PROCESS_ID": "one"})


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(out, *extra_args, timeout=300):
  """Runs the worker as 2 processes joined by jax.distributed; returns
  ({check: result} of each process)."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [
      subprocess.Popen(
          [sys.executable, WORKER, "--multihost", str(out), *extra_args],
          env=_worker_env(
              JAX_COORDINATOR_ADDRESS=address,
              JAX_NUM_PROCESSES="2",
              JAX_PROCESS_ID=str(i),
          ),
          cwd=ROOT,
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  all_results = []
  for i, (proc, output) in enumerate(zip(procs, outputs)):
    path = os.path.join(str(out), f"multihost_{i}.json")
    assert os.path.isfile(path), (
        f"process {i} (exit {proc.returncode}):\n" f"{output[-4000:]}"
    )
    with open(path) as f:
      all_results.append(json.load(f))
    assert proc.returncode == 0, output[-4000:]
  return all_results


def _expect_all(all_results, names):
  for i, results in enumerate(all_results):
    for name in names:
      assert name in results, f"process {i} did not run {name}"
      assert results[name]["ok"], f"process {i}: {results[name]['detail']}"
      print(f"{name}: {results[name]['detail']}")


def test_two_processes_as_two_hosts(tmp_path):
  """Two processes of 2 CPU devices each, joined through the environment
  variables of the README (as `main --multihost` does): one mesh over the 4
  devices, each process holding its rows of the global batch, and global
  reductions across the processes."""
  _expect_all(
      _run_two_processes(tmp_path),
      ("multihost_processes_and_mesh", "multihost_global_batch"),
  )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CIGN_TEST_MULTIHOST_TRAINING"),
    reason="compiles the step in two processes (minutes); "
    "set CIGN_TEST_MULTIHOST_TRAINING=1",
)
def test_training_on_two_processes_matches_one(tmp_path, worker):
  """`train_and_evaluate` on 2 processes x 2 devices ends in the state of
  the single-process 4-device run of the same config and data."""
  out, results = worker
  assert results["train_and_evaluate_on_four_devices"]["ok"]
  _expect_all(
      _run_two_processes(
          tmp_path, os.path.join(out, "run_4dev.npz"), timeout=900
      ),
      (
          "multihost_processes_and_mesh",
          "multihost_global_batch",
          "multihost_train_and_evaluate",
      ),
  )
