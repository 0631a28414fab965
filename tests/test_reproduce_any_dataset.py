"""experiments/reproduce_table3.py on a dataset other than MNIST
(`--dataset`): the quick form end to end on an 'npz:' dataset of RGB 32x32
images in three classes made here (the run takes the data's shape and
classes, its best checkpoint is scored against the data's test split with
the data's own classifier, and a second call trains and scores nothing
again), the refusals of data the configs cannot take, before anything
trains, and the table's paper column. The FID Inception is replaced by a
deterministic stand-in (its weights are a download); the FID arithmetic is
what runs."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import utils
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import fid
from cign_jax.evaluation import in_loop
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce_table3.py")
SAMPLES_PER_CLASS = 64  # the quick form's


@pytest.fixture(name="table3", scope="module")
def _table3():
  spec = importlib.util.spec_from_file_location("reproduce_table3", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_npz(path, size=32, labelled=True, test=True):
  """Three classes of RGB images: 96 to train on and, with `test`, 64 test
  images per class (as many as the quick protocol samples)."""
  images, labels = synthetic.coloured(96, size)
  arrays = {"images": images}
  if labelled:
    arrays["labels"] = labels
  if test:
    test_images, test_labels = synthetic.coloured(
        3 * SAMPLES_PER_CLASS, size, seed=1
    )
    arrays.update(test_images=test_images, test_labels=test_labels)
  np.savez(path, **arrays)
  return str(path)


def test_quick_table3_on_an_npz_dataset(
    table3, inception_stand_in, tmp_path, monkeypatch
):
  path = _write_npz(tmp_path / "colours.npz")
  dataset = f"npz:{path}"
  root = str(tmp_path / "runs")
  out = table3.reproduce(
      root,
      configs=["channel_small"],
      dataset=dataset,
      quick=True,
      diversity=["recall"],
  )
  workdir = os.path.join(root, "channel_small")
  # The run took the data's shape and classes; all wrong labels stay all.
  config = checkpoints.load_config(workdir)
  assert config.data.dataset == dataset
  assert (
      config.model.image_size,
      config.model.image_channels,
      config.model.num_classes,
  ) == (32, 3, 3)
  assert config.loss.num_mismatch_labels == 2
  assert (
      32,
      32,
      3,
  ) in inception_stand_in.shapes  # the samples, RGB as they are

  best = checkpoints.read_best(workdir)
  with open(os.path.join(workdir, "table3_eval.json")) as f:
    result = json.load(f)
  assert best["metric"] == "val_loss"
  assert result["protocol"]["step"] == best["step"]
  assert result["protocol"]["metrics"] == ["fid64", "label_accuracy", "recall"]
  assert result["fid_counts"] == {"0": 64, "1": 64, "2": 64}
  # The protocol's samples (noise seed 0) against the data's own test
  # split, by hand: FID of class 2 and the accuracy of the classifier the
  # library trained for this dataset and shape.
  images, labels, _, _ = evaluate.generate_for_eval(
      workdir, SAMPLES_PER_CLASS, 1, seed=0, checkpoint=best["step"]
  )
  test_images, test_labels = synthetic.coloured(
      3 * SAMPLES_PER_CLASS, 32, seed=1
  )
  want_fid = fid.fid_from_features(
      inception_stand_in(test_images[test_labels == 2], (64,))[64],
      inception_stand_in(np.asarray(images)[labels == 2], (64,))[64],
  )
  assert result["fid"]["64"]["per_class"]["2"] == pytest.approx(
      want_fid, rel=1e-6
  )
  clf = classifier_lib.load(
      dataset, classifier_lib.cache_directory(dataset, (32, 32, 3))
  )
  assert clf.num_classes == 3
  want_accuracy = float(np.mean(clf.predict(images) == labels))
  assert result["label_accuracy"] == pytest.approx(want_accuracy)
  table = open(out).read()
  assert f"Dataset: {dataset}." in table
  assert f"step {best['step']} (best checkpoint by val_loss" in table

  # Done and scored: a second call trains nothing and reuses the scores.
  def no_training(*args, **kwargs):
    raise AssertionError(f"trained again: {args} {kwargs}")

  monkeypatch.setattr(in_loop, "train_and_evaluate", no_training)
  stamp = os.stat(os.path.join(workdir, "table3_eval.json")).st_mtime_ns
  table3.reproduce(
      root,
      configs=["channel_small"],
      dataset=dataset,
      quick=True,
      diversity=["recall"],
  )
  assert os.stat(os.path.join(workdir, "table3_eval.json")).st_mtime_ns == stamp
  assert open(out).read() == table


def test_data_the_configs_cannot_take_is_refused_before_training(
    table3, tmp_path
):
  root = tmp_path / "runs"

  def refused(match, dataset, **kwargs):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      table3.reproduce(str(root), dataset=dataset, quick=True, **kwargs)
    assert not root.exists()  # nothing trained, nothing written

  refused(r"--dataset: Unknown dataset 'cifar'.*npz:PATH", "cifar")
  # Every config is checked before the first trains.
  good = _write_npz(tmp_path / "colours.npz")
  refused(
      r"config 'channel_tiny' not found",
      f"npz:{good}",
      configs=["channel_small", "channel_tiny"],
  )
  unlabelled = _write_npz(
      tmp_path / "unlabelled.npz", labelled=False, test=False
  )
  refused(
      r"channel_small cannot run on --dataset=npz:.*unlabelled.npz: a "
      r"channel-conditioned model needs at least two classes",
      f"npz:{unlabelled}",
  )
  large = _write_npz(tmp_path / "large.npz", size=40)
  refused(
      r"channel_small cannot run on --dataset=npz:.*large.npz: "
      r"config.model.image_size: the 'cign' architecture takes images of "
      r"size 28 or 32 or 64",
      f"npz:{large}",
  )
  no_test = _write_npz(tmp_path / "no_test.npz", test=False)
  refused(r"no test split", f"npz:{no_test}")
  refused(
      r"--data_npz holds MNIST's arrays",
      f"npz:{large}",
      data_npz=str(tmp_path / "mnist.npz"),
  )
  refused(r"--image_size resizes", "fashion_mnist", image_size=32)
  # --image_size makes the 40x40 images 32x32, which the network takes.
  runs = table3.prepare_runs(
      ["filter_small"], True, 0, f"npz:{large}", image_size=32
  )
  assert runs[0].config.model.image_size == 32
  assert runs[0].splits.test[0].shape[1:] == (32, 32, 3)


def test_the_command_names_an_unknown_dataset(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["JAX_COMPILATION_CACHE_DIR"] = utils.enable_compilation_cache()
  done = subprocess.run(
      [
          sys.executable,
          SCRIPT,
          "--quick",
          "--dataset=cifar",
          f"--root={tmp_path / 'runs'}",
      ],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 1
  assert (
      done.stderr.strip()
      .splitlines()[-1]
      .startswith("error: --dataset: Unknown dataset 'cifar'")
  )
  assert not (tmp_path / "runs").exists()


def test_the_paper_column_is_mnist_only(table3, tmp_path):
  rows = [
      {
          "name": "channel_small",
          "epochs": 0.5,
          "target_epochs": "1",
          "status": "training stopped",
      }
  ]
  path = str(tmp_path / "table3.md")
  table3.write_table(path, rows, quick=False, sizes=(64,), dataset="mnist")
  lines = open(path).read().splitlines()
  assert (
      "| channel_small | paper | 50 | best by val loss | "
      "0.6586 / 0.1126 / 2.1216 | - |" in lines
  )
  table3.write_table(path, rows, quick=False, sizes=(64,), dataset="npz:x")
  lines = open(path).read().splitlines()
  assert (
      "| channel_small | paper | - | no paper figure for npz:x (MNIST only) "
      "| - | - |" in lines
  )
  assert not [l for l in lines if "0.6586" in l]
