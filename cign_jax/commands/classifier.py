"""Trains (or loads from the cache) the label-accuracy classifier.

python -m cign_jax.classifier train --dataset=mnist|fashion_mnist|KIND:ARG
    [--data_dir=] [--cache_dir=] [--seed=0] [--retrain]

KIND:ARG is a source kind ('tfds:NAME', 'folder:PATH', 'npz:PATH') read with
its default options (images at their own size).
"""

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
        "--dataset=mnist|fashion_mnist|KIND:ARG [--data_dir=] "
        "[--cache_dir=] [--seed=0] [--retrain]"
    )
  data.check_dataset_name(FLAGS.dataset)
  start = time.time()
  classifier = classifier_lib.load_or_train(
      FLAGS.dataset,
      FLAGS.data_dir,
      FLAGS.cache_dir,
      seed=FLAGS.seed,
      retrain=FLAGS.retrain,
  )
  directory = classifier_lib.cache_directory(
      FLAGS.dataset, classifier.image_shape, FLAGS.cache_dir
  )
  print(
      f"{FLAGS.dataset} classifier test accuracy: "
      f"{classifier.test_accuracy:.4f} ({time.time() - start:.0f} s; "
      f"cached in {directory})"
  )


def _define_flags():
  flags.DEFINE_string(
      "dataset",
      "mnist",
      f"Dataset: one of {', '.join(data.DATASETS)}, or "
      f"{', '.join(k + ':...' for k in data.SOURCE_KINDS)}.",
  )
  flags.DEFINE_string("data_dir", "", "tfds data dir ('' = default).")
  flags.DEFINE_string(
      "cache_dir", "", "Classifier cache root ('' = <cache_root>/classifier)."
  )
  flags.DEFINE_integer("seed", 0, "Training seed.")
  flags.DEFINE_bool("retrain", False, "Train even if a cached one exists.")


def run():
  _define_flags()
  commands.run(main, __name__)
