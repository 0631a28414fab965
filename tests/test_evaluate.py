"""The evaluate command on samples whose answer is known: real test digits
with their own labels (good FID, high accuracy) and with swapped labels."""

import json
import os

import numpy as np
import pytest

from cign_jax.data import reader
from cign_jax.evaluation import evaluate

N = 70  # per class: above the 64 features of FID64


def _real_samples(tmp_path, swap: bool):
  images, labels = reader.load_split("mnist", "test")
  out_images, out_labels = [], []
  for label in (0, 1):
    idx = np.flatnonzero(labels == label)[-N:]  # not the first N: those are
    out_images.append(reader.to_model_range(images[idx]))  # the reference
    out_labels.append(np.full(N, 1 - label if swap else label))
  path = str(tmp_path / ("swapped.npz" if swap else "real.npz"))
  np.savez(path, images=np.concatenate(out_images),
           labels=np.concatenate(out_labels))
  return path


@pytest.mark.data
def test_real_digits_score_well_and_swapped_labels_do_not(tmp_path):
  good = evaluate.run(samples=_real_samples(tmp_path, swap=False),
                      feature_sizes=[64])
  assert good["label_accuracy"]["accuracy"] >= 0.97
  assert good["fid"]["64"]["max"] < 1.0  # same class: near 0 (fid.md: <0.03)
  with open(tmp_path / "eval.json") as f:
    assert json.load(f)["fid"]["64"]["mean"] == good["fid"]["64"]["mean"]
  assert os.path.isfile(tmp_path / "confusion.png")
  bad = evaluate.run(samples=_real_samples(tmp_path, swap=True),
                     feature_sizes=[64])
  assert bad["label_accuracy"]["accuracy"] <= 0.03
  assert bad["label_accuracy"]["confusion"][0][1] >= N - 2
  assert bad["fid"]["64"]["min"] > 5 * good["fid"]["64"]["max"]
  table = evaluate.format_table(good)
  assert "FID64" in table and "label accuracy" in table


@pytest.mark.data
def test_too_few_samples_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="192"):
    evaluate.run(samples=_real_samples(tmp_path, swap=False),
                 feature_sizes=[192])


def test_bad_samples_file(tmp_path):
  path = str(tmp_path / "x.npz")
  np.savez(path, pictures=np.zeros((2, 28, 28)))
  with pytest.raises(ValueError, match="no 'images'"):
    evaluate.run(samples=path)
