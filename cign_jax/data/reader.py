"""Reading the datasets: splits as arrays, and the training batches.

``load_training_data`` gives a training its splits, whatever the source:
MNIST / Fashion-MNIST by name (below), or a source kind of
``cign_jax.data.registry`` ('tfds:NAME', 'folder:PATH', 'npz:PATH'), all as
uint8 arrays in memory.

The prepared datasets are read with ``tfds.data_source(name, data_dir=...,
download=False)``, which needs no TensorFlow. ``load_split`` prepares the
dataset if needed (``cign_jax.data.prepare``), decodes a split once and keeps
the arrays in ``<data_dir>/cign_jax_arrays/`` (and in memory), so later calls
take milliseconds. Images are uint8 (N, H, W, C) (MNIST's (N, 28, 28, 1));
``to_model_range`` scales them to [-1, 1].
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Optional, Tuple
import zipfile

import numpy as np

from cign_jax import utils
from cign_jax.data import IMAGE_SHAPE
from cign_jax.data import NUM_CLASSES
from cign_jax.data import SPLIT_SIZES
from cign_jax.data import check_dataset
from cign_jax.data import source_kind


def _prepare():
  """`cign_jax.data.prepare`, imported on first use: it imports
  tensorflow-datasets, which training on arrays passed in (`dataset=`, e.g.
  on a GPU machine without it) does not need."""
  from cign_jax.data import prepare  # pylint: disable=g-import-not-at-top

  return prepare


def _arrays_path(dataset: str, split: str, data_dir: str) -> str:
  return os.path.join(
      data_dir,
      "cign_jax_arrays",
      dataset,
      _prepare().builder_version(dataset),
      f"{split}.npz",
  )


def _info_fingerprint(dataset: str, data_dir: str) -> str:
  path = os.path.join(
      _prepare().version_dir(dataset, data_dir), "dataset_info.json"
  )
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _decode_split(dataset: str, split: str, data_dir: str):
  # Here, not at the top: training on arrays passed in (`dataset=`) needs
  # neither tensorflow-datasets nor its preparation code.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  source = tfds.data_source(
      dataset, split=split, data_dir=data_dir, download=False
  )
  n = len(source)
  images = np.empty((n, *IMAGE_SHAPE), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    for i, example in enumerate(source.__getitems__(range(start, stop))):
      images[start + i] = example["image"]
      labels[start + i] = example["label"]
  return images, labels


def _damaged_record_error(dataset, split, data_dir, cause) -> ValueError:
  """A prepared split that cannot be read: which files, and how to prepare
  them again."""
  directory = _prepare().version_dir(dataset, data_dir)
  try:
    files = sorted(
        f for f in os.listdir(directory) if f.startswith(f"{dataset}-{split}.")
    )
  except OSError:
    files = []
  named = ", ".join(os.path.join(directory, f) for f in files) or directory
  first = (str(cause).strip().splitlines() or [""])[0][:300]
  return ValueError(
      f"the prepared {dataset} {split} split is damaged ({named}: "
      f"{type(cause).__name__}: {first}); delete {directory} and prepare it "
      f"again with `python -m cign_jax.data prepare {dataset}`"
  )


@functools.lru_cache(maxsize=8)
def _load_split_cached(dataset: str, split: str, data_dir: str):
  path = _arrays_path(dataset, split, data_dir)
  fingerprint = _info_fingerprint(dataset, data_dir)
  images = labels = None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) == fingerprint:
        images, labels = f["images"], f["labels"]
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    pass
  if images is None:
    try:
      images, labels = _decode_split(dataset, split, data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise _damaged_record_error(dataset, split, data_dir, e) from e
    with utils.atomic_write(path) as f:
      np.savez(
          f, images=images, labels=labels, fingerprint=np.array(fingerprint)
      )
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_split(
    dataset: str, split: str, data_dir: str = ""
) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 (N, H, W, C) and labels int32 (N,) of a split.

  MNIST / Fashion-MNIST: prepares the dataset if needed. A source kind
  ('npz:PATH', ...): read with its default options (`load_training_data`
  reads with the config's). The arrays are shared between calls and
  read-only; copy them before changing them.
  """
  if source_kind(dataset) is not None:
    found = _registry().load(dataset, data_dir=data_dir)
    part = found.train if split == "train" else found.test
    if part is None:
      raise ValueError(f"{dataset} has no {split} split")
    return part
  check_dataset(dataset)
  if split not in SPLIT_SIZES:
    raise ValueError(
        f"Unknown split {split!r}: expected one of "
        f"{', '.join(SPLIT_SIZES)}."
    )
  data_dir = _prepare().ensure_prepared(dataset, data_dir)
  return _load_split_cached(dataset, split, os.path.abspath(data_dir))


def to_model_range(images_uint8) -> np.ndarray:
  """uint8 pixels to float32 in [-1, 1]: (x / 255 - 0.5) * 2."""
  x = np.asarray(images_uint8, dtype=np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) * np.float32(2.0)


def _registry():
  """`cign_jax.data.registry`, imported on first use (its sources import
  Pillow or tensorflow-datasets)."""
  from cign_jax.data import registry  # pylint: disable=g-import-not-at-top

  return registry


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """A training's data: the training split and the test split (or None),
  each (images uint8 (N, H, W, C), labels int32 (N,)), the class count
  and the class names (empty when the data names none)."""

  train: Tuple[np.ndarray, np.ndarray]
  test: Optional[Tuple[np.ndarray, np.ndarray]]
  num_classes: int
  class_names: Tuple[str, ...] = ()


def _classes_in(labels) -> int:
  labels = np.asarray(labels)
  return int(labels.max()) + 1 if labels.size else 1


def load_training_data(config, dataset=None, with_test=None) -> DataSplits:
  """The data a training with `config` reads: `dataset` when given (see
  `split_dataset`), else `config.data.dataset`; its test split when
  `with_test`, by default when the run computes a validation loss."""
  if with_test is None:
    with_test = config.eval_num_examples != 0
  if dataset is not None:
    train, test = split_dataset(dataset)
    return DataSplits(train, test, _classes_in(train[1]))
  data = config.data
  if source_kind(data.dataset) is not None:
    found = _registry().load_for_config(config)
    if not with_test:
      found = dataclasses.replace(found, test=None)
    return found
  train = load_split(data.dataset, "train", data.data_dir)
  test = None
  if with_test:
    test = load_split(data.dataset, "test", data.data_dir)
  return DataSplits(train, test, NUM_CLASSES)


class TrainBatches:
  """Shuffled training batches addressed by global step.

  Epoch e = step // steps_per_epoch is a permutation of the examples drawn
  from np.random.default_rng([seed, e]); the last N % batch_size examples of
  each permutation are dropped. The batch of a step depends only on
  (seed, step), so a run resumed at any step sees the same batches as an
  uninterrupted one.
  """

  def __init__(self, images_uint8, labels, batch_size: int, seed: int):
    self.images = np.asarray(images_uint8)
    self.labels = np.asarray(labels)
    if self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {self.images.dtype}.")
    if len(self.images) != len(self.labels):
      raise ValueError(
          f"{len(self.images)} images but {len(self.labels)} " "labels."
      )
    self.num_examples = len(self.labels)
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if self.batch_size > self.num_examples:
      raise ValueError(
          f"batch_size {batch_size} is larger than the "
          f"{self.num_examples} examples."
      )
    if int(seed) < 0:
      raise ValueError(f"seed must be non-negative, got {seed}.")
    self.seed = int(seed)
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._epoch = -1
    self._perm = None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, int(epoch)])
      self._perm = rng.permutation(self.num_examples)
      self._epoch = epoch
    return self._perm

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 in [-1, 1] (B, H, W, C), labels int32 (B,))."""
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    epoch, within = divmod(step, self.steps_per_epoch)
    start = within * self.batch_size
    index = self.permutation(epoch)[start : start + self.batch_size]
    return (
        to_model_range(self.images[index]),
        self.labels[index].astype(np.int32),
    )


def split_dataset(dataset) -> Tuple[Any, Any]:
  """A training's `dataset` argument (`train.train_and_evaluate`) as
  ((images, labels) of the training split, (images, labels) of the test
  split or None)."""
  if isinstance(dataset, dict):
    unknown = sorted(set(dataset) - {"train", "test"})
    if unknown or "train" not in dataset:
      raise ValueError(
          f"dataset: expected a dict with 'train' and optionally "
          f"'test', each (images uint8, labels); got keys "
          f"{sorted(dataset)}"
      )
    return tuple(dataset["train"]), (
        None if dataset.get("test") is None else tuple(dataset["test"])
    )
  if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
    return tuple(dataset), None
  raise ValueError(
      "dataset: expected (images uint8, labels) of the training "
      "split or {'train': (images, labels), 'test': (images, "
      f"labels)}}, got {type(dataset).__name__}"
  )
