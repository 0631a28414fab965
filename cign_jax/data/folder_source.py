"""'folder:PATH': a folder with one sub-folder of images per class.

As torchvision's ImageFolder: PATH/<class>/<image>, the class names sorted
to labels 0..K-1 (the names travel in config.data.class_names, into the
run's config.json). A sub-folder `test/` (or `val/`) of the same layout,
if present, is the test split; so is PATH/train/ beside it the training
split when present. Every file but hidden ones (a leading '.') must be an
image Pillow reads (PNG, JPEG, ...); one it cannot read is named in the
error.

Images are resized (shorter side) and centre-cropped to options.image_size;
with none set they must all have one size. Images of mixed modes are
converted to options.image_channels (1: grey, 3: RGB); with none set, to
RGB if any image is in colour, else grey.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cign_jax.data import reader
from cign_jax.data import registry

TEST_FOLDERS = ("test", "val")


def _classes(root: str, what: str):
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{what}: {root} is not a folder")
  names = sorted(
      n
      for n in os.listdir(root)
      if not n.startswith(".")
      and n not in TEST_FOLDERS + ("train",)
      and os.path.isdir(os.path.join(root, n))
  )
  return names


def _files(root: str, classes):
  """[(path, label)] of every image under root/<class>/."""
  found = []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    for fname in sorted(os.listdir(folder)):
      path = os.path.join(folder, fname)
      if fname.startswith(".") or os.path.isdir(path):
        continue
      found.append((path, label))
  return found


def _open(path: str, decode: bool = True) -> Image.Image:
  """The image at `path` (decoded, or only its header read)."""
  try:
    image = Image.open(path)
    if decode:
      image.load()
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(
        f"{path} is not an image Pillow can read ({e}); a class folder may "
        "hold only image files (PNG, JPEG, ...)"
    ) from None
  return image


def _read_split(files, size: int, channels: int, what: str):
  images = []
  for path, _ in files:
    image = _open(path)
    if size:
      image = registry.resize_and_crop(image, size)
    images.append(registry.as_array(image, channels))
  shapes = sorted({a.shape for a in images})
  if len(shapes) > 1:
    raise ValueError(
        f"{what}: images of sizes {[s[:2] for s in shapes][:4]}; set "
        "config.data.image_size (or config.model.image_size) to resize and "
        "crop them to one size"
    )
  labels = np.asarray([label for _, label in files], np.int32)
  return np.stack(images), labels


def read(path: str, options: registry.SourceOptions) -> reader.DataSplits:
  what = f"folder:{path}"
  train_root = path
  if os.path.isdir(os.path.join(path, "train")):
    train_root = os.path.join(path, "train")
  classes = _classes(train_root, what)
  if not classes:
    raise ValueError(
        f"{what} has no class sub-folders; expected PATH/<class>/<images> "
        "(one sub-folder per class, as torchvision's ImageFolder)"
    )
  train_files = _files(train_root, classes)
  if not train_files:
    raise ValueError(f"{what}: the class folders hold no files")
  test_files = None
  for name in TEST_FOLDERS:
    test_root = os.path.join(path, name)
    if os.path.isdir(test_root):
      extra = sorted(set(_classes(test_root, what)) - set(classes))
      if extra:
        raise ValueError(
            f"{what}: {test_root} has classes {extra} that the training "
            f"split has not (it has {classes})"
        )
      test_classes = [
          c for c in classes if os.path.isdir(os.path.join(test_root, c))
      ]
      test_files = [
          (p, classes.index(test_classes[label]))
          for p, label in _files(test_root, test_classes)
      ]
      break
  channels = options.image_channels
  if not channels:
    every = train_files + (test_files or [])
    colour = any(registry.is_colour(_open(p, decode=False)) for p, _ in every)
    channels = 3 if colour else 1
  train = _read_split(train_files, options.image_size, channels, what)
  test = None
  if test_files:
    test = _read_split(test_files, options.image_size, channels, what)
    if test[0].shape[1:] != train[0].shape[1:]:
      raise ValueError(
          f"{what}: the test images are {test[0].shape[1:3]}, the training "
          f"images {train[0].shape[1:3]}; set config.data.image_size"
      )
  return reader.DataSplits(train, test, len(classes), tuple(classes))
