"""A run directory nothing can corrupt: readers never write, only good steps
are checkpointed, no silent NaN, one writer per run, verified checkpoints,
and a plain last line for every failure."""

import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import run_dir
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.commands import sample as sample_command
from conftest import flip_bytes
from conftest import start_synthetic_training
from conftest import tiny_config
import synthetic as synthetic_data  # tests/synthetic.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def synthetic():
  """The shared synthetic dataset's training split (tests/synthetic.py)."""
  return synthetic_data.load_split("mnist", "train")


def synthetic_splits():
  """What `tests/synthetic.py`'s train command reads: both splits."""
  return {
      split: synthetic_data.load_split("mnist", split)
      for split in ("train", "test")
  }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run (checkpoints 2, 4, 6), copied per test that
  changes it."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.train_and_evaluate(tiny_config(), workdir, dataset=synthetic())
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


def test_sampling_leaves_a_saving_trainers_temporary_directory(
    run_copy, tmp_path
):
  """What a training writes while it saves step 8 (an orbax temporary
  directory) survives a reader of the run."""
  tmp_dir = os.path.join(
      run_copy, "checkpoints", "8.orbax-checkpoint-tmp", "default"
  )
  os.makedirs(tmp_dir)
  before = sorted(os.listdir(os.path.join(run_copy, "checkpoints")))
  images, _ = sample_command.sample_to_file(
      run_copy, str(tmp_path / "s.npz"), labels=[1], num_per_label=2
  )
  assert images.shape == (2, 28, 28, 1)
  checkpoints.load_model(run_copy)
  assert os.path.isdir(tmp_dir)
  assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == before


def test_blow_up_keeps_a_last_good_checkpoint_that_samples_finite_images(
    tmp_path, monkeypatch
):
  """A learning rate of 1e-3 for two steps, then 1e6: the weights and
  BatchNorm statistics overflow; no state that does so is checkpointed, and
  the last good checkpoint samples finite images."""
  workdir = str(tmp_path / "blowup")
  monkeypatch.setattr(
      train_step_lib,
      "learning_rate",
      lambda config, total_steps=None: lambda count: jnp.where(
          count < 2, 1e-3, 1e6
      ),
  )
  config = tiny_config(num_train_steps=8, checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match="not") as err:
    train.train_and_evaluate(config, workdir, dataset=synthetic())
  _, _, variables, step = checkpoints.load_model(workdir)
  assert step >= 2
  assert f"(step {step}) in" in str(err.value)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert np.all(np.isfinite(np.asarray(leaf)))
  images, _ = sample_command.sample_to_file(workdir, str(tmp_path / "s.npz"))
  assert np.all(np.isfinite(images))


# No silent NaN.


def test_inputs_with_nan_are_refused_with_count_and_position(
    finished, tmp_path
):
  images = np.zeros((3, 28, 28), np.float32)
  images[1, 3, 4] = np.nan
  images[2, 0, 0] = np.inf
  inputs = str(tmp_path / "in.npz")
  np.savez(inputs, images=images, labels=np.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"2 non-finite .* index \(1, 3, 4, 0\)"):
    sample_command.sample_to_file(
        finished, str(tmp_path / "p.npz"), inputs=inputs
    )
  assert not os.path.exists(tmp_path / "p.npz")


def test_nan_weights_stop_sampling_naming_the_checkpoint(run_copy, tmp_path):
  config = checkpoints.load_config(run_copy)
  mngr = checkpoints.manager(run_copy, keep=10)
  state = checkpoints.restore(mngr, train_step_lib.create_train_state(config))
  poisoned = jax.tree_util.tree_map(lambda a: a * np.nan, state.params)
  checkpoints.save(mngr, state.replace(step=8, params=poisoned))
  mngr.close()
  with pytest.raises(FloatingPointError, match="checkpoint of step 8"):
    sample_command.sample_to_file(run_copy, str(tmp_path / "s.npz"))
  assert not os.path.exists(tmp_path / "s.npz")


def test_evaluation_refuses_non_finite_samples(tmp_path):
  from cign_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  images = np.zeros((20, 28, 28, 1), np.float32)
  images[5, 10, 10, 0] = np.nan
  path = str(tmp_path / "samples.npz")
  np.savez(path, images=images, labels=np.arange(20) % 10)
  with pytest.raises(ValueError, match=r"1 non-finite .* \(5, 10, 10, 0\)"):
    evaluate.run(samples=path)


# The run directory is written only after every check.


def test_failed_checks_leave_no_run_directory(tmp_path):
  workdir = str(tmp_path / "never")
  with pytest.raises(ValueError, match="batch_size 128 is larger"):
    train.train_and_evaluate(
        tiny_config(batch_size=128), workdir, dataset=synthetic()
    )
  with pytest.raises(
      ValueError,
      match=r"span 0\.\.9.*num_classes=5.*" r"set config.model.num_classes=10",
  ):
    train.train_and_evaluate(
        tiny_config(**{"model.num_classes": 5, "loss.num_mismatch_labels": 4}),
        workdir,
        dataset=synthetic(),
    )
  assert not os.path.exists(workdir)


def test_checkpoints_without_config_are_refused(run_copy):
  os.remove(os.path.join(run_copy, "config.json"))
  with pytest.raises(ValueError, match="checkpoints but no config.json"):
    train.train_and_evaluate(tiny_config(), run_copy, dataset=synthetic())
  assert not os.path.exists(os.path.join(run_copy, "config.json"))


def test_resuming_with_fewer_steps_changes_nothing(run_copy):
  path = os.path.join(run_copy, "config.json")
  with open(path) as f:
    before = f.read()
  state = train.train_and_evaluate(
      tiny_config(num_train_steps=4), run_copy, dataset=synthetic()
  )
  assert int(state.step) == 6
  with open(path) as f:
    assert f.read() == before


# One writer per run.


def test_second_trainer_is_refused_naming_the_holder(run_copy):
  with run_dir.WorkdirLock(run_copy):
    with pytest.raises(run_dir.RunLockedError, match=f"pid {os.getpid()}"):
      train.train_and_evaluate(
          tiny_config(num_train_steps=8), run_copy, dataset=synthetic()
      )
  assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == [
      "2",
      "4",
      "6",
  ]


def test_lock_of_a_killed_process_is_released(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "w")
  code = (
      "import sys, time; from cign_jax import run_dir; "
      f"run_dir.WorkdirLock({workdir!r}); print('held', flush=True); "
      "time.sleep(600)"
  )
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(
      [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
  )
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(run_dir.RunLockedError, match=f"pid {proc.pid}"):
      run_dir.WorkdirLock(workdir)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  run_dir.WorkdirLock(workdir).release()


# Checkpoints are verified.


def test_corrupt_latest_step_names_it_and_the_good_steps(run_copy):
  flip_bytes(os.path.join(run_copy, "checkpoints", "6"))
  with pytest.raises(checkpoints.CheckpointError) as err:
    checkpoints.load_model(run_copy)
  message = str(err.value)
  assert "step 6" in message and "good steps there: 2, 4" in message
  assert "checkpoint=4" in message
  _, _, _, step = checkpoints.load_model(run_copy, step=4)
  assert step == 4


def test_missing_step_lists_the_steps(finished):
  with pytest.raises(
      checkpoints.CheckpointError,
      match="no checkpoint of step 99.*steps there: 2, 4, 6",
  ):
    checkpoints.load_model(finished, step=99)


def test_checksum_detects_altered_tensors(run_copy):
  """Tensors replaced by other finite values (a valid but different
  checkpoint under the recorded checksum) are refused."""
  step6 = os.path.join(run_copy, "checkpoints", "6")
  step4 = os.path.join(run_copy, "checkpoints", "4")
  shutil.rmtree(os.path.join(step6, "default"))
  shutil.copytree(
      os.path.join(step4, "default"), os.path.join(step6, "default")
  )
  assert run_dir.read_digest(step6) != run_dir.read_digest(step4)
  with pytest.raises(checkpoints.CheckpointError, match="checksum"):
    checkpoints.load_model(run_copy)


# Smaller messages.


def test_truncated_config_names_the_path(run_copy):
  path = os.path.join(run_copy, "config.json")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[: len(text) // 2])
  with pytest.raises(
      checkpoints.CheckpointError, match="config.json is " "damaged"
  ):
    checkpoints.load_config(run_copy)


@pytest.mark.parametrize(
    "labels,message",
    [
        (["a"], "--labels must be integers.*'a'"),
        ([], "--labels is empty"),
    ],
)
def test_bad_labels_name_the_flag(finished, tmp_path, labels, message):
  with pytest.raises(ValueError, match=message):
    sample_command.sample_to_file(
        finished, str(tmp_path / "s.npz"), labels=labels
    )


@pytest.mark.parametrize("content", [b"", b"not an npz\n"])
def test_bad_inputs_file_names_the_flag(finished, tmp_path, content):
  path = str(tmp_path / "in.npz")
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError, match="--inputs file"):
    sample_command.sample_to_file(
        finished, str(tmp_path / "s.npz"), inputs=path
    )


# Results say what they scored.


def test_evaluation_cache_follows_the_checkpoint(run_copy, monkeypatch):
  """The cached samples are regenerated for another checkpoint and when the
  cache is unreadable; reused for the same checkpoint and settings."""
  from cign_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top
  from cign_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  scored = []

  def record(images, labels, dataset, feature_sizes):
    scored.append(np.array(images))
    # Only what run() reads of a report.
    return {"label_accuracy": {"confusion": np.eye(10).tolist()}}

  monkeypatch.setattr(evaluate, "evaluate_samples", record)
  monkeypatch.setattr(classifier, "plot_confusion", lambda *a: None)
  cache = os.path.join(run_copy, "eval_samples.npz")
  assert evaluate.run(workdir=run_copy, num_per_class=2)["step"] == 6
  mtime = os.stat(cache).st_mtime_ns
  assert evaluate.run(workdir=run_copy, num_per_class=2)["step"] == 6
  assert os.stat(cache).st_mtime_ns == mtime  # reused
  np.testing.assert_array_equal(scored[0], scored[1])
  # Another checkpoint: step 6 set aside, step 4 is the latest.
  shutil.move(
      os.path.join(run_copy, "checkpoints", "6"),
      os.path.join(run_copy, "step6"),
  )
  assert evaluate.run(workdir=run_copy, num_per_class=2)["step"] == 4
  assert not np.array_equal(scored[2], scored[0])
  # A cache cut short by a kill is regenerated, not an error.
  with open(cache, "r+b") as f:
    f.truncate(100)
  assert evaluate.run(workdir=run_copy, num_per_class=2)["step"] == 4
  np.testing.assert_array_equal(scored[3], scored[2])


# Every failure ends with one plain line.


def _last_stderr_line(cmd):
  import subprocess  # pylint: disable=g-import-not-at-top

  env = dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=CACHE)
  result = subprocess.run(
      cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  return lines[-1]


def test_corrupt_checkpoint_ends_on_one_plain_line(run_copy, tmp_path):
  import sys  # pylint: disable=g-import-not-at-top

  flip_bytes(os.path.join(run_copy, "checkpoints", "6"))
  last = _last_stderr_line(
      [
          sys.executable,
          "-m",
          "cign_jax.sample",
          f"--workdir={run_copy}",
          f"--out={tmp_path / 's.npz'}",
      ]
  )
  assert last.startswith("error: checkpoint of step 6"), last
  assert "good steps there: 2, 4" in last and "checkpoint=4" in last


def test_unknown_config_key_ends_on_one_plain_line(tmp_path):
  import sys  # pylint: disable=g-import-not-at-top

  last = _last_stderr_line(
      [
          sys.executable,
          "-m",
          "cign_jax.main",
          f"--config={ROOT}/configs/quick.py:tiny",
          f"--workdir={tmp_path / 'w'}",
          "--config.foo=1",
      ]
  )
  assert last.startswith("error: --config.foo: config has no key 'foo'"), last
  assert "batch_size" in last  # the known keys are listed
  assert not os.path.exists(tmp_path / "w")


def test_full_disk_and_permission_messages():
  """The last line of a failed write names the cause and the fix, also when
  the OSError is wrapped by a library's own exception."""
  import errno  # pylint: disable=g-import-not-at-top
  from cign_jax import commands  # pylint: disable=g-import-not-at-top

  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device", "/w/ckpt")
    except OSError as inner:
      raise RuntimeError("async save failed") from inner
  except RuntimeError as e:
    line, known = commands.plain_message(e)
  assert known and line.startswith("error: the disk is full")
  line, _ = commands.plain_message(
      PermissionError(errno.EACCES, "Permission denied", "/w")
  )
  assert line.startswith("error: permission denied") and "(/w)" in line
  line, _ = commands.plain_message(ValueError("config.batch_size: bad"))
  assert line == "error: config.batch_size: bad"


@pytest.mark.data
def test_damaged_tfds_record_is_named_with_the_fix(tmp_path):
  from cign_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from cign_jax.data import reader  # pylint: disable=g-import-not-at-top
  # Prepared here (a no-op when already there): on a fresh machine no other
  # test need have run before this one in its worker.
  source = prepare.version_dir("mnist", prepare.ensure_prepared("mnist"))
  data_dir = str(tmp_path / "tfds")
  target = prepare.version_dir("mnist", data_dir)
  shutil.copytree(source, target)
  record = os.path.join(target, "mnist-test.array_record-00000-of-00001")
  with open(record, "r+b") as f:
    f.truncate(os.path.getsize(record) // 2)
  with pytest.raises(ValueError, match="mnist test split is damaged") as err:
    reader.load_split("mnist", "test", data_dir)
  assert record in str(err.value)
  assert "python -m cign_jax.data prepare mnist" in str(err.value)


def test_a_checkpoint_deleted_while_read_is_chosen_again(run_copy, monkeypatch):
  """The latest step, deleted (as a training deletes its oldest) between
  being chosen and being read: the reader chooses again, and the step it
  names is the step whose weights it returns."""
  real_restore = checkpoints.restore
  read = []

  def restore_as_a_training_deletes(mngr, state, step=None):
    if not read:
      shutil.rmtree(os.path.join(run_copy, "checkpoints", str(step)))
    read.append(step)
    return real_restore(mngr, state, step)

  monkeypatch.setattr(checkpoints, "restore", restore_as_a_training_deletes)
  chosen, (_, _, variables, step) = checkpoints.load_chosen_model(run_copy)
  assert read == [6, 4]
  assert chosen.step == step == 4
  monkeypatch.setattr(checkpoints, "restore", real_restore)
  _, _, expected, _ = checkpoints.load_model(run_copy, checkpoint="4")
  assert run_dir.tree_digest(variables) == run_dir.tree_digest(expected)


def test_a_requested_step_deleted_while_read_is_named(run_copy, monkeypatch):
  """A step asked for by number is not replaced by another; the error says
  it was deleted, not that it is corrupt."""
  real_restore = checkpoints.restore

  def restore_as_a_training_deletes(mngr, state, step=None):
    shutil.rmtree(os.path.join(run_copy, "checkpoints", str(step)))
    return real_restore(mngr, state, step)

  monkeypatch.setattr(checkpoints, "restore", restore_as_a_training_deletes)
  with pytest.raises(
      checkpoints.CheckpointGoneError,
      match="step 4 .* was deleted while it was read",
  ):
    checkpoints.load_chosen_model(run_copy, "4")


def test_reader_in_a_loop_beside_a_training(tmp_path):
  """`load_model` (what sample and evaluate use) in a loop while a training
  saves a checkpoint every step: the training finishes, and its final state
  equals an undisturbed run's."""

  overrides = {"num_train_steps": 4, "checkpoint_every_steps": 1}
  workdir = str(tmp_path / "live")
  proc = start_synthetic_training(workdir, overrides)
  reads = 0
  try:
    while proc.poll() is None:
      try:
        checkpoints.load_model(workdir)
        reads += 1
      except checkpoints.CheckpointError:
        pass  # no checkpoint yet, or a step deleted while it was read
      # Many reads still fall between the saves (one per step), without
      # the loop taking a whole core from the training.
      time.sleep(0.02)
  finally:
    if proc.poll() is None:
      proc.kill()
    stderr = proc.communicate()[1]
  assert proc.returncode == 0, stderr[-3000:]
  assert reads > 0
  reference = str(tmp_path / "undisturbed")
  train.train_and_evaluate(
      tiny_config(**overrides), reference, dataset=synthetic_splits()
  )
  _, _, live, live_step = checkpoints.load_model(workdir)
  _, _, undisturbed, step = checkpoints.load_model(reference)
  assert live_step == step == 4
  for a, b in zip(
      jax.tree_util.tree_leaves(live), jax.tree_util.tree_leaves(undisturbed)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
