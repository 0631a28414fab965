"""Samples from a trained (or imported) model, or projects given images.

  python -m cign_jax.sample --workdir=DIR --out=samples.npz \
      [--labels=0,1,2] [--num_per_label=10] [--seed=0] [--applications=1]
      [--checkpoint=best|latest|STEP]
  python -m cign_jax.sample --workdir=DIR --out=proj.npz --inputs=IN.npz

Writes `images` (float32 in [-1, 1], (N, H, W, C), the run's shape) and
`labels` to the .npz, and a PNG grid beside it (FILE.png, RGB for RGB
images): one row per label when sampling, inputs above their projections
when projecting. `--labels` takes class indices or, for a run whose data
name their classes (a folder's sub-folders), class names. `--inputs` takes
an .npz with `images` (float in [-1, 1], (N, H, W, C), or (N, H, W) for one
channel) and `labels` (not needed for an unconditional model).
"""

import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from cign_jax import checkpoints
from cign_jax import commands
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling

FLAGS = flags.FLAGS


def _define_flags():
  """The command's flags, defined only when run as a command (so that
  importing this module beside another command does not clash)."""
  flags.DEFINE_string("workdir", None, "Run directory (training or convert).")
  flags.DEFINE_string("out", None, "Output .npz file.")
  flags.DEFINE_list(
      "labels",
      None,
      "Labels (or class names) to sample (default: all classes).",
  )
  flags.DEFINE_integer("num_per_label", 10, "Samples per label.")
  flags.DEFINE_integer("seed", 0, "Seed of the prior noise.")
  flags.DEFINE_integer("applications", 1, "Apply f this many times.")
  flags.DEFINE_string("inputs", None, "Project these images instead of noise.")
  flags.DEFINE_integer(
      "step", None, "Checkpoint step (the same as " "--checkpoint=STEP)."
  )
  flags.DEFINE_string(
      "checkpoint",
      None,
      "best, latest or a step (default: "
      "the best when the run keeps one, else the latest).",
  )


def _parse_labels(labels, class_names: Sequence[str] = ()) -> list:
  """--labels as a list of ints (class names are looked up in
  `class_names`), with errors that name the flag."""
  labels = list(labels)
  if not labels:
    raise ValueError(
        "--labels is empty; give labels such as --labels=0,3, "
        "or leave the flag out to sample every class"
    )
  out = []
  names = [str(n) for n in class_names]
  for label in labels:
    if str(label) in names:
      out.append(names.index(str(label)))
      continue
    try:
      out.append(int(label))
    except (TypeError, ValueError):
      if names:
        raise ValueError(
            f"--labels: unknown class {label!r}; the run's classes are "
            f"{', '.join(names)} (or their indices 0..{len(names) - 1})"
        ) from None
      raise ValueError(
          f"--labels must be integers separated by commas, got " f"{label!r}"
      ) from None
  return out


def _read_inputs(inputs: str, model: models.IdempotentNetwork):
  """The images of --inputs and their labels (zeros for an unconditional
  model's file without them)."""
  arrays = sampling.open_npz(inputs, "the --inputs file")
  if "images" not in arrays:
    raise ValueError(
        f"--inputs file {inputs} has no 'images' array (found: "
        f"{', '.join(arrays) or 'no arrays'})"
    )
  size, _, channels = models.image_shape(model)
  x = models.check_images(arrays["images"], channels, image_size=size)
  if "labels" in arrays:
    return x, models.check_labels(
        arrays["labels"], model.num_classes, x.shape[0]
    )
  if model.conditioning != "none":
    raise ValueError(
        f"--inputs file {inputs} has no 'labels' array, which a "
        f"{model.conditioning}-conditioned model needs"
    )
  return x, np.zeros((x.shape[0],), np.int32)


def sample_to_file(
    workdir: str,
    out: str,
    labels: Optional[Sequence[int]] = None,
    num_per_label: int = 10,
    seed: int = 0,
    applications: int = 1,
    inputs: Optional[str] = None,
    step: Optional[int] = None,
    checkpoint=None,
):
  """Samples from the run in `workdir` (or projects `inputs`) into `out`.

  What `python -m cign_jax.sample` does: writes `images` (float32 in [-1, 1],
  (N, H, W, C)) and `labels` to the .npz `out`, and a PNG grid beside it.

  Args:
    workdir: a run directory (training or `convert`).
    out: the .npz file to write.
    labels: the labels to sample, as indices or class names (default:
      every class).
    num_per_label: samples per label; every label gets the same noise.
    seed: seed of the prior noise.
    applications: how many times f is applied.
    inputs: an .npz of `images` (and `labels`) to project instead of noise.
    step: the checkpoint step (the same as checkpoint=step).
    checkpoint: 'best', 'latest' or a step; default the best when the run
      keeps one, else the latest. The .npz (`step`, `checkpoint`) and the
      PNG's text say which and why.

  Returns:
    (images, labels) as written.
  """
  if not out.endswith(".npz"):
    raise ValueError(f"--out must name an .npz file, got {out!r}")
  if labels is not None and not list(labels):
    _parse_labels([])  # raises: an empty --labels needs no run to refuse
  if checkpoint is None and step is not None:
    checkpoint = step
  chosen, (config, model, variables, step) = checkpoints.load_chosen_model(
      workdir, checkpoint
  )
  if labels is not None:
    labels = _parse_labels(labels, config.data.class_names)
  if inputs is not None:
    x, labels_out = _read_inputs(inputs, model)
    images = sampling.project(model, variables, x, labels_out, applications)
    rows = np.stack([x, images])[:, : min(len(x), 16)]
  else:
    if num_per_label < 1:
      raise ValueError(f"--num_per_label must be >= 1, got {num_per_label}")
    rows = sampling.label_grid(
        model,
        variables,
        jax.random.key(seed),
        num_per_label,
        applications,
        config.model.clip_prior,
        labels,
    )
    images = rows.reshape((-1,) + rows.shape[2:])
    labels_out = np.repeat(
        np.arange(rows.shape[0]) if labels is None else labels, num_per_label
    ).astype(np.int32)
  images = images.astype(np.float32)
  bad = int(np.sum(~np.isfinite(images)))
  if bad:
    raise FloatingPointError(
        f"the checkpoint of step {step} in {workdir} samples non-finite images "
        f"({bad} NaN/Inf pixels of {images.size}); nothing was written. Its "
        "weights or BatchNorm statistics are broken: sample an earlier step "
        "with --checkpoint=STEP"
    )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  run_dir.atomic_savez(
      out,
      images=images,
      labels=labels_out,
      step=chosen.step,
      checkpoint=chosen.reason,
  )
  sampling.save_png(
      sampling.grid_image(rows),
      out[: -len(".npz")] + ".png",
      text={
          "step": chosen.step,
          "checkpoint": chosen.reason,
          "workdir": os.path.abspath(workdir),
      },
  )
  return images, labels_out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  images, _ = sample_to_file(
      FLAGS.workdir,
      FLAGS.out,
      FLAGS.labels,
      FLAGS.num_per_label,
      FLAGS.seed,
      FLAGS.applications,
      FLAGS.inputs,
      FLAGS.step,
      checkpoint=FLAGS.checkpoint,
  )
  # Which checkpoint, as written with the samples (a training beside this
  # command may have saved a newer one since).
  with np.load(FLAGS.out) as written:
    step, reason = int(written["step"]), str(written["checkpoint"])
  print(
      f"wrote {images.shape[0]} images to {FLAGS.out} and "
      f"{FLAGS.out[:-4]}.png from step {step}: {reason}"
  )


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  commands.run(main, __name__)
