"""A small synthetic dataset, made here, so the tests need no download.

`dataset()` gives (images uint8 (N, 28, 28, 1), labels int32 (N,)) in the
form of `cign_jax.data.reader.load_split`: ten classes, each a bright bar
at its own place and angle over a dim noise background, so the classes
differ and every pixel value occurs. `coloured()` gives RGB images of any
size whose class is their dominant colour; `PooledFeatures` stands in for
the FID Inception's features (whose weights are a download).

`python tests/synthetic.py --config=... --workdir=...` is the train command
(`python -m cign_jax.main`) with `reader.load_split` answering with this
dataset, for the tests that train in a subprocess.
"""

import functools

import numpy as np

NUM_EXAMPLES = 64


@functools.lru_cache(maxsize=4)
def dataset(num_examples: int = NUM_EXAMPLES, seed: int = 0):
  """Read-only images uint8 (N, 28, 28, 1) and labels int32 (N,), 0..9."""
  rs = np.random.RandomState(seed)
  labels = (np.arange(num_examples) % 10).astype(np.int32)
  rs.shuffle(labels)
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32) - 13.5
  images = rs.randint(0, 40, (num_examples, 28, 28)).astype(np.float32)
  for i, label in enumerate(labels):
    angle = np.pi * label / 10
    shift = rs.uniform(-2, 2)
    distance = np.abs(np.cos(angle) * xx + np.sin(angle) * yy - shift)
    images[i] += 215 * np.clip(2.0 - distance, 0, 1)
  images = np.clip(images, 0, 255).astype(np.uint8)[..., None]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def coloured(num: int, size: int, seed: int = 0, num_classes: int = 3):
  """(images uint8 (num, size, size, 3), labels int32): RGB images whose
  class is the dominant colour channel."""
  rs = np.random.RandomState(seed)
  labels = (np.arange(num) % num_classes).astype(np.int32)
  images = rs.randint(0, 60, (num, size, size, 3)).astype(np.uint8)
  for i, label in enumerate(labels):
    images[i, :, :, label] += 180
  return images, labels


def coloured_npz(path, num_train: int, num_test: int, size: int = 32, **extra):
  """Writes an `npz:` dataset of `coloured` images (training seed 0, test
  seed 1) with `extra` arrays; returns ((images, labels), (test_images,
  test_labels))."""
  train = coloured(num_train, size)
  test = coloured(num_test, size, seed=1)
  np.savez(
      path,
      images=train[0],
      labels=train[1],
      test_images=test[0],
      test_labels=test[1],
      **extra,
  )
  return train, test


class PooledFeatures:
  """A stand-in for `fid.extract_features` (the FID Inception's weights are
  a download): deterministic features of any image shape, the 8-bit pixels
  average-pooled to 4x4 per channel, projected and squashed; records the
  shapes it saw."""

  def __init__(self):
    self.proj = np.random.default_rng(7).normal(size=(48, 2048)) / 7
    self.shapes = []

  def __call__(self, images, feature_sizes=(2048,), **kwargs):
    del kwargs
    from cign_jax.evaluation import fid  # pylint: disable=g-import-not-at-top

    pixels = fid.quantize(images).astype(np.float32) / 127.5 - 1
    self.shapes.append(pixels.shape[1:])
    n, h, w, c = pixels.shape
    if c == 1:
      pixels = np.repeat(pixels, 3, axis=-1)
    pooled = pixels.reshape(n, 4, h // 4, 4, w // 4, 3).mean(axis=(2, 4))
    feats = np.tanh(pooled.reshape(n, -1) @ self.proj)
    return {int(s): feats[:, :s] for s in feature_sizes}


def load_split(dataset_name: str, split: str, data_dir: str = ""):
  """`reader.load_split`'s signature; the synthetic data for any dataset."""
  del dataset_name, data_dir
  return dataset(seed={"train": 0, "test": 1}[split])


if __name__ == "__main__":
  from cign_jax.commands import train  # pylint: disable=g-import-not-at-top
  from cign_jax.data import reader  # pylint: disable=g-import-not-at-top

  reader.load_split = load_split
  train.run()
