"""Sampling f(z, c), repeated application f^n, and projection f(x, c).

All forward passes here are evaluation-time: BatchNorm uses its running
statistics and dropout is off, so a sample is a deterministic function of
(z, c) and applying f again refines it (IGN, section 3).
"""

from __future__ import annotations

import functools
import os
import zipfile
import zlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import PngImagePlugin

from cign_jax import checkpoints
from cign_jax import losses
from cign_jax import models
from cign_jax import run_dir


@functools.partial(jax.jit, static_argnames=("model", "applications"))
def _apply_n(model, variables, x, labels, applications: int):
  for _ in range(applications):
    x = model.apply(variables, x, labels, train=False)
  return x


def apply_repeatedly(model: models.IdempotentNetwork, variables, x, labels,
                     applications: int = 1, batch_size: int = 1000):
  """f^applications(x, c) in batches (the last batch padded, not recompiled)."""
  if applications < 1:
    raise ValueError(f"applications must be >= 1, got {applications}")
  x = np.asarray(x, np.float32)
  labels = np.asarray(labels, np.int32)
  n = x.shape[0]
  if n == 0:
    return np.zeros_like(x)
  bs = min(batch_size, n)
  outs = []
  for start in range(0, n, bs):
    xb, cb = x[start:start + bs], labels[start:start + bs]
    pad = bs - xb.shape[0]
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      cb = np.concatenate([cb, np.zeros((pad,), cb.dtype)])
    out = _apply_n(model, variables, jnp.asarray(xb), jnp.asarray(cb),
                   applications)
    outs.append(np.asarray(out)[:bs - pad])
  return np.concatenate(outs)


def prior_noise(key, num: int, image_channels: int = 1, clip: bool = False):
  return np.asarray(losses.sample_prior(key, (num, 28, 28, image_channels),
                                        clip))


def generate(model: models.IdempotentNetwork, variables, labels: Sequence[int],
             key, applications: int = 1, clip: bool = False,
             batch_size: int = 1000):
  """Samples f^applications(z, c) with z ~ N(0, 1).

  Args:
    model: the network.
    variables: its variables ({'params', 'batch_stats'}).
    labels: one label per sample (ignored by an unconditional model, but
      still giving the number of samples).
    key: a JAX PRNG key for the noise.
    applications: how many times f is applied.
    clip: clip the noise to [-1, 1] (the paper's prior).
    batch_size: samples per compiled call.

  Returns:
    float32 images in [-1, 1], (N, 28, 28, C), as numpy.
  """
  labels = models.check_labels(labels, model.num_classes)
  z = prior_noise(key, labels.shape[0], model.image_channels, clip)
  return apply_repeatedly(model, variables, z, labels, applications,
                          batch_size)


def project(model: models.IdempotentNetwork, variables, images,
            labels: Optional[Sequence[int]] = None, applications: int = 1,
            batch_size: int = 1000):
  """IGN's projection of given inputs onto the model's fixed points.

  Args:
    model: the network.
    variables: its variables ({'params', 'batch_stats'}).
    images: inputs in [-1, 1] (noisy, degraded, out of distribution),
      (N, 28, 28) or (N, 28, 28, 1).
    labels: one label per image; needed unless the model is unconditional.
    applications: how many times f is applied.
    batch_size: images per compiled call.

  Returns:
    f^applications(x, c): float32 images in [-1, 1], (N, 28, 28, C).
  """
  images = models.check_images(images, model.image_channels)
  if labels is None:
    if model.conditioning != "none":
      raise ValueError("projection with a conditional model needs labels")
    labels = np.zeros((images.shape[0],), np.int32)
  labels = models.check_labels(labels, model.num_classes, images.shape[0])
  return apply_repeatedly(model, variables, images, labels, applications,
                          batch_size)


def label_grid(model: models.IdempotentNetwork, variables, key,
               num_per_label: int = 10, applications: int = 1,
               clip: bool = False):
  """The paper's appendix figure: one row per label, the same noise in every
  row. Returns images (num_classes, num_per_label, 28, 28, C)."""
  k = model.num_classes if model.conditioning != "none" else 1
  z = prior_noise(key, num_per_label, model.image_channels, clip)
  x = np.tile(z, (k, 1, 1, 1))
  labels = np.repeat(np.arange(k, dtype=np.int32), num_per_label)
  out = apply_repeatedly(model, variables, x, labels, applications)
  return out.reshape((k, num_per_label) + out.shape[1:])


def grid_image(rows: np.ndarray, pad: int = 2) -> np.ndarray:
  """(R, C, 28, 28, ch) in [-1, 1] -> one uint8 (H, W) image with gaps."""
  r, c, h, w = rows.shape[:4]
  canvas = np.ones((r * (h + pad) + pad, c * (w + pad) + pad), np.float32)
  for i in range(r):
    for j in range(c):
      img = rows[i, j].reshape(h, w, -1)[..., 0]
      top, left = pad + i * (h + pad), pad + j * (w + pad)
      canvas[top:top + h, left:left + w] = (img + 1.0) / 2.0
  return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def save_png(image_u8: np.ndarray, path: str, scale: int = 2,
             text: Optional[dict] = None):
  """Writes a uint8 image as PNG (`text`: tEXt entries, e.g. the step)."""
  img = Image.fromarray(image_u8)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  info = None
  if text:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
      info.add_text(str(key), str(value))
  img.save(path, pnginfo=info)


def _parse_labels(labels) -> list:
  """--labels as a list of ints, with errors that name the flag."""
  labels = list(labels)
  if not labels:
    raise ValueError("--labels is empty; give labels such as --labels=0,3, "
                     "or leave the flag out to sample every class")
  out = []
  for label in labels:
    try:
      out.append(int(label))
    except (TypeError, ValueError):
      raise ValueError(f"--labels must be integers separated by commas, got "
                       f"{label!r}") from None
  return out


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def open_npz(path: str, flag: str) -> dict:
  """The arrays of an .npz given by `flag`, read whole (so a damaged member
  fails here, not at first use), with errors that name the flag and file."""
  with open(path, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
  if not head:
    raise ValueError(f"{flag} file {path} is empty; expected an .npz written "
                     "by numpy.savez with an 'images' array")
  if head == _NPY_MAGIC:
    raise ValueError(f"{flag} file {path} holds a single array (.npy), not an "
                     ".npz with named arrays ('images', 'labels')")
  if not head.startswith(_ZIP_MAGIC):
    raise ValueError(f"{flag} file {path} is not an .npz (it does not start "
                     "as a zip archive does); expected one written by "
                     "numpy.savez with an 'images' array")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile,
          zlib.error) as e:
    raise ValueError(f"{flag} file {path} cannot be read as an .npz ({e}); "
                     "expected a whole one written by numpy.savez, without "
                     "object arrays") from None


def sample_to_file(workdir: str, out: str,
                   labels: Optional[Sequence[int]] = None,
                   num_per_label: int = 10, seed: int = 0,
                   applications: int = 1, inputs: Optional[str] = None,
                   step: Optional[int] = None, checkpoint=None):
  """Samples from the run in `workdir` (or projects `inputs`) into `out`.

  What `python -m cign_jax.sample` does: writes `images` (float32 in [-1, 1],
  (N, 28, 28, 1)) and `labels` to the .npz `out`, and a PNG grid beside it.

  Args:
    workdir: a run directory (training or `convert`).
    out: the .npz file to write.
    labels: the labels to sample (default: every class).
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
  if labels is not None:
    labels = _parse_labels(labels)
  if checkpoint is None and step is not None:
    checkpoint = step
  chosen, (config, model, variables, step) = checkpoints.load_chosen_model(
      workdir, checkpoint)
  num_classes = model.num_classes if model.conditioning != "none" else 1
  if inputs is not None:
    if not os.path.isfile(inputs):
      raise FileNotFoundError(f"--inputs file not found: {inputs}")
    arrays = open_npz(inputs, "--inputs")
    if "images" not in arrays:
      raise ValueError(f"{inputs} has no 'images' array (found: "
                       f"{', '.join(arrays) or 'no arrays'})")
    x = models.check_images(arrays["images"], model.image_channels)
    if "labels" in arrays:
      y = models.check_labels(arrays["labels"], model.num_classes, x.shape[0])
    elif model.conditioning == "none":
      y = np.zeros((x.shape[0],), np.int32)
    else:
      raise ValueError(f"{inputs} has no 'labels' array, which a "
                       f"{model.conditioning}-conditioned model needs")
    images = project(model, variables, x, y, applications)
    rows = np.stack([x, images])[:, :min(len(x), 16)]
    labels_out = y
  else:
    wanted = range(num_classes) if labels is None else [int(l) for l in labels]
    wanted = models.check_labels(list(wanted), model.num_classes)
    if num_per_label < 1:
      raise ValueError(f"--num_per_label must be >= 1, got {num_per_label}")
    # The same noise for every label, as in the paper's figures.
    z = prior_noise(jax.random.key(seed), num_per_label,
                             model.image_channels, config.model.clip_prior)
    x = np.tile(z, (len(wanted), 1, 1, 1))
    labels_out = np.repeat(wanted, num_per_label).astype(np.int32)
    images = apply_repeatedly(model, variables, x, labels_out,
                                       applications)
    rows = images.reshape((len(wanted), num_per_label) + images.shape[1:])
  images = images.astype(np.float32)
  bad = int(np.sum(~np.isfinite(images)))
  if bad:
    raise FloatingPointError(
        f"the checkpoint of step {step} in {workdir} samples non-finite images "
        f"({bad} NaN/Inf pixels of {images.size}); nothing was written. Its "
        "weights or BatchNorm statistics are broken: sample an earlier step "
        "with --checkpoint=STEP")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  run_dir.atomic_savez(out, images=images, labels=labels_out.astype(np.int32),
                       step=chosen.step, checkpoint=chosen.reason)
  save_png(grid_image(rows), out[:-len(".npz")] + ".png",
           text={"step": chosen.step, "checkpoint": chosen.reason,
                 "workdir": os.path.abspath(workdir)})
  return images, labels_out
