"""Evaluation on data other than MNIST: the label classifier for any
labelled dataset (its input shape the data's, cached per dataset and
shape), and `evaluate.run` on RGB runs, per class and over the whole set.
FID's Inception is replaced by a deterministic stand-in (its weights are a
download); the FID arithmetic on RGB images is what runs."""

import os

import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import train
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import fid
from cign_jax.evaluation import in_loop
from conftest import tiny_config
import synthetic


def test_classifier_for_rgb_data_learns_and_is_cached_per_shape(
    inception_stand_in,
):
  del inception_stand_in
  train_split = synthetic.coloured(300, 32)
  test_split = synthetic.coloured(60, 32, seed=1)
  clf, info = classifier_lib.train(
      "npz:/data/colours.npz",
      splits=(train_split, test_split),
      epochs=20,
      log=lambda _: None,
  )
  assert clf.image_shape == (32, 32, 3) and clf.num_classes == 3
  assert info["image_shape"] == [32, 32, 3] and info["num_classes"] == 3
  # Colour decides the class: the net must get the held-out images right.
  assert clf.test_accuracy >= 0.95
  directory = classifier_lib.cache_directory(
      "npz:/data/colours.npz", (32, 32, 3)
  )
  assert directory.endswith(os.path.join("32x32x3"))
  classifier_lib.save(clf, info, directory)
  loaded = classifier_lib.load("npz:/data/colours.npz", directory)
  x = test_split[0].astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(loaded.predict(x), clf.predict(x))
  with pytest.raises(ValueError, match=r"expected images of shape \(N, 32"):
    loaded.predict(np.zeros((2, 28, 28, 1), np.float32))
  # Another shape of the same dataset, and MNIST, have their own folders.
  assert (
      classifier_lib.cache_directory("npz:/data/colours.npz", (64, 64, 3))
      != directory
  )
  assert classifier_lib.cache_directory("mnist", (28, 28, 1)) == os.path.join(
      classifier_lib.default_cache_dir(), "mnist"
  )


def _write_npz(tmp_path, num=90):
  path = tmp_path / "colours.npz"
  _, test = synthetic.coloured_npz(path, num, 210)
  return path, test


def _train_run(tmp_path, conditioning):
  path, test = _write_npz(tmp_path)
  config = tiny_config(
      **{
          "data.dataset": f"npz:{path}",
          "model.image_size": 0,
          "model.image_channels": 0,
          "model.num_classes": 0,
          "model.conditioning": conditioning,
          "loss.num_mismatch_labels": 1 if conditioning != "none" else 0,
          "num_train_steps": 2,
      }
  )
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  return workdir, test


def test_evaluate_a_conditional_rgb_run_per_class(inception_stand_in, tmp_path):
  workdir, (test_images, test_labels) = _train_run(tmp_path, "channel")
  report = evaluate.run(
      workdir, num_per_class=66, metrics=["fid64", "label_accuracy"]
  )
  # Every class: its 66 samples against as many of its 70 test images.
  assert report["counts"] == {"0": 66, "1": 66, "2": 66}
  assert set(report["metrics"]["fid64"]["per_class"]) == {"0", "1", "2"}
  assert all(
      (32, 32, 3) == s for s in inception_stand_in.shapes
  )  # RGB, as it is
  # The label accuracy is the cached classifier's verdict on the samples.
  clf = classifier_lib.load(
      f"npz:{tmp_path / 'colours.npz'}",
      classifier_lib.cache_directory(
          f"npz:{tmp_path / 'colours.npz'}", (32, 32, 3)
      ),
  )
  with np.load(os.path.join(workdir, "eval_samples.npz")) as f:
    images, labels = f["images"], f["labels"]
  want = float(np.mean(clf.predict(images) == labels))
  assert report["label_accuracy"]["accuracy"] == pytest.approx(want)
  # FID per class by hand from the stand-in's features.
  real = test_images[test_labels == 1][:66]
  gen = images[labels == 1][:66]
  feats = fid.extract_features
  want_fid = fid.fid_from_features(
      feats(real, (64,))[64], feats(gen, (64,))[64]
  )
  got = report["metrics"]["fid64"]["per_class"]["1"]
  assert got == pytest.approx(want_fid, rel=1e-6)


def test_evaluate_an_unconditional_rgb_run_over_the_whole_set(
    inception_stand_in, tmp_path
):
  del inception_stand_in
  workdir, (test_images, _) = _train_run(tmp_path, "none")
  _, model, _, _ = checkpoints.load_model(workdir)
  assert model.conditioning == "none"
  report = evaluate.run(workdir, num_per_class=100, metrics=["fid64"])
  # One class: 100 samples against the first 100 of all the test images,
  # whatever their labels.
  assert report["counts"] == {"0": 100}
  with np.load(os.path.join(workdir, "eval_samples.npz")) as f:
    images = f["images"]
  assert images.shape == (100, 32, 32, 3)
  feats = fid.extract_features
  want = fid.fid_from_features(
      feats(test_images[:100], (64,))[64], feats(images, (64,))[64]
  )
  assert report["metrics"]["fid64"]["mean"] == pytest.approx(want, rel=1e-6)
  names, _ = evaluate.default_metrics(label_accuracy=False)
  assert "label_accuracy" not in names and "fid64" in names


def test_in_loop_fid_on_an_rgb_source(inception_stand_in, tmp_path):
  path, _ = _write_npz(tmp_path)
  config = tiny_config(
      **{
          "data.dataset": f"npz:{path}",
          "model.image_size": 0,
          "model.image_channels": 0,
          "model.num_classes": 0,
          "loss.num_mismatch_labels": 1,
          "num_train_steps": 2,
          "eval_every_epochs": 0,
          "eval_every_steps": 2,
          "eval_num_examples": 0,
          "eval_samples_per_label": 64,
          "eval_metrics": ("fid64",),
          "best_metric": "fid64",
      }
  )
  workdir = str(tmp_path / "run")
  in_loop.train_and_evaluate(config, workdir)
  best = checkpoints.read_best(workdir)
  assert best["step"] == 2 and best["metric"] == "fid64"
  assert np.isfinite(best["value"])
  assert (
      32,
      32,
      3,
  ) in inception_stand_in.shapes  # the samples, RGB as they are
