"""Scores a model or a set of samples: per-class FID, label accuracy and
the diversity metrics.

  python -m cign_jax.evaluate --workdir=DIR [--num_per_class=1000]
      [--applications=1] [--seed=0] [--checkpoint=best|latest|STEP]
      [--metrics=fid64,label_accuracy,recall,...]
  python -m cign_jax.evaluate --samples=FILE.npz [--dataset=mnist] [--out=DIR]

With --workdir it generates `num_per_class` samples per label from a
checkpoint of the run (--checkpoint; default its best when it keeps one,
else its latest; eval.json and the printed table name the step and why),
in the format `cign_jax.sample` writes, kept as DIR/eval_samples.npz and
reused only for the same checkpoint (step and weights) and settings;
with --samples it scores images made by anything else (`images` float in
[-1, 1], (N, H, W[, C]) as the dataset's; `labels`).

Every metric is per class: for each label, the dataset's test images of that
label (up to 1000) against as many generated with it; mean/min/max over
labels. An unconditional run is scored over the whole set (its samples
against the test images of every label, as one class). By default (--metrics names others, from
`cign_jax.evaluation.registry`): per-class FID as the CIGN paper (Table 3)
at 64, 192, 768 features (and 2048 when every class has at least 2048
samples); label accuracy, the library's classifier
(`cign_jax.evaluation.classifier`, trained once per dataset and cached) on
the samples against the requested labels: overall, per label, and the
confusion matrix; and on the FID Inception's 2048-d features, improved
precision and recall (k = 3), density and coverage (k = 5), KID, the
within-class spread and the share of near-duplicates. memorisation_ratio
and memorised (an Inception pass over the training split) only when named.
Writes eval.json (and confusion.png with label accuracy) to the output
directory (DIR by default) and prints a table shaped like the paper's
Table 3.
"""

import os

from absl import app
from absl import flags

from cign_jax import commands
from cign_jax.evaluation import evaluate

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when run as a command (so that
  importing this module beside another command does not clash)."""
  flags.DEFINE_string("workdir", None, "Run directory to generate from.")
  flags.DEFINE_string("samples", None, "Score this .npz instead of generating.")
  flags.DEFINE_string(
      "out",
      None,
      "Output directory (default: the workdir, or "
      "the samples file's directory).",
  )
  flags.DEFINE_string(
      "dataset",
      None,
      "Dataset of the real images (default: " "the run's, else mnist).",
  )
  flags.DEFINE_integer("num_per_class", 1000, "Samples generated per label.")
  flags.DEFINE_integer("applications", 1, "Apply f this many times.")
  flags.DEFINE_integer("seed", 0, "Seed of the generated noise.")
  flags.DEFINE_string(
      "checkpoint",
      None,
      "best, latest or a step (default: "
      "the best when the run keeps one, else the latest).",
  )
  flags.DEFINE_list(
      "feature_sizes",
      None,
      "FID feature sizes (default: 64, "
      "192, 768 and 2048 when there are enough samples).",
  )
  flags.DEFINE_list(
      "metrics",
      None,
      "Metric names (default: per-class FID "
      "at --feature_sizes, label_accuracy, precision, recall, "
      "density, coverage, kid, kid_std, spread, duplicates; "
      "also memorisation_ratio, memorised).",
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (FLAGS.workdir is None) == (FLAGS.samples is None):
    raise ValueError("give exactly one of --workdir and --samples")
  report = evaluate.run(
      FLAGS.workdir,
      FLAGS.samples,
      FLAGS.out,
      FLAGS.dataset,
      FLAGS.num_per_class,
      FLAGS.applications,
      FLAGS.seed,
      FLAGS.feature_sizes,
      checkpoint=FLAGS.checkpoint,
      metrics=FLAGS.metrics,
  )
  print(evaluate.format_table(report))
  out = (
      FLAGS.out
      or FLAGS.workdir
      or os.path.dirname(os.path.abspath(FLAGS.samples))
  )
  written = [os.path.join(out, "eval.json")]
  if "label_accuracy" in report:
    written.append(os.path.join(out, "confusion.png"))
  print(f"wrote {' and '.join(written)}")


def run():
  _define_flags()
  commands.run(main, __name__)
