"""What each metric of `cign_jax.evaluation`'s registry costs, per evaluation.

  python benchmarks/metric_cost.py [--per_class=1000] [--classes=10]
      [--inception_images=160] [--train_per_class=6000]

Two parts (compilation excluded: the Inception pass is warmed up on one
image first):

1. The Inception pass, the bulk of any feature metric: seconds per image up
   to the 64, 768 and 2048 taps on `inception_images` MNIST test digits,
   and what that makes for `per_class` x `classes` generated images (the
   real ones are extracted once and cached on disk).
2. Each metric's own arithmetic from features, `per_class` per class and
   side for `classes` classes (random non-negative features of the taps'
   sizes: the cost of dense products does not depend on the values), alone
   and all the diversity metrics together (sharing the class's inner
   products); memorisation against `train_per_class` training features a
   class; label accuracy is the classifier on `per_class` x `classes`
   images.
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from cign_jax import utils
from cign_jax.data import reader
from cign_jax.evaluation import classifier
from cign_jax.evaluation import fid
from cign_jax.evaluation import registry
from cign_jax.evaluation import scoring

# pylint: enable=g-import-not-at-top

flags.DEFINE_integer("per_class", 1000, "Samples per class and side.")
flags.DEFINE_integer("classes", 10, "Classes.")
flags.DEFINE_integer(
    "inception_images",
    160,
    "Images timed through the " "Inception network per tap.",
)
flags.DEFINE_integer(
    "train_per_class", 6000, "Training features per class " "(memorisation)."
)
FLAGS = flags.FLAGS


def _time(fn, warm_up=None):
  """Seconds of fn(); `warm_up` (a cheaper call compiling the same
  program) first."""
  if warm_up is not None:
    warm_up()
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _class_data(rng, n, n_train, sizes):
  feats = {
      side: {s: np.abs(rng.normal(size=(n, s))) for s in sizes}
      for side in ("fake", "real")
  }
  if n_train:
    feats["train"] = {2048: np.abs(rng.normal(size=(n_train, 2048)))}
  labels = np.zeros(n, np.int32)
  return scoring.ClassData(0, n, None, None, labels, feats)


def _metric_seconds(names, n, n_train=0):
  """Seconds of `compute` for one class with the named metrics (one
  ClassData: shared products), timed on a fresh class each time."""
  rng = np.random.default_rng(0)
  sizes = registry.needs(names).features or (2048,)
  groups = registry.group(names).values()

  def run():
    data = _class_data(rng, n, n_train, sizes)
    for m, requested in groups:
      m.compute(data, requested)

  return _time(run)


def main(_):
  utils.enable_compilation_cache()
  n, k = FLAGS.per_class, FLAGS.classes
  images, _ = reader.load_split("mnist", "test")
  sample = images[: FLAGS.inception_images]
  print(
      f"Inception pass ({len(sample)} images timed per tap, batch "
      f"{fid.get_extractor().batch_size}):"
  )
  for tap in (64, 768, 2048):
    seconds = _time(
        lambda t=tap: fid.extract_features(sample, (t,), progress=False),
        lambda t=tap: fid.extract_features(sample[:1], (t,), progress=False),
    ) / len(sample)
    print(
        f"  up to {tap:4d}: {seconds * 1e3:7.1f} ms/image; {n * k} "
        f"generated images: {seconds * n * k:8.0f} s"
    )
  print(
      f"\nArithmetic from features, {n} per class and side, {k} classes "
      "(all classes):"
  )
  rows = [
      ("fid64", ["fid64"]),
      ("fid192", ["fid192"]),
      ("fid768", ["fid768"]),
      ("precision, recall (k=3)", ["precision", "recall"]),
      ("density, coverage (k=5)", ["density", "coverage"]),
      ("kid, kid_std", ["kid", "kid_std"]),
      ("spread", ["spread"]),
      ("duplicates", ["duplicates"]),
      ("all of registry.DIVERSITY together", list(registry.DIVERSITY)),
  ]
  for title, names in rows:
    if n < registry.needs(names).min_samples:
      continue
    print(f"  {title:38s} {k * _metric_seconds(names, n):8.1f} s")
  if FLAGS.train_per_class:
    seconds = _metric_seconds(
        ["memorisation_ratio", "memorised"], n, FLAGS.train_per_class
    )
    title = f"memorisation ({FLAGS.train_per_class} train/class)"
    print(
        f"  {title:38s} {k * seconds:8.1f} s (plus the Inception pass over "
        f"{FLAGS.train_per_class * k} training images, cached)"
    )
  clf = classifier.load_or_train("mnist")
  gen = reader.to_model_range(np.resize(images, (n * k,) + images.shape[1:]))
  print(
      f"  {'label accuracy (classifier)':38s} "
      f"{_time(lambda: clf.predict(gen), lambda: clf.predict(gen[:1])):8.1f}"
      " s"
  )


if __name__ == "__main__":
  app.run(main)
