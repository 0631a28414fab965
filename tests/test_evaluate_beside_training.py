"""`evaluate` beside a training that saves a checkpoint every step and
deletes the older ones: it reports only what it scored, and never disturbs
the training. (`load_model` beside a training, and a checkpoint deleted
while read: tests/test_run_dir.py.)"""

import json
import os
import time

import jax
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import run_dir
from cign_jax import train
from cign_jax import utils
from conftest import start_synthetic_training
from conftest import tiny_config
import synthetic as synthetic_data  # tests/synthetic.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def _splits():
  """What `tests/synthetic.py`'s train command reads: both splits."""
  return {
      split: synthetic_data.load_split("mnist", split)
      for split in ("train", "test")
  }


@pytest.mark.data  # the label classifier is trained on MNIST (cached)
def test_evaluate_in_a_loop_beside_a_training(tmp_path):
  """`evaluate --workdir` in a loop while a training saves every step and
  keeps two: each report names the step whose weights it scored (checked
  against an undisturbed run's weights of that step), and the training
  ends as the undisturbed run."""
  from cign_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  overrides = {
      "num_train_steps": 10,
      "checkpoint_every_steps": 1,
      "keep_checkpoints": 2,
  }
  workdir = str(tmp_path / "live")
  proc = start_synthetic_training(workdir, overrides)
  scored = []  # (reported step, the step and weights digest it scored)
  try:
    while proc.poll() is None:
      try:
        report = evaluate.run(
            workdir=workdir,
            out=str(tmp_path / "out"),
            num_per_class=2,
            metrics=["label_accuracy"],
        )
      except checkpoints.CheckpointError:
        time.sleep(0.05)  # no checkpoint yet
        continue
      with np.load(os.path.join(workdir, "eval_samples.npz")) as cache:
        key = json.loads(str(cache["key"]))
        assert int(cache["step"]) == key["step"]
      scored.append((report["step"], key["step"], key["weights"]))
  finally:
    if proc.poll() is None:
      proc.kill()
    stderr = proc.communicate()[1]
  assert proc.returncode == 0, stderr[-3000:]
  assert scored, "no evaluation ran while the training did"
  reference = str(tmp_path / "undisturbed")
  train.train_and_evaluate(
      tiny_config(**dict(overrides, keep_checkpoints=20)),
      reference,
      dataset=_splits(),
  )
  for reported, step, weights in scored:
    assert reported == step
    _, _, variables, _ = checkpoints.load_model(reference, checkpoint=step)
    assert weights == run_dir.tree_digest(variables), step
  _, _, live, live_step = checkpoints.load_model(workdir)
  _, _, undisturbed, step = checkpoints.load_model(reference)
  assert live_step == step == 10
  for a, b in zip(
      jax.tree_util.tree_leaves(live), jax.tree_util.tree_leaves(undisturbed)
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
