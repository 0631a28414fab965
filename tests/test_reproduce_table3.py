"""experiments/reproduce_table3.py end to end in its quick form: trains a
tiny channel_small from an .npz dataset, scores its best checkpoint with the
paper's protocol (FID64 only, few samples), and writes table3.md; a second
invocation resumes (nothing to train) and reuses the evaluation. The
diversity metrics' table is checked on given results (their 2048-d Inception
pass is tested in test_evaluate.py)."""

import importlib.util

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
  # At least 64 test images of every label (FID64 in quick mode); a batch
  # of training images for the classifier trained on this .npz's data.
  np.savez(
      npz,
      train_images=train_x[:128, :, :, 0],
      train_labels=train_y[:128],
      test_images=test_x[:1000],
      test_labels=test_y[:1000],
  )
  root = str(tmp_path / "runs")
  args = [
      "--quick",
      "--configs=channel_small",
      f"--root={root}",
      f"--data_npz={npz}",
      "--diversity=",
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
  assert result["protocol"]["metrics"] == ["fid64", "label_accuracy"]
  table = open(os.path.join(root, "table3.md")).read()
  assert "Quick smoke test" in table
  assert "## Diversity of the same samples" not in table
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


def _script_module():
  spec = importlib.util.spec_from_file_location("reproduce_table3", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_diversity_table_has_the_scored_metrics_of_each_run(tmp_path):
  table3 = _script_module()
  names = table3.metric_names((64,), ["recall", "coverage"])
  assert names == ["fid64", "label_accuracy", "recall", "coverage"]
  with pytest.raises(ValueError, match="--diversity: fid64 not among"):
    table3.metric_names((64,), ["fid64"])
  per_class = {str(c): 0.25 + 0.05 * c for c in range(10)}
  result = {
      "protocol": {"step": 4},
      "checkpoint": "best",
      "fid": {"64": {"mean": 3.0, "min": 1.0, "max": 5.0}},
      "label_accuracy": 0.5,
      "label_accuracy_per_label": [0.5] * 10,
      "metrics": {
          "fid64": {"mean": 3.0, "min": 1.0, "max": 5.0},
          "recall": {
              "mean": 0.475,
              "min": 0.25,
              "max": 0.7,
              "per_class": per_class,
          },
          "coverage": {"mean": 0.0, "min": 0.0, "max": 0.0},
      },
      "grid": str(tmp_path / "a" / "table3_samples.png"),
  }
  rows = [
      {"name": "a", "epochs": 1.0, "target_epochs": "1", "result": result},
      {
          "name": "b",
          "epochs": 0.5,
          "target_epochs": "1",
          "status": "training stopped",
      },
  ]
  path = str(tmp_path / "table3.md")
  table3.write_table(path, rows, quick=True, sizes=(64,))
  lines = open(path).read().splitlines()
  start = lines.index("## Diversity of the same samples")
  header = [l for l in lines[start:] if l.startswith("| run")][0]
  assert header == (
      "| run | recall (k=3) mean / min / max | coverage (k=5) mean / min / "
      "max |"
  )
  body = [l for l in lines[start:] if l.startswith("| a |")]
  assert body == ["| a | 0.4750 / 0.2500 / 0.7000 | 0.0000 / 0.0000 / 0.0000 |"]
  assert not [l for l in lines[start:] if l.startswith("| b |")]
  assert "| b | cign_jax | 0.50 of 1 | training stopped | - | - |" in lines
