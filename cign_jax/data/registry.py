"""The source kinds: 'KIND:ARGUMENT' names data that a module reads.

A kind is one file, `cign_jax/data/<kind>_source.py`, and its name in
`cign_jax.data.SOURCE_KINDS`. The module defines

  read(argument: str, options: SourceOptions) -> reader.DataSplits

returning uint8 images (N, H, W, C) with C 1 or 3, int32 labels 0..K-1 (all
0 for unlabelled data, K = 1), the test split or None, K and the class
names. What is read is kept in memory, so a training and its evaluation
read a source once.

  npz     `npz_source`: arrays in an .npz ('npz:PATH').
  folder  `folder_source`: a folder of images per class ('folder:PATH').
  tfds    `tfds_source`: a tensorflow-datasets builder ('tfds:NAME').
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import numpy as np
from PIL import Image

from cign_jax.data import SOURCE_KINDS
from cign_jax.data import source_kind


@dataclasses.dataclass(frozen=True)
class SourceOptions:
  """What a source needs besides its argument (config.data / config.model).

  image_size: resize and centre-crop images to this (0: keep their size).
  image_channels: convert images to 1 (grey) or 3 (RGB) channels (0: 3 if
    any image is in colour, else 1).
  data_dir: tensorflow-datasets' data directory ('': its default).
  image_key / label_key: the tfds features of the image and the label
    ('' label: unlabelled, one class).
  """

  image_size: int = 0
  image_channels: int = 0
  data_dir: str = ""
  image_key: str = "image"
  label_key: str = "label"


def options_from_config(config) -> SourceOptions:
  data, model = config.data, config.model
  return SourceOptions(
      image_size=int(data.image_size or model.image_size),
      image_channels=int(model.image_channels),
      data_dir=str(data.data_dir),
      image_key=str(data.image_key),
      label_key=str(data.label_key),
  )


def source_module(kind: str):
  """The module that reads `kind`."""
  if kind not in SOURCE_KINDS:
    raise ValueError(
        f"unknown source kind {kind!r}; expected one of {SOURCE_KINDS}"
    )
  return importlib.import_module(f"cign_jax.data.{kind}_source")


@functools.lru_cache(maxsize=4)
def _read(kind: str, argument: str, options: SourceOptions, stamp):
  del stamp  # part of the cache key only
  found = source_module(kind).read(argument, options)
  for part in (found.train, found.test):
    if part is not None:
      for array in part:
        array.setflags(write=False)
  return found


def _stamp(kind: str, argument: str):
  """A file source's modification time, so that a changed file is read
  again."""
  if kind in ("npz", "folder"):
    try:
      return os.stat(argument).st_mtime_ns
    except OSError:
      return None
  return None


def load(dataset: str, options: SourceOptions = SourceOptions(), **kwargs):
  """The `reader.DataSplits` of 'KIND:ARGUMENT' (`kwargs` replace fields of
  `options`)."""
  found = source_kind(dataset)
  if found is None:
    raise ValueError(
        f"{dataset!r} is not 'KIND:ARGUMENT' with a kind of {SOURCE_KINDS}"
    )
  kind, argument = found
  if kind != "tfds":
    argument = os.path.abspath(os.path.expanduser(argument))
  options = dataclasses.replace(options, **kwargs)
  return _read(kind, argument, options, _stamp(kind, argument))


def load_for_config(config):
  """The data `config.data.dataset` names, read with the config's options."""
  return load(config.data.dataset, options_from_config(config))


# --- Helpers the sources share -----------------------------------------------


def to_channels(image: Image.Image, channels: int) -> Image.Image:
  """`image` as grey ('L', channels 1) or RGB (channels 3)."""
  return image.convert("L" if channels == 1 else "RGB")


def is_colour(image: Image.Image) -> bool:
  return image.mode not in ("1", "L", "LA", "I", "I;16", "F")


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
  """Scales the shorter side to `size` (bicubic), then crops the centre
  size x size (torchvision's Resize(size) and CenterCrop(size))."""
  w, h = image.size
  if (w, h) == (size, size):
    return image
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return image.crop((left, top, left + size, top + size))


def as_array(image: Image.Image, channels: int) -> np.ndarray:
  """uint8 (H, W, channels)."""
  array = np.asarray(to_channels(image, channels), np.uint8)
  return array.reshape(array.shape[0], array.shape[1], channels)


def check_labels(labels, num_classes: int, what: str) -> np.ndarray:
  """int32 labels in 0..num_classes-1, or a ValueError naming `what`."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{what}: labels must be a vector, got {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    if labels.dtype == bool:
      labels = labels.astype(np.int32)
    else:
      raise ValueError(
          f"{what}: labels must be integers 0..K-1, got dtype {labels.dtype}"
      )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(
        f"{what}: label {bad} is outside 0..{num_classes - 1} (the "
        f"{num_classes} classes)"
    )
  return labels.astype(np.int32)
