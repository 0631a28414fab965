"""Samples from a trained (or imported) model, or projects given images.

  python -m cign_jax.sample --workdir=DIR --out=samples.npz \
      [--labels=0,1,2] [--num_per_label=10] [--seed=0] [--applications=1]
      [--checkpoint=best|latest|STEP]
  python -m cign_jax.sample --workdir=DIR --out=proj.npz --inputs=IN.npz

Writes `images` (float32 in [-1, 1], (N, 28, 28, 1)) and `labels` to the
.npz, and a PNG grid beside it (FILE.png): one row per label when sampling,
inputs above their projections when projecting. `--inputs` takes an .npz
with `images` (float in [-1, 1], (N, 28, 28) or (N, 28, 28, 1)) and
`labels` (not needed for an unconditional model).
"""


from absl import app
from absl import flags
import numpy as np

from cign_jax import commands
from cign_jax import sampling

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when run as a command (so that
  importing this module beside another command does not clash)."""
  flags.DEFINE_string("workdir", None, "Run directory (training or convert).")
  flags.DEFINE_string("out", None, "Output .npz file.")
  flags.DEFINE_list("labels", None, "Labels to sample (default: all classes).")
  flags.DEFINE_integer("num_per_label", 10, "Samples per label.")
  flags.DEFINE_integer("seed", 0, "Seed of the prior noise.")
  flags.DEFINE_integer("applications", 1, "Apply f this many times.")
  flags.DEFINE_string("inputs", None, "Project these images instead of noise.")
  flags.DEFINE_integer("step", None, "Checkpoint step (the same as "
                       "--checkpoint=STEP).")
  flags.DEFINE_string("checkpoint", None, "best, latest or a step (default: "
                      "the best when the run keeps one, else the latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  images, _ = sampling.sample_to_file(FLAGS.workdir, FLAGS.out, FLAGS.labels,
                             FLAGS.num_per_label, FLAGS.seed,
                             FLAGS.applications, FLAGS.inputs, FLAGS.step,
                             checkpoint=FLAGS.checkpoint)
  # Which checkpoint, as written with the samples (a training beside this
  # command may have saved a newer one since).
  with np.load(FLAGS.out) as written:
    step, reason = int(written["step"]), str(written["checkpoint"])
  print(f"wrote {images.shape[0]} images to {FLAGS.out} and "
        f"{FLAGS.out[:-4]}.png from step {step}: {reason}")


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  commands.run(main, __name__)

