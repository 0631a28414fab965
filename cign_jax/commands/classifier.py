"""Trains (or loads from the cache) the label-accuracy classifier.

python -m cign_jax.classifier train --dataset=mnist|fashion_mnist
    [--data_dir=] [--cache_dir=] [--seed=0] [--retrain]
"""

import os
import time

from absl import app
from absl import flags

from cign_jax import commands
from cign_jax import data
from cign_jax.evaluation import classifier as classifier_lib

FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2 or argv[1] != "train":
    raise app.UsageError(
        "usage: python -m cign_jax.classifier train "
        "--dataset=mnist|fashion_mnist [--data_dir=] "
        "[--cache_dir=] [--seed=0] [--retrain]"
    )
  start = time.time()
  classifier = classifier_lib.load_or_train(
      FLAGS.dataset,
      FLAGS.data_dir,
      FLAGS.cache_dir,
      seed=FLAGS.seed,
      retrain=FLAGS.retrain,
  )
  directory = os.path.join(
      classifier_lib.default_cache_dir(FLAGS.cache_dir), FLAGS.dataset
  )
  print(
      f"{FLAGS.dataset} classifier test accuracy: "
      f"{classifier.test_accuracy:.4f} ({time.time() - start:.0f} s; "
      f"cached in {directory})"
  )


def _define_flags():
  flags.DEFINE_enum("dataset", "mnist", list(data.DATASETS), "Dataset.")
  flags.DEFINE_string("data_dir", "", "tfds data dir ('' = default).")
  flags.DEFINE_string(
      "cache_dir", "", "Classifier cache root ('' = <cache_root>/classifier)."
  )
  flags.DEFINE_integer("seed", 0, "Training seed.")
  flags.DEFINE_bool("retrain", False, "Train even if a cached one exists.")


def run():
  _define_flags()
  commands.run(main, __name__)
