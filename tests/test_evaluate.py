"""The evaluate command on samples whose answer is known: real test digits
with their own labels (good FID, high accuracy, as varied as the data),
with swapped labels, and one digit repeated (collapse: FID still small,
recall and coverage near 0, all near-duplicates)."""

import json
import os

import numpy as np
import pytest

from cign_jax.data import reader
from cign_jax.evaluation import evaluate

N = 70  # per class: above the 64 features of FID64


def _real_samples(tmp_path, swap: bool, collapse: bool = False):
  images, labels = reader.load_split("mnist", "test")
  out_images, out_labels = [], []
  for label in (0, 1):
    idx = np.flatnonzero(labels == label)[-N:]  # not the first N: those are
    if collapse:  # the reference
      idx = np.repeat(idx[:1], N)
    out_images.append(reader.to_model_range(images[idx]))
    out_labels.append(np.full(N, 1 - label if swap else label))
  path = str(
      tmp_path
      / ("swapped.npz" if swap else "collapsed.npz" if collapse else "real.npz")
  )
  np.savez(
      path, images=np.concatenate(out_images), labels=np.concatenate(out_labels)
  )
  return path


@pytest.mark.data
def test_real_digits_score_well_and_swapped_labels_do_not(tmp_path):
  good = evaluate.run(
      samples=_real_samples(tmp_path, swap=False), feature_sizes=[64]
  )
  assert good["label_accuracy"]["accuracy"] >= 0.97
  assert good["fid"]["64"]["max"] < 1.0  # same class: near 0 (fid.md: <0.03)
  with open(tmp_path / "eval.json") as f:
    assert json.load(f)["fid"]["64"]["mean"] == good["fid"]["64"]["mean"]
  assert os.path.isfile(tmp_path / "confusion.png")
  # Other digits of the class: about as precise, covering and varied as
  # the reference itself, no near-duplicates, KID about 0.
  m = good["metrics"]
  assert m["precision"]["min"] >= 0.6 and m["recall"]["min"] >= 0.6
  assert m["coverage"]["min"] >= 0.85
  assert 0.8 <= m["spread"]["min"] <= m["spread"]["max"] <= 1.25
  assert m["duplicates"]["max"] <= 0.05
  assert abs(m["kid"]["mean"]) < 0.01
  # Swapped labels: FID and accuracy only (the 2048-d pass is the costly
  # part; precision and coverage of another class's images are checked on
  # features in test_feature_metrics.py).
  bad = evaluate.run(
      samples=_real_samples(tmp_path, swap=True),
      metrics=["fid64", "label_accuracy"],
  )
  assert bad["label_accuracy"]["accuracy"] <= 0.03
  assert bad["label_accuracy"]["confusion"][0][1] >= N - 2
  assert bad["fid"]["64"]["min"] > 5 * good["fid"]["64"]["max"]
  table = evaluate.format_table(good)
  assert "FID64" in table and "label accuracy" in table
  assert "| recall (k=3) |" in table and "| near-duplicates |" in table


@pytest.mark.data
def test_collapse_is_seen(tmp_path):
  """One digit repeated per class: FID64 stays below that of the wrong
  class, while recall, coverage and the near-duplicate share say it."""
  report = evaluate.run(
      samples=_real_samples(tmp_path, swap=False, collapse=True),
      metrics=["fid64", "recall", "coverage", "spread", "duplicates"],
  )
  m = report["metrics"]
  assert m["fid64"]["max"] < 1.0
  assert m["recall"]["max"] <= 1 / N
  assert m["coverage"]["max"] <= 0.1
  assert m["spread"]["max"] < 0.01
  assert m["duplicates"]["min"] == 1.0
  assert "label_accuracy" not in report  # not asked for: no classifier
  assert not os.path.exists(tmp_path / "confusion.png")


@pytest.mark.data
def test_too_few_samples_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="192"):
    evaluate.run(
        samples=_real_samples(tmp_path, swap=False), feature_sizes=[192]
    )


def test_bad_samples_file(tmp_path):
  path = str(tmp_path / "x.npz")
  np.savez(path, pictures=np.zeros((2, 28, 28)))
  with pytest.raises(ValueError, match="no 'images'"):
    evaluate.run(samples=path)
