"""experiments/reproduce_table3.py end to end in its quick form: trains a
tiny channel_small from an .npz dataset, scores its best checkpoint with the
paper's protocol (FID64 only, few samples) and the diversity metrics, and
writes table3.md; a second invocation resumes (nothing to train) and reuses
the evaluation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import utils
from cign_jax.data import reader
from cign_jax.evaluation import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce_table3.py")


def _run(*args):
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = utils.enable_compilation_cache()
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
      [sys.executable, SCRIPT, *args],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )


@pytest.mark.data  # MNIST's test images (64 per label) and the FID weights
def test_quick_reproduction_from_an_npz(tmp_path):
  train_x, train_y = reader.load_split("mnist", "train")
  test_x, test_y = reader.load_split("mnist", "test")
  npz = str(tmp_path / "mnist.npz")
  # At least 64 test images of every label (FID64 in quick mode).
  np.savez(
      npz,
      train_images=train_x[:64, :, :, 0],
      train_labels=train_y[:64],
      test_images=test_x[:1000],
      test_labels=test_y[:1000],
  )
  root = str(tmp_path / "runs")
  args = [
      "--quick",
      "--configs=channel_small",
      f"--root={root}",
      f"--data_npz={npz}",
  ]
  done = _run(*args)
  assert done.returncode == 0, done.stderr[-3000:]
  workdir = os.path.join(root, "channel_small")
  best = checkpoints.read_best(workdir)
  assert best["metric"] == "val_loss"
  with open(os.path.join(workdir, "evaluations.json")) as f:
    history = json.load(f)["history"]
  losses = {r["step"]: r["val_loss"] for r in history}
  assert sorted(losses) == [2, 4]
  assert best["step"] == min(losses, key=losses.get)
  with open(os.path.join(workdir, "table3_eval.json")) as f:
    result = json.load(f)
  assert result["protocol"]["step"] == best["step"]
  assert set(result["fid"]) == {"64"}
  assert set(result["fid_counts"].values()) == {64}
  per_class = result["fid"]["64"]["per_class"]
  assert len(per_class) == 10
  np.testing.assert_allclose(
      result["fid"]["64"]["mean"], np.mean(list(per_class.values())), rtol=1e-9
  )
  assert os.path.isfile(result["grid"])
  # The same samples' diversity metrics, per class, summarised like FID.
  assert result["protocol"]["metrics"] == (
      ["fid64", "label_accuracy"] + list(registry.DIVERSITY)
  )
  for name in registry.DIVERSITY:
    m = result["metrics"][name]
    assert len(m["per_class"]) == 10
    assert m["min"] <= m["mean"] <= m["max"], name
  recall = result["metrics"]["recall"]
  np.testing.assert_allclose(
      recall["mean"], np.mean(list(recall["per_class"].values())), rtol=1e-12
  )
  table = open(os.path.join(root, "table3.md")).read()
  assert "Quick smoke test" in table
  assert "## Diversity of the same samples" in table
  assert "| recall (k=3) mean / min / max |" in table
  assert f"step {best['step']} (best checkpoint by val_loss" in table
  assert "channel_small/table3_samples.png" in table

  again = _run(*args)  # finished run: no training, cached evaluation
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Training" not in again.stderr
  assert open(os.path.join(root, "table3.md")).read() == table


def test_bad_config_name(tmp_path):
  done = _run("--quick", "--configs=channel_tiny", f"--root={tmp_path}")
  assert done.returncode != 0
  assert "config 'channel_tiny' not found" in done.stderr
  assert (
      "channel_small, channel_large, filter_small, filter_large" in done.stderr
  )
