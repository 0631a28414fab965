"""Label accuracy and sample spread of every checkpoint of a run.

  python experiments/score_checkpoints.py --workdir=DIR [--num_per_label=100]

For each stored checkpoint: `num_per_label` samples per label (one noise
draw shared by all checkpoints), the cached MNIST classifier's accuracy
against the requested labels (overall and per label), and the spread of the
samples within a label (mean per-pixel standard deviation over the label's
samples, averaged over labels; 0 means every noise gives the same image).
Used to tune `configs/quick.py` by numbers rather than by eye.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cign_jax import checkpoints, sampling  # pylint: disable=g-import-not-at-top
from cign_jax.evaluation import classifier  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_integer("num_per_label", 100, "Samples per label.")
flags.DEFINE_integer("seed", 0, "Seed of the noise.")
FLAGS = flags.FLAGS


def score(model, variables, clf, num_per_label, seed):
  labels = np.repeat(np.arange(model.num_classes), num_per_label)
  images = np.asarray(
      sampling.generate(model, variables, labels, jax.random.key(seed))
  )
  result = classifier.label_accuracy(
      clf.predict(images), labels, model.num_classes
  )
  spread = float(
      np.mean(
          [
              images[labels == c].std(axis=0).mean()
              for c in range(model.num_classes)
          ]
      )
  )
  return result, spread


def main(_):
  steps = sorted(
      int(d)
      for d in os.listdir(
          os.path.join(FLAGS.workdir, checkpoints.CHECKPOINT_DIR)
      )
      if d.isdigit()
  )
  clf = classifier.load_or_train("mnist")
  for step in steps:
    _, model, variables, _ = checkpoints.load_model(FLAGS.workdir, step)
    result, spread = score(
        model, variables, clf, FLAGS.num_per_label, FLAGS.seed
    )
    per = " ".join(f"{a:.2f}" for a in result["per_label"])
    print(
        f"step={step} accuracy={result['accuracy']:.3f} "
        f"spread={spread:.3f} per_label=[{per}]",
        flush=True,
    )


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
