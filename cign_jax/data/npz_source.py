"""'npz:PATH': arrays in an .npz file.

`images`: uint8 (N, H, W) or (N, H, W, C) with C 1 or 3; `labels`: integers
0..K-1 (N,) (without them the data are unlabelled: one class); optional
`test_images` / `test_labels`, the test split; optional `class_names`
(K strings), which also fixes K (else K = the largest label + 1). Images are
resized and centre-cropped when options.image_size differs from theirs.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cign_jax.data import reader
from cign_jax.data import registry


def _images(array, what: str, options: registry.SourceOptions) -> np.ndarray:
  images = np.asarray(array)
  if images.dtype != np.uint8:
    raise ValueError(
        f"{what} must be uint8 pixels 0..255, got dtype {images.dtype}"
    )
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(
        f"{what} must be (N, H, W) or (N, H, W, C) with C 1 or 3 and N >= 1, "
        f"got shape {images.shape}"
    )
  channels = options.image_channels or images.shape[-1]
  size = options.image_size
  if (
      images.shape[-1] == channels
      and size in (0, images.shape[1])
      and (images.shape[1] == images.shape[2])
  ):
    return images
  out = []
  for image in images:
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if size:
      pil = registry.resize_and_crop(pil, size)
    out.append(registry.as_array(pil, channels))
  return np.stack(out)


def read(path: str, options: registry.SourceOptions) -> reader.DataSplits:
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"npz:{path}: no such file; expected an .npz with 'images' and "
        "'labels'"
    )
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {name: f[name] for name in f.files}
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(
        f"npz:{path} cannot be read as an .npz ({e}); expected one written by "
        "numpy.savez with 'images' and 'labels'"
    ) from None
  if "images" not in arrays:
    raise ValueError(
        f"npz:{path} has no 'images' array (it has {sorted(arrays)}); "
        "expected 'images', 'labels' and optionally 'test_images', "
        "'test_labels', 'class_names'"
    )
  names = tuple(str(n) for n in arrays.get("class_names", ()))
  every = [arrays.get("labels"), arrays.get("test_labels")]
  every = [np.asarray(x) for x in every if x is not None and np.size(x)]
  if names:
    num_classes = len(names)
  elif every:
    num_classes = int(max(int(np.max(x)) for x in every)) + 1
  else:
    num_classes = 1

  def split(images_key, labels_key):
    images = _images(arrays[images_key], f"npz:{path} {images_key}", options)
    if labels_key in arrays:
      labels = registry.check_labels(
          arrays[labels_key], num_classes, f"npz:{path} {labels_key}"
      )
    elif images_key == "images" and "test_labels" not in arrays:
      labels = np.zeros((len(images),), np.int32)
    else:
      raise ValueError(f"npz:{path} has {images_key} but no {labels_key}")
    if len(labels) != len(images):
      raise ValueError(
          f"npz:{path}: {len(images)} {images_key} but {len(labels)} "
          f"{labels_key}"
      )
    return images, labels

  train = split("images", "labels")
  test = (
      split("test_images", "test_labels") if "test_images" in arrays else None
  )
  if test is not None and test[0].shape[1:] != train[0].shape[1:]:
    raise ValueError(
        f"npz:{path}: test_images are {test[0].shape[1:]}, images "
        f"{train[0].shape[1:]}; they must have one shape"
    )
  return reader.DataSplits(train, test, num_classes, names)
