"""The training loop: determinism, resume (also after a hard kill), NaN stop,
bad configs, and the sample command on the resulting run directory."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import sharding
from cign_jax import step_programs
from cign_jax.data import reader
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.configs import quick
from conftest import SYNTHETIC_MAIN
from conftest import step_programs_put_back
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = quick.get_config("tiny").num_train_steps

# Every jit in this file and its subprocesses shares one compilation cache.
CACHE = utils.enable_compilation_cache()


def _main_cmd(workdir, *extra):
  # The train command (python -m cign_jax.main) on the synthetic dataset.
  return [
      sys.executable,
      SYNTHETIC_MAIN,
      f"--config={ROOT}/configs/quick.py:tiny",
      f"--workdir={workdir}",
      *extra,
  ]


def _env():
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _leaves(state_or_workdir):
  if isinstance(state_or_workdir, str):
    _, _, variables, step = checkpoints.load_model(state_or_workdir)
    return step, [np.asarray(a) for a in jax.tree_util.tree_leaves(variables)]
  s = state_or_workdir
  variables = {"params": s.params, "batch_stats": s.batch_stats}
  return int(s.step), [
      np.asarray(a) for a in jax.tree_util.tree_leaves(variables)
  ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_dataset):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  state = train.train_and_evaluate(
      tiny_config(), workdir, dataset=synthetic_dataset
  )
  return workdir, state


def test_run_leaves_checkpoints_events_and_samples(uninterrupted):
  workdir, state = uninterrupted
  assert int(state.step) == NUM_STEPS
  files = os.listdir(workdir)
  assert "samples.png" in files and "config.json" in files
  assert any(f.startswith("events.out.tfevents") for f in files)
  steps = sorted(
      int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
  )
  assert steps == [2, 4, 6]
  step, leaves = _leaves(workdir)
  assert step == NUM_STEPS
  assert all(np.all(np.isfinite(a)) for a in leaves)


def test_same_seed_same_run_other_seed_other_run(
    uninterrupted, tmp_path, synthetic_dataset
):
  _, reference = uninterrupted
  again = train.train_and_evaluate(
      tiny_config(num_train_steps=2),
      str(tmp_path / "a"),
      dataset=synthetic_dataset,
  )
  again2 = train.train_and_evaluate(
      tiny_config(num_train_steps=2),
      str(tmp_path / "b"),
      dataset=synthetic_dataset,
  )
  other = train.train_and_evaluate(
      tiny_config(num_train_steps=2, seed=1),
      str(tmp_path / "c"),
      dataset=synthetic_dataset,
  )
  for a, b in zip(_leaves(again)[1], _leaves(again2)[1]):
    np.testing.assert_array_equal(a, b)
  assert any(
      not np.array_equal(a, b)
      for a, b in zip(_leaves(again)[1], _leaves(other)[1])
  )


def test_runs_of_one_process_share_their_step_program(
    uninterrupted, tmp_path, synthetic_dataset
):
  """A second run whose config differs only in what the step does not read
  (seed, length, logging, checkpoints) reuses the first run's network,
  optimiser and jitted step, and that step is not traced again (the states
  of both runs have one structure); a change the step reads gets its own."""
  mesh = sharding.create_mesh(tiny_config())
  steps = train_step_lib.total_train_steps
  # (The programs built here are dropped after the test, and the tiny
  # config's, which the next tests use, is put back.)
  with step_programs_put_back(clear=False):
    first = step_programs.get(tiny_config(), mesh, NUM_STEPS)
    assert (
        step_programs.get(
            tiny_config(
                seed=5,
                num_train_steps=3,
                log_every_steps=1,
                checkpoint_every_steps=1,
            ),
            mesh,
            3,
        )
        is first
    )
    traced = first.step_fn._cache_size()  # pylint: disable=protected-access
    train.train_and_evaluate(
        tiny_config(seed=5, num_train_steps=3),
        str(tmp_path / "again"),
        dataset=synthetic_dataset,
    )
    assert first.step_fn._cache_size() == traced  # pylint: disable=protected-access
    for other in (
        tiny_config(**{"optimizer.learning_rate": 2e-3}),
        tiny_config(**{"model.dropout_rate": 0.2}),
        tiny_config(**{"loss.num_mismatch_labels": 1}),
        tiny_config(ema_decay=0.9),
        tiny_config(batch_size=4),
    ):
      assert step_programs.get(other, mesh, steps(other)) is not first
    # A cosine schedule reads the run's length.
    cosine = tiny_config(**{"optimizer.lr_schedule": "cosine"})
    assert step_programs.get(cosine, mesh, 6) is not step_programs.get(
        cosine, mesh, 7
    )
    step_programs.forget()
    assert step_programs.get(tiny_config(), mesh, NUM_STEPS) is not first


def test_step_signature_leaves_the_cpu_kernels_alone_elsewhere(monkeypatch):
  """On a GPU (or any backend but CPU) the step's convolutions are XLA's, so
  the step's signature must not build or load the C++ CPU kernels."""
  from cign_jax.kernels import native_conv  # pylint: disable=g-import-not-at-top

  mesh = sharding.create_mesh(tiny_config())

  def refuse():
    raise AssertionError("the C++ kernels were asked for off the CPU")

  monkeypatch.setattr(native_conv, "available", refuse)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert step_programs.signature(tiny_config(), mesh, NUM_STEPS)[2] is None
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  with pytest.raises(AssertionError, match="off the CPU"):
    step_programs.signature(tiny_config(), mesh, NUM_STEPS)


def test_resume_equals_uninterrupted(
    uninterrupted, tmp_path, synthetic_dataset
):
  _, reference = uninterrupted
  workdir = str(tmp_path / "resumed")
  train.train_and_evaluate(
      tiny_config(num_train_steps=2), workdir, dataset=synthetic_dataset
  )
  resumed = train.train_and_evaluate(
      tiny_config(), workdir, dataset=synthetic_dataset
  )
  assert int(resumed.step) == NUM_STEPS
  for a, b in zip(_leaves(resumed)[1], _leaves(reference)[1]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_resume_after_hard_kill(uninterrupted, tmp_path):
  """SIGKILL between checkpoints, then the same command again."""
  _, reference = uninterrupted
  workdir = str(tmp_path / "killed")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(
      _main_cmd(workdir),
      env=_env(),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 900
  try:
    while time.time() < deadline:
      if os.path.isdir(os.path.join(ckpt_dir, "2")):
        break
      if proc.poll() is not None:
        pytest.fail("training ended before its first checkpoint")
      time.sleep(0.05)
    else:
      pytest.fail("no checkpoint within the time limit")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = [int(s) for s in os.listdir(ckpt_dir) if s.isdigit()]
  assert max(done) < NUM_STEPS, "killed before the end"
  result = subprocess.run(
      _main_cmd(workdir),
      env=_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from the checkpoint" in result.stderr
  step, leaves = _leaves(workdir)
  assert step == NUM_STEPS
  for a, b in zip(leaves, _leaves(reference)[1]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    uninterrupted, tmp_path, monkeypatch, synthetic_dataset
):
  workdir = str(tmp_path / "nan")
  original = reader.TrainBatches.batch

  def poisoned(self, step):
    x, c = original(self, step)
    if step >= 3:
      x = np.full_like(x, np.nan)
    return x, c

  monkeypatch.setattr(reader.TrainBatches, "batch", poisoned)
  with pytest.raises(train.NonFiniteLossError, match="step 4"):
    train.train_and_evaluate(tiny_config(), workdir, dataset=synthetic_dataset)
  step, leaves = _leaves(workdir)
  assert step == 2
  assert all(np.all(np.isfinite(a)) for a in leaves)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.model.latentdim=3", "latentdim"),
        ("--config.model.conditioning=spatial", "model.conditioning"),
        ("--config.loss.rec_weight=-1", "loss.rec_weight"),
        ("--config.loss.num_mismatch_labels=12", "num_mismatch_labels"),
    ],
)
def test_bad_config_is_named(tmp_path, override, message):
  result = subprocess.run(
      _main_cmd(str(tmp_path / "bad"), override),
      env=_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode != 0
  assert message in result.stderr


def test_resume_with_another_model_is_refused(
    uninterrupted, tmp_path, synthetic_dataset
):
  workdir = str(tmp_path / "other")
  train.train_and_evaluate(
      tiny_config(num_train_steps=2), workdir, dataset=synthetic_dataset
  )
  with pytest.raises(ValueError, match="config.model differs"):
    train.train_and_evaluate(
        tiny_config(**{"model.latent_dim": 3}),
        workdir,
        dataset=synthetic_dataset,
    )


def test_sample_command(uninterrupted, tmp_path):
  workdir, _ = uninterrupted
  out = str(tmp_path / "s.npz")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "cign_jax.sample",
          f"--workdir={workdir}",
          f"--out={out}",
          "--labels=3,7",
          "--num_per_label=4",
          "--applications=2",
      ],
      env=_env(),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    images, labels = f["images"], f["labels"]
  assert images.shape == (8, 28, 28, 1) and images.dtype == np.float32
  assert list(labels) == [3] * 4 + [7] * 4
  assert images.min() >= -1 and images.max() <= 1
  assert os.path.isfile(str(tmp_path / "s.png"))
  # Projection of given inputs, (N, 28, 28) accepted; f applied twice equals
  # f(f(x)) computed from the first output.
  inputs = str(tmp_path / "in.npz")
  np.savez(inputs, images=images[:3, :, :, 0], labels=labels[:3])
  out2 = str(tmp_path / "p.npz")
  # pylint: disable-next=g-import-not-at-top
  from cign_jax.commands import sample as sample_command

  once, _ = sample_command.sample_to_file(workdir, out2, inputs=inputs)
  twice, _ = sample_command.sample_to_file(
      workdir, out2, inputs=inputs, applications=2
  )
  np.savez(inputs, images=once, labels=labels[:3])
  again, _ = sample_command.sample_to_file(workdir, out2, inputs=inputs)
  np.testing.assert_allclose(twice, again, atol=1e-5)
  np.savez(inputs, images=images[:2], labels=np.array([1, 10]))
  with pytest.raises(ValueError, match="label out of range"):
    sample_command.sample_to_file(workdir, out2, inputs=inputs)


def test_learning_rate_schedules():
  """'constant' is the paper's rate; 'cosine' decays it to 0 over the run:
  lr0 * (1 + cos(pi t / T)) / 2 at step t of T."""
  config = config_lib.base_config()
  assert train_step_lib.learning_rate(config) == config.optimizer.learning_rate
  config.optimizer.lr_schedule = "cosine"
  config.num_train_steps = 100
  schedule = train_step_lib.learning_rate(config)
  lr0 = config.optimizer.learning_rate
  for t, expected in (
      (0, lr0),
      (50, lr0 / 2),
      (25, lr0 * (1 + np.cos(np.pi / 4)) / 2),
      (100, 0.0),
  ):
    np.testing.assert_allclose(float(schedule(t)), expected, atol=1e-12)
  # Without num_train_steps the run is num_epochs of full batches of 60000.
  config.num_train_steps = -1
  config.num_epochs, config.batch_size = 2, 128
  assert train_step_lib.total_train_steps(config) == 2 * (60000 // 128)


def test_parameter_average_recursion():
  """ema_decay > 0: after step t (from 0) the state holds
  ema_t = d_t ema_{t-1} + (1 - d_t) params_t, d_t = min(decay,
  (1 + t) / (10 + t)), ema_{-1} = the initial parameters; evaluation uses it."""
  config = tiny_config(ema_decay=0.9)
  # The training loop's network, optimiser and jitted step, placed as the
  # loop places them (the program the next test's runs use: the process
  # keeps it).
  mesh = sharding.create_mesh(config)
  program = step_programs.get(config, mesh, config.num_train_steps)
  state = train_step_lib.create_train_state(
      config, model=program.model, tx=program.tx
  )
  assert state.ema_params is not None
  step = program.step_fn
  batch = sharding.data_sharding(mesh)
  rs = np.random.RandomState(0)
  images = sharding.put_global_batch(
      rs.uniform(-1, 1, (config.batch_size, 28, 28, 1)).astype(np.float32),
      batch,
  )
  labels = sharding.put_global_batch(
      np.arange(config.batch_size, dtype=np.int32) % 10, batch
  )
  key = sharding.put_replicated(jax.random.key(0), mesh)
  expected = jax.tree_util.tree_map(np.asarray, state.params)
  state = sharding.put_replicated(state, mesh)
  for t in range(3):
    state, metrics = step(state, images, labels, key)
    assert float(metrics["finite"]) == 1.0
    d = min(0.9, (1 + t) / (10 + t))
    expected = jax.tree_util.tree_map(
        lambda e, p, d=d: d * e + (1 - d) * np.asarray(p, np.float64),
        expected,
        state.params,
    )
  for e, got in zip(
      jax.tree_util.tree_leaves(expected),
      jax.tree_util.tree_leaves(state.ema_params),
  ):
    np.testing.assert_allclose(np.asarray(got), e, rtol=1e-5, atol=1e-7)
  assert train_step_lib.eval_variables(state)["params"] is state.ema_params
  # Without it the state carries none and evaluation uses the parameters.
  plain = train_step_lib.create_train_state(tiny_config())
  assert plain.ema_params is None
  assert train_step_lib.eval_variables(plain)["params"] is plain.params


def test_parameter_average_is_checkpointed_and_resumed(
    tmp_path, synthetic_dataset
):
  config = tiny_config(num_train_steps=4, ema_decay=0.9)
  straight = train.train_and_evaluate(
      config, str(tmp_path / "straight"), dataset=synthetic_dataset
  )
  workdir = str(tmp_path / "resumed")
  train.train_and_evaluate(
      tiny_config(num_train_steps=2, ema_decay=0.9),
      workdir,
      dataset=synthetic_dataset,
  )
  resumed = train.train_and_evaluate(config, workdir, dataset=synthetic_dataset)
  for a, b in zip(
      jax.tree_util.tree_leaves(resumed.ema_params),
      jax.tree_util.tree_leaves(straight.ema_params),
  ):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7
    )
  # load_model (sampling, evaluation) returns the average.
  _, _, variables, step = checkpoints.load_model(workdir)
  assert step == 4
  for a, b in zip(
      jax.tree_util.tree_leaves(variables["params"]),
      jax.tree_util.tree_leaves(resumed.ema_params),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Resuming with another ema_decay is refused by name; restoring a
  # checkpoint into a state that disagrees on having the average, too.
  with pytest.raises(ValueError, match="ema_decay"):
    train.train_and_evaluate(
        tiny_config(num_train_steps=6), workdir, dataset=synthetic_dataset
    )
  plain = str(tmp_path / "plain")
  train.train_and_evaluate(
      tiny_config(num_train_steps=2), plain, dataset=synthetic_dataset
  )
  for run_dir, other in ((workdir, tiny_config()), (plain, config)):
    target = jax.eval_shape(
        lambda c=other: train_step_lib.create_train_state(c)
    )
    mngr = checkpoints.manager(run_dir, create=False)
    with pytest.raises(checkpoints.CheckpointError, match="ema_params"):
      checkpoints.restore(mngr, target)
    mngr.close()
