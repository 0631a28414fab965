"""Tests of cign_jax.evaluation.classifier.

The classifiers are trained once (about a minute each on 2 CPU cores) and
cached in the default cache dir, where later runs find them.
"""

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

from cign_jax.evaluation import classifier as cls
from cign_jax.data import reader


def test_label_accuracy_hand_example():
  predicted = [0, 1, 1, 2, 2, 2]
  requested = [0, 1, 2, 2, 2, 1]
  result = cls.label_accuracy(predicted, requested, num_classes=4)
  assert result["num_samples"] == 6
  assert result["accuracy"] == pytest.approx(4 / 6)
  assert result["confusion"] == [
      [1, 0, 0, 0],
      [0, 1, 1, 0],
      [0, 1, 2, 0],
      [0, 0, 0, 0],
  ]
  assert result["per_label"][0] == 1.0
  assert result["per_label"][1] == 0.5
  assert result["per_label"][2] == pytest.approx(2 / 3)
  assert result["per_label"][3] is None
  json.dumps(result)  # Plain Python values only.


def test_label_accuracy_rows_and_edges():
  rng = np.random.default_rng(0)
  requested = rng.integers(0, 10, 500)
  predicted = np.where(
      rng.random(500) < 0.7, requested, rng.integers(0, 10, 500)
  )
  result = cls.label_accuracy(predicted, requested)
  confusion = np.array(result["confusion"])
  assert confusion.shape == (10, 10) and confusion.sum() == 500
  np.testing.assert_array_equal(
      confusion.sum(axis=1), np.bincount(requested, minlength=10)
  )
  np.testing.assert_array_equal(
      confusion.sum(axis=0), np.bincount(predicted, minlength=10)
  )
  assert result["accuracy"] == pytest.approx(np.mean(predicted == requested))
  empty = cls.label_accuracy([], [])
  assert empty["num_samples"] == 0 and empty["accuracy"] is None
  assert empty["per_label"] == [None] * 10
  with pytest.raises(ValueError):
    cls.label_accuracy([1, 2], [1])
  with pytest.raises(ValueError):
    cls.label_accuracy([10], [1])


def test_plot_confusion_writes_png(tmp_path):
  confusion = np.diag(np.arange(10) + 5)
  confusion[3, 5] = 4
  path = tmp_path / "sub" / "confusion.png"
  assert cls.plot_confusion(confusion, str(path)) == str(path)
  payload = path.read_bytes()
  assert payload[:8] == b"\x89PNG\r\n\x1a\n"
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(path) as image:
    image.load()
    assert image.format == "PNG" and min(image.size) > 100


def test_concurrent_first_uses_train_once(
    tmp_path, monkeypatch, synthetic_dataset
):
  """Two callers that find no cached classifier at the same time (two test
  workers, two evaluations) train it once: the second waits for the first
  and loads what it saved. The training (counted) is one epoch on the
  synthetic images after a short pause, so that the calls overlap."""
  calls = []
  real_train = cls.train
  images, labels = synthetic_dataset
  tiny = ((np.tile(images, (4, 1, 1, 1)), np.tile(labels, 4)), (images, labels))

  def slow_train(dataset, data_dir="", seed=0, log=print, splits=None):
    del data_dir, log, splits
    calls.append(dataset)
    time.sleep(0.5)
    return real_train(
        dataset, seed=seed, epochs=1, log=lambda *a: None, splits=tiny
    )

  monkeypatch.setattr(cls, "train", slow_train)
  got = [None, None]

  def use(i):
    got[i] = cls.load_or_train("mnist", cache_dir=str(tmp_path))

  threads = [threading.Thread(target=use, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert calls == ["mnist"]
  assert got[0].params_sha256 and got[0].params_sha256 == got[1].params_sha256
  assert cls.load_or_train("mnist", cache_dir=str(tmp_path)).params_sha256 == (
      got[0].params_sha256
  )
  assert calls == ["mnist"]


def test_a_classifier_of_given_data_is_cached_apart(
    tmp_path, synthetic_dataset
):
  """Trained on given images (an .npz's, a subset), the classifier is cached
  under those images' digest, never as the dataset's own."""
  images, labels = synthetic_dataset
  tiny = ((np.tile(images, (2, 1, 1, 1)), np.tile(labels, 2)), (images, labels))
  first = cls.load_or_train("mnist", cache_dir=str(tmp_path), splits=tiny)
  (folder,) = os.listdir(tmp_path)
  assert folder.startswith("mnist-data-")
  again = cls.load_or_train("mnist", cache_dir=str(tmp_path), splits=tiny)
  assert again.params_sha256 == first.params_sha256


@pytest.fixture(scope="module")
def mnist_classifier():
  return cls.load_or_train("mnist")


def _measured_accuracy(classifier, dataset):
  images, labels = reader.load_split(dataset, "test")
  predicted = classifier.predict(reader.to_model_range(images))
  assert predicted.shape == labels.shape and predicted.dtype == np.int32
  return float(np.mean(predicted == labels))


@pytest.mark.data
def test_mnist_classifier_accuracy(mnist_classifier):
  accuracy = _measured_accuracy(mnist_classifier, "mnist")
  assert accuracy >= 0.99
  assert mnist_classifier.test_accuracy == pytest.approx(accuracy, abs=1e-3)
  again = cls.load_or_train("mnist")  # From the cache now.
  assert again.params_sha256 == mnist_classifier.params_sha256
  images, _ = reader.load_split("mnist", "test")
  sample = reader.to_model_range(images[:7])
  np.testing.assert_array_equal(
      again.predict(sample), mnist_classifier.predict(sample)
  )
  np.testing.assert_array_equal(
      again.predict(sample[..., 0]), again.predict(sample)
  )
  assert again.predict(sample[:0]).shape == (0,)


@pytest.mark.data
def test_fashion_mnist_classifier_accuracy():
  classifier = cls.load_or_train("fashion_mnist")
  accuracy = _measured_accuracy(classifier, "fashion_mnist")
  assert accuracy >= 0.90
  assert classifier.test_accuracy == pytest.approx(accuracy, abs=1e-3)


def _copy_cache(mnist_classifier, tmp_path, dataset="mnist"):
  del mnist_classifier  # Only makes sure the cache exists.
  target = tmp_path / "cache" / dataset
  shutil.copytree(f"{cls.default_cache_dir()}/mnist", target)
  return tmp_path / "cache", target


@pytest.mark.data
def test_corrupt_params_are_refused(mnist_classifier, tmp_path):
  root, target = _copy_cache(mnist_classifier, tmp_path)
  params = target / cls.PARAMS_FILE
  payload = bytearray(params.read_bytes())
  payload[len(payload) // 2] ^= 0xFF
  params.write_bytes(bytes(payload))
  with pytest.raises(cls.ClassifierCacheError, match=str(params)):
    cls.load_or_train("mnist", cache_dir=str(root))


@pytest.mark.data
def test_corrupt_info_is_refused(mnist_classifier, tmp_path):
  root, target = _copy_cache(mnist_classifier, tmp_path)
  info = target / cls.INFO_FILE
  info.write_text("{not json")
  with pytest.raises(cls.ClassifierCacheError, match=str(info)):
    cls.load_or_train("mnist", cache_dir=str(root))


@pytest.mark.data
def test_mismatched_cache_is_refused(mnist_classifier, tmp_path):
  root, target = _copy_cache(mnist_classifier, tmp_path, "fashion_mnist")
  with pytest.raises(
      cls.ClassifierCacheError, match=f"{target / cls.INFO_FILE}.*'mnist'"
  ):
    cls.load_or_train("fashion_mnist", cache_dir=str(root))
  info = json.loads((target / cls.INFO_FILE).read_text())
  info.update(dataset="fashion_mnist", arch_version=cls.ARCH_VERSION + 1)
  (target / cls.INFO_FILE).write_text(json.dumps(info))
  with pytest.raises(cls.ClassifierCacheError, match="architecture version"):
    cls.load_or_train("fashion_mnist", cache_dir=str(root))
