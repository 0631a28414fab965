"""'tfds:NAME': a tensorflow-datasets builder, read with tfds.data_source.

The builder's image feature (options.image_key) and label feature
(options.label_key: a ClassLabel, or a boolean such as one of celeb_a's
attributes, 'attributes/Male', giving two classes; '' for none: unlabelled,
one class). Splits: 'train', and 'test' (else 'validation') as the test
split. The dataset must be prepared in the array_record format (what
tfds.data_source reads); one that is not is prepared here when tfds can
download it, and otherwise the error names tfds' manual directory and what
goes there. Images are resized and centre-cropped to options.image_size
when theirs differs.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cign_jax.data import reader
from cign_jax.data import registry

_CHUNK = 1024


def _default_data_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  env = os.environ.get("TFDS_DATA_DIR", "")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def _feature(features, key: str, what: str):
  node = features
  for part in key.split("/"):
    try:
      node = node[part]
    except (KeyError, TypeError):
      raise ValueError(
          f"{what} has no feature {key!r}; its features: "
          f"{sorted(features.keys())} (set config.data.image_key / "
          "config.data.label_key)"
      ) from None
  return node


def _value(example, key: str):
  for part in key.split("/"):
    example = example[part]
  return example


def _label_classes(feature, key: str, what: str):
  """(K, names) of a label feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if isinstance(feature, tfds.features.ClassLabel):
    return feature.num_classes, tuple(feature.names)
  if np.dtype(getattr(feature, "np_dtype", None) or np.float32) == np.bool_:
    leaf = key.split("/")[-1]
    return 2, (f"not {leaf}", leaf)
  raise ValueError(
      f"{what}: the feature {key!r} is neither a class label nor a boolean; "
      "set config.data.label_key to one that is, or to '' for unlabelled "
      "data"
  )


def _prepared_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  what = f"tfds:{name}"
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    first = str(e).strip().splitlines()[0]
    raise ValueError(f"{what}: no such tfds builder ({first})") from None
  if builder.is_prepared():
    return builder
  manual_dir = os.path.join(data_dir, "downloads", "manual")
  instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if instructions:
    raise ValueError(
        f"{what} is not prepared in {data_dir} and needs files that tfds "
        f"cannot download: put them in tfds' manual directory {manual_dir} "
        f"({' '.join(str(instructions).split())}), then run the training "
        "again"
    )
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise ValueError(
        f"{what} is not prepared in {data_dir} and tfds could not download "
        f"and prepare it ({type(e).__name__}: {first}). Prepare it where "
        f"the download works, as array_record (tfds.builder({name!r}, "
        "file_format='array_record').download_and_prepare()), and copy the "
        f"{name}/ folder into {data_dir}; a builder that reads files you "
        f"fetch yourself takes them from tfds' manual directory {manual_dir}"
    ) from None
  return builder


def _read_split(source, options, channels, has_label, what):
  n = len(source)
  images, labels = [], np.zeros((n,), np.int32)
  for start in range(0, n, _CHUNK):
    stop = min(n, start + _CHUNK)
    for i, example in enumerate(source.__getitems__(range(start, stop))):
      image = np.asarray(_value(example, options.image_key), np.uint8)
      if image.ndim == 2:
        image = image[..., None]
      size = options.image_size
      if image.shape[-1] != channels or (
          size and image.shape[:2] != (size, size)
      ):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if size:
          pil = registry.resize_and_crop(pil, size)
        image = registry.as_array(pil, channels)
      images.append(image)
      if has_label:
        labels[start + i] = int(_value(example, options.label_key))
  shapes = sorted({a.shape for a in images})
  if len(shapes) > 1:
    raise ValueError(
        f"{what}: images of shapes {shapes[:4]}; set config.data.image_size "
        "to resize and crop them to one size"
    )
  return np.stack(images), labels


def read(name: str, options: registry.SourceOptions) -> reader.DataSplits:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  what = f"tfds:{name}"
  data_dir = _default_data_dir(options.data_dir)
  builder = _prepared_builder(name, data_dir)
  features = builder.info.features
  image_feature = _feature(features, options.image_key, what)
  has_label = bool(options.label_key)
  num_classes, names = 1, ()
  if has_label:
    num_classes, names = _label_classes(
        _feature(features, options.label_key, what), options.label_key, what
    )
  channels = options.image_channels
  if not channels:
    shape = getattr(image_feature, "shape", (None, None, 3))
    channels = 1 if shape[-1] == 1 else 3
  splits = builder.info.splits
  test_split = next((s for s in ("test", "validation") if s in splits), None)
  parts = {}
  for role, split in (("train", "train"), ("test", test_split)):
    if split is None or split not in splits:
      parts[role] = None
      continue
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False
    )
    parts[role] = _read_split(source, options, channels, has_label, what)
  if parts["train"] is None:
    raise ValueError(
        f"{what} has no 'train' split (it has {sorted(splits.keys())})"
    )
  return reader.DataSplits(parts["train"], parts["test"], num_classes, names)
