"""Samples from a trained (or imported) model, or projects given images.

  python -m cign_jax.sample --workdir=DIR --out=samples.npz \
      [--labels=0,1,2] [--num_per_label=10] [--seed=0] [--applications=1]
  python -m cign_jax.sample --workdir=DIR --out=proj.npz --inputs=IN.npz

Writes `images` (float32 in [-1, 1], (N, 28, 28, 1)) and `labels` to the
.npz, and a PNG grid beside it (FILE.png): one row per label when sampling,
inputs above their projections when projecting. `--inputs` takes an .npz
with `images` (float in [-1, 1], (N, 28, 28) or (N, 28, 28, 1)) and
`labels` (not needed for an unconditional model).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

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
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def sample_to_file(workdir: str, out: str,
                   labels: Optional[Sequence[int]] = None,
                   num_per_label: int = 10, seed: int = 0,
                   applications: int = 1, inputs: Optional[str] = None,
                   step: Optional[int] = None):
  """The command's work, callable from Python; returns (images, labels)."""
  import jax  # pylint: disable=g-import-not-at-top
  from cign_jax import checkpoints, models, sampling  # pylint: disable=g-import-not-at-top

  if not out.endswith(".npz"):
    raise ValueError(f"--out must name an .npz file, got {out!r}")
  config, model, variables, _ = checkpoints.load_model(workdir, step)
  num_classes = model.num_classes if model.conditioning != "none" else 1
  if inputs is not None:
    if not os.path.isfile(inputs):
      raise FileNotFoundError(f"--inputs file not found: {inputs}")
    with np.load(inputs) as f:
      if "images" not in f:
        raise ValueError(f"{inputs} has no 'images' array (found: "
                         f"{', '.join(f.files)})")
      x = models.check_images(f["images"], model.image_channels)
      if "labels" in f:
        y = models.check_labels(f["labels"], model.num_classes, x.shape[0])
      elif model.conditioning == "none":
        y = np.zeros((x.shape[0],), np.int32)
      else:
        raise ValueError(f"{inputs} has no 'labels' array, which a "
                         f"{model.conditioning}-conditioned model needs")
    images = sampling.project(model, variables, x, y, applications)
    rows = np.stack([x, images])[:, :min(len(x), 16)]
    labels_out = y
  else:
    wanted = range(num_classes) if labels is None else [int(l) for l in labels]
    wanted = models.check_labels(list(wanted), model.num_classes)
    if num_per_label < 1:
      raise ValueError(f"--num_per_label must be >= 1, got {num_per_label}")
    # The same noise for every label, as in the paper's figures.
    z = sampling.prior_noise(jax.random.key(seed), num_per_label,
                             model.image_channels, config.model.clip_prior)
    x = np.tile(z, (len(wanted), 1, 1, 1))
    labels_out = np.repeat(wanted, num_per_label).astype(np.int32)
    images = sampling.apply_repeatedly(model, variables, x, labels_out,
                                       applications)
    rows = images.reshape((len(wanted), num_per_label) + images.shape[1:])
  images = images.astype(np.float32)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, images=images, labels=labels_out.astype(np.int32))
  sampling.save_png(sampling.grid_image(rows), out[:-len(".npz")] + ".png")
  return images, labels_out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  images, _ = sample_to_file(FLAGS.workdir, FLAGS.out, FLAGS.labels,
                             FLAGS.num_per_label, FLAGS.seed,
                             FLAGS.applications, FLAGS.inputs, FLAGS.step)
  print(f"wrote {images.shape[0]} images to {FLAGS.out} and "
        f"{FLAGS.out[:-4]}.png")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
