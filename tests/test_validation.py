"""Validation in eval mode, evaluation points, the best checkpoint (also
across a resume and a crash), choosing a checkpoint, and their errors."""

import json
import os

import jax
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import losses
from cign_jax import models
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax import validation
from cign_jax.commands import sample as sample_command
from conftest import tiny_config
from cign_jax.data import reader
import synthetic  # tests/synthetic.py

CACHE = utils.enable_compilation_cache()


@pytest.fixture(scope="module")
def small_data():
  """The synthetic dataset (tests/synthetic.py): 64 training images (an
  epoch is 8 steps of 8) and 20 test images drawn apart from them."""
  train_x, train_y = synthetic.dataset(seed=0)
  test_x, test_y = synthetic.dataset(seed=1)
  return {"train": (train_x, train_y), "test": (test_x[:20], test_y[:20])}


@pytest.fixture(scope="module")
def model_and_variables():
  config = tiny_config()
  model = models.model_from_config(config)
  state = train_step_lib.create_train_state(config, model=model)
  return config, model, train_step_lib.eval_variables(state)


# --- The validation loss -----------------------------------------------------


def test_validation_is_eval_mode_and_weighted_by_batch(
    small_data, model_and_variables
):
  config, model, variables = model_and_variables
  x_u8, y = small_data["test"]
  x_u8, y = x_u8[:7], y[:7]
  config.batch_size = 3  # batches of 3, 3 and 1
  out = validation.validation_loss(model, variables, x_u8, y, config, 0)
  # rec in eval mode needs no random draw: 20 * mean |f(x) - x| over all
  # pixels, f with running statistics and no dropout.
  x = reader.to_model_range(x_u8)
  f_x = np.asarray(model.apply(variables, x, y, train=False))
  expected_rec = config.loss.rec_weight * np.mean(np.abs(f_x - x))
  np.testing.assert_allclose(out["val_loss_rec"], expected_rec, rtol=1e-5)
  total = sum(out[f"val_{k}"] for k in losses.LOSS_TERMS)
  np.testing.assert_allclose(out["val_loss"], total, rtol=1e-5, atol=1e-6)
  assert set(out) == {"val_loss"} | {f"val_{k}" for k in losses.LOSS_TERMS}


def test_validation_depends_only_on_seed_and_epoch(
    small_data, model_and_variables
):
  config, model, variables = model_and_variables
  x, y = small_data["test"]
  a = validation.validation_loss(model, variables, x, y, config, 3)
  b = validation.validation_loss(model, variables, x, y, config, 3)
  c = validation.validation_loss(model, variables, x, y, config, 4)
  assert a == b
  assert a["val_loss_idem_noise"] != c["val_loss_idem_noise"]
  assert a["val_loss_rec"] == c["val_loss_rec"]  # no draw in rec
  config2 = tiny_config(seed=1)
  d = validation.validation_loss(model, variables, x, y, config2, 3)
  assert a["val_loss_idem_noise"] != d["val_loss_idem_noise"]


def test_evaluation_points():
  config = tiny_config(eval_every_epochs=2, eval_every_steps=0)
  points = [
      d
      for d in range(1, 41)
      if validation.is_evaluation_point(d, 40, 8, config)
  ]
  assert points == [16, 32, 40]  # every 2 epochs of 8 steps, and the last
  config = tiny_config(eval_every_epochs=0, eval_every_steps=5)
  points = [
      d
      for d in range(1, 13)
      if validation.is_evaluation_point(d, 12, 8, config)
  ]
  assert points == [5, 10, 12]


def test_is_better():
  assert validation.is_better("val_loss", 1.0, 2.0)
  assert not validation.is_better("val_loss", 2.0, 2.0)
  assert validation.is_better("label_accuracy", 0.9, 0.8)
  assert validation.is_better("label_accuracy", 0.1, None)
  assert not validation.is_better("val_loss", float("nan"), None)
  # Declared ways round (the evaluation's registry declares its metrics'):
  # an undeclared metric counts as higher-better.
  assert validation.is_better("a_probe", 0.9, 0.8)
  validation.declare_directions({"a_probe": True})
  assert validation.is_better("a_probe", 0.8, 0.9)


# --- Bad configs -------------------------------------------------------------


def test_best_metric_the_run_does_not_compute():
  with pytest.raises(
      ValueError,
      match=r"best_metric: 'label_accuracy' is not "
      r"computed by this run; it computes \('val_loss',\)",
  ):
    config_lib.validate(tiny_config(best_metric="label_accuracy"))
  with pytest.raises(ValueError, match="'fid192' is not computed.*fid64"):
    config_lib.validate(
        tiny_config(
            best_metric="fid192",
            eval_samples_per_label=100,
            eval_metrics=("fid64",),
        )
    )
  with pytest.raises(ValueError, match="'val_los' is not computed"):
    config_lib.validate(tiny_config(best_metric="val_los"))
  # Any name of eval_metrics, once in-loop metrics are on.
  config_lib.validate(
      tiny_config(
          best_metric="recall",
          eval_samples_per_label=10,
          eval_metrics=("recall",),
      )
  )


def test_eval_metrics_form_and_the_retired_fid_sizes():
  with pytest.raises(
      ValueError, match=r"eval_metrics: must be a tuple of " r"metric names"
  ):
    config_lib.validate(tiny_config(eval_metrics=("fid64", "")))
  with pytest.raises(
      ValueError, match=r"eval_metrics: lists \['kid'\] more " r"than once"
  ):
    config_lib.validate(tiny_config(eval_metrics=("kid", "kid")))
  with pytest.raises(
      ValueError,
      match=r"eval_fid_sizes: retired; list "
      r"\('fid64',\) in config.eval_metrics",
  ):
    config_lib.validate(tiny_config(eval_fid_sizes=(64,)))


def test_val_loss_without_a_test_split(small_data, tmp_path):
  with pytest.raises(
      ValueError,
      match="best_metric is 'val_loss' but the run " "has no validation split",
  ):
    train.train_and_evaluate(
        tiny_config(best_metric="val_loss"),
        str(tmp_path),
        dataset=small_data["train"],
    )


def test_in_loop_metrics_need_an_evaluator(small_data, tmp_path):
  with pytest.raises(ValueError, match="in_loop.train_and_evaluate"):
    train.train_and_evaluate(
        tiny_config(eval_samples_per_label=2), str(tmp_path), dataset=small_data
    )


# --- The best checkpoint, resumed and crashed --------------------------------


class ProbeEvaluator:
  """An in-loop metric whose best is known: highest at step 16 of 24; raises
  at `crash_at` (a process dying in the middle of an evaluation)."""

  def __init__(self, crash_at=None):
    self.crash_at = crash_at
    self.calls = []

  def __call__(self, model, variables, step):
    self.calls.append(step)
    if step == self.crash_at:
      raise KeyboardInterrupt(f"crash at {step}")
    score = {8: 0.5, 16: 0.9, 24: 0.7}[step]
    return {"probe": score}


def _run_config():
  return tiny_config(
      num_train_steps=24, checkpoint_every_steps=4, best_metric="val_loss"
  )


def _best_files(workdir):
  with open(os.path.join(workdir, "best.json")) as f:
    best = json.load(f)
  with open(os.path.join(workdir, "evaluations.json")) as f:
    history = json.load(f)["history"]
  return best, history, sorted(os.listdir(os.path.join(workdir, "best")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data):
  workdir = str(tmp_path_factory.mktemp("best_uninterrupted"))
  train.train_and_evaluate(
      _run_config(), workdir, dataset=small_data, evaluator=ProbeEvaluator()
  )
  return workdir


def test_best_checkpoint_is_the_lowest_val_loss(uninterrupted, small_data):
  best, history, stored = _best_files(uninterrupted)
  assert [r["step"] for r in history] == [8, 16, 24]
  losses_by_step = {r["step"]: r["val_loss"] for r in history}
  lowest = min(losses_by_step, key=losses_by_step.get)
  assert best == {
      "step": lowest,
      "metric": "val_loss",
      "value": losses_by_step[lowest],
  }
  assert stored == [str(lowest)]
  chosen = checkpoints.resolve_checkpoint(uninterrupted)
  assert (
      chosen.step == lowest and "best checkpoint by val_loss" in chosen.reason
  )
  # The best checkpoint holds the state of its step: its validation loss
  # recomputed from the loaded variables is the recorded one.
  config, model, variables, step = checkpoints.load_model(
      uninterrupted, checkpoint="best"
  )
  assert step == lowest
  test_x, test_y = small_data["test"]
  again = validation.validation_loss(
      model, variables, test_x, test_y, config, epoch=lowest // 8
  )
  np.testing.assert_allclose(
      again["val_loss"], losses_by_step[lowest], rtol=1e-5
  )
  assert checkpoints.load_model(uninterrupted, checkpoint="latest")[3] == 24


def test_best_by_another_metric(tmp_path, small_data):
  config = _run_config()
  config.best_metric = ""  # the probe is not a config metric: rank by hand
  workdir = str(tmp_path)
  tracker = validation.BestCheckpoint(workdir, "probe")
  # The tracker ranks whatever metric it is given; higher probe is better.
  state = train_step_lib.create_train_state(config)
  for step, value in ((8, 0.5), (16, 0.9), (24, 0.7)):
    tracker.record(state.replace(step=step), {"probe": value})
    tracker.commit()
  assert tracker.best["step"] == 16
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["16"]


def test_resumed_run_ends_with_the_same_best(
    uninterrupted, small_data, tmp_path
):
  workdir = str(tmp_path / "resumed")
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(
        _run_config(),
        workdir,
        dataset=small_data,
        evaluator=ProbeEvaluator(crash_at=16),
    )
  # Killed while evaluating step 16: the latest checkpoint is of step 12.
  assert (
      max(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
      == 12
  )
  train.train_and_evaluate(
      _run_config(), workdir, dataset=small_data, evaluator=ProbeEvaluator()
  )
  ref_best, ref_history, ref_stored = _best_files(uninterrupted)
  best, history, stored = _best_files(workdir)
  assert best == ref_best and stored == ref_stored
  assert history == ref_history
  a = checkpoints.load_model(uninterrupted, checkpoint="best")[2]
  b = checkpoints.load_model(workdir, checkpoint="best")[2]
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7
    )


def test_crash_between_best_and_latest_keeps_the_previous_best(tmp_path):
  """Killed after an improvement went to best/ but before the latest
  checkpoint of that step: the resumed run forgets it and keeps the
  previous best, whose checkpoint is still there."""
  config = tiny_config()
  workdir = str(tmp_path)
  state = train_step_lib.create_train_state(config)
  tracker = validation.BestCheckpoint(workdir, "val_loss")
  tracker.record(state.replace(step=8), {"val_loss": 3.0})
  tracker.commit()  # the latest checkpoint of step 8 was saved
  tracker.record(state.replace(step=16), {"val_loss": 2.0})
  # ... killed here: no latest checkpoint of step 16, no commit.
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["16", "8"]
  resumed = validation.BestCheckpoint(workdir, "val_loss")
  resumed.resume(12)
  assert resumed.best["step"] == 8
  assert sorted(os.listdir(os.path.join(workdir, "best"))) == ["8"]
  with open(os.path.join(workdir, "best.json")) as f:
    assert json.load(f)["step"] == 8


def test_time_limit_stops_cleanly_and_resumes(tmp_path, small_data):
  workdir = str(tmp_path)
  config = tiny_config(num_train_steps=6)
  state = train.train_and_evaluate(
      config, workdir, dataset=small_data, time_limit_seconds=0
  )
  assert int(state.step) == 1
  assert checkpoints.resolve_checkpoint(workdir, "latest").step == 1
  assert not os.path.exists(os.path.join(workdir, "samples.png"))
  state = train.train_and_evaluate(config, workdir, dataset=small_data)
  assert int(state.step) == 6


# --- Choosing a checkpoint ---------------------------------------------------


def test_checkpoint_errors_name_what_there_is(uninterrupted):
  best = checkpoints.read_best(uninterrupted)["step"]
  with pytest.raises(
      checkpoints.CheckpointError,
      match=r"unknown checkpoint value 'newest': expected "
      r"best, latest or a step number; available: latest "
      r"\(step 24\), best \(step \d+ by val_loss\)",
  ):
    checkpoints.resolve_checkpoint(uninterrupted, "newest")
  with pytest.raises(
      checkpoints.CheckpointError, match=r"no checkpoint of step 5 .*available"
  ):
    checkpoints.load_model(uninterrupted, checkpoint="5")
  assert checkpoints.resolve_checkpoint(uninterrupted, str(best)).step == best
  assert (
      checkpoints.resolve_checkpoint(uninterrupted, 20).reason
      == "step 20 (checkpoint=20)"
  )


def test_no_best_checkpoint(tmp_path, small_data):
  workdir = str(tmp_path)
  train.train_and_evaluate(
      tiny_config(num_train_steps=2), workdir, dataset=small_data["train"]
  )
  chosen = checkpoints.resolve_checkpoint(workdir)
  assert chosen.step == 2 and "keeps no best" in chosen.reason
  with pytest.raises(
      checkpoints.CheckpointError,
      match="has no best checkpoint.*latest \\(step 2\\)",
  ):
    checkpoints.resolve_checkpoint(workdir, "best")


def test_sample_names_its_checkpoint(uninterrupted, tmp_path):
  out = str(tmp_path / "s.npz")
  sample_command.sample_to_file(
      uninterrupted, out, num_per_label=2, checkpoint="latest"
  )
  with np.load(out) as f:
    assert int(f["step"]) == 24
    assert str(f["checkpoint"]) == "latest checkpoint (checkpoint=latest)"
  from PIL import Image  # pylint: disable=g-import-not-at-top

  assert Image.open(out[:-4] + ".png").text["step"] == "24"
  sample_command.sample_to_file(uninterrupted, out, num_per_label=2)
  with np.load(out) as f:
    assert int(f["step"]) == checkpoints.read_best(uninterrupted)["step"]
    assert str(f["checkpoint"]).startswith("best checkpoint by val_loss")
