"""A small synthetic dataset, made here, so the tests need no download.

`dataset()` gives (images uint8 (N, 28, 28, 1), labels int32 (N,)) in the
form of `cign_jax.data.reader.load_split`: ten classes, each a bright bar
at its own place and angle over a dim noise background, so the classes
differ and every pixel value occurs.

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


def load_split(dataset_name: str, split: str, data_dir: str = ""):
  """`reader.load_split`'s signature; the synthetic data for any dataset."""
  del dataset_name, data_dir
  return dataset(seed={"train": 0, "test": 1}[split])


if __name__ == "__main__":
  from cign_jax.commands import train  # pylint: disable=g-import-not-at-top
  from cign_jax.data import reader  # pylint: disable=g-import-not-at-top

  reader.load_split = load_split
  train.run()
