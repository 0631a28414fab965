"""Checks of what callers pass at the API boundary: labels, images and
finite values; and the parameter count."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np


def check_labels(labels, num_classes: int, num_images: Optional[int] = None):
  """Validates concrete labels at an API boundary; returns them as int32."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a vector, got shape {labels.shape}")
  if num_images is not None and labels.shape[0] != num_images:
    raise ValueError(f"got {labels.shape[0]} labels for {num_images} images")
  if labels.dtype == bool or not (
      np.issubdtype(labels.dtype, np.integer)
      or np.issubdtype(labels.dtype, np.floating)
  ):
    # Booleans and strings are not class indices, though numpy would cast.
    raise ValueError(
        f"labels must be integer class indices, got an array of "
        f"dtype {labels.dtype}"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    if labels.size and not np.all(labels == np.round(labels)):
      raise ValueError("labels must be integers")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(
        f"label out of range: {bad} (labels must be in 0.."
        f"{num_classes - 1})"
    )
  return labels.astype(np.int32)


def check_finite(array, what: str):
  """Raises ValueError when `array` holds NaN or Inf, naming how many and
  the first position.

  Args:
    array: a numpy-convertible array.
    what: what the array is, for the message (e.g. "--inputs images").
  """
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.floating):
    return
  bad = ~np.isfinite(a)
  count = int(bad.sum())
  if count:
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{what} hold {count} non-finite value(s) (NaN or Inf) of {a.size}, "
        f"the first at index {first} (value {a[first]})"
    )


def check_input_shape(x, image_size: int, image_channels: int):
  """A network's input: (B, image_size, image_size, image_channels)."""
  want = (image_size, image_size, image_channels)
  if x.ndim != 4 or tuple(x.shape[1:]) != want:
    raise ValueError(
        f"expected images of shape (B, {image_size}, {image_size}, "
        f"{image_channels}), got {tuple(x.shape)}"
    )


def check_images(images, image_channels: int = 1, image_size: int = 28):
  """Validates images in [-1, 1] at an API boundary: (N, S, S[, C])."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3 and image_channels == 1:
    images = images[..., None]
  s = image_size
  if images.ndim != 4 or images.shape[1:] != (s, s, image_channels):
    grey = f"(N, {s}, {s}) or " if image_channels == 1 else ""
    raise ValueError(
        f"wrong image shape {images.shape}: expected {grey}"
        f"(N, {s}, {s}, {image_channels})"
    )
  if images.shape[0] == 0:
    raise ValueError(
        f"no images: got shape {images.shape}; expected at least " "one"
    )
  check_finite(images, "the images")
  if images.size and (images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6):
    raise ValueError(
        f"images must be in [-1, 1], got range [{images.min()}, "
        f"{images.max()}]"
    )
  return images


def count_parameters(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
