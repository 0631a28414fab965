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

from cign_jax import losses
from cign_jax import models


@functools.partial(jax.jit, static_argnames=("model", "applications"))
def _apply_n(model, variables, x, labels, applications: int):
  for _ in range(applications):
    x = model.apply(variables, x, labels, train=False)
  return x


def apply_repeatedly(
    model: models.IdempotentNetwork,
    variables,
    x,
    labels,
    applications: int = 1,
    batch_size: int = 1000,
):
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
    xb, cb = x[start : start + bs], labels[start : start + bs]
    pad = bs - xb.shape[0]
    if pad:
      xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
      cb = np.concatenate([cb, np.zeros((pad,), cb.dtype)])
    out = _apply_n(
        model, variables, jnp.asarray(xb), jnp.asarray(cb), applications
    )
    outs.append(np.asarray(out)[: bs - pad])
  return np.concatenate(outs)


def prior_noise(
    key,
    num: int,
    image_channels: int = 1,
    clip: bool = False,
    image_size: int = 28,
):
  """`num` draws of the prior, (num, image_size, image_size, image_channels)."""
  return np.asarray(
      losses.sample_prior(
          key, (num, image_size, image_size, image_channels), clip
      )
  )


def model_prior_noise(key, model, num: int, clip: bool = False):
  """`prior_noise` of the shape `model` maps."""
  h, _, c = models.image_shape(model)
  return prior_noise(key, num, c, clip, image_size=h)


def generate(
    model: models.IdempotentNetwork,
    variables,
    labels: Sequence[int],
    key,
    applications: int = 1,
    clip: bool = False,
    batch_size: int = 1000,
):
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
    float32 images in [-1, 1], (N, H, W, C), as numpy.
  """
  labels = models.check_labels(labels, model.num_classes)
  z = model_prior_noise(key, model, labels.shape[0], clip)
  return apply_repeatedly(model, variables, z, labels, applications, batch_size)


def project(
    model: models.IdempotentNetwork,
    variables,
    images,
    labels: Optional[Sequence[int]] = None,
    applications: int = 1,
    batch_size: int = 1000,
):
  """IGN's projection of given inputs onto the model's fixed points.

  Args:
    model: the network.
    variables: its variables ({'params', 'batch_stats'}).
    images: inputs in [-1, 1] (noisy, degraded, out of distribution),
      (N, H, W, C) of the model's shape ((N, H, W) when C = 1).
    labels: one label per image; needed unless the model is unconditional.
    applications: how many times f is applied.
    batch_size: images per compiled call.

  Returns:
    f^applications(x, c): float32 images in [-1, 1], (N, H, W, C).
  """
  h, _, c = models.image_shape(model)
  images = models.check_images(images, c, image_size=h)
  if labels is None:
    if model.conditioning != "none":
      raise ValueError("projection with a conditional model needs labels")
    labels = np.zeros((images.shape[0],), np.int32)
  labels = models.check_labels(labels, model.num_classes, images.shape[0])
  return apply_repeatedly(
      model, variables, images, labels, applications, batch_size
  )


def label_grid(
    model: models.IdempotentNetwork,
    variables,
    key,
    num_per_label: int = 10,
    applications: int = 1,
    clip: bool = False,
    labels: Optional[Sequence[int]] = None,
):
  """The paper's appendix figure: one row per label (`labels`, default every
  class), the same noise in every row. Returns images (len(labels),
  num_per_label, H, W, C)."""
  if labels is None:
    k = model.num_classes if model.conditioning != "none" else 1
    labels = range(k)
  labels = models.check_labels(list(labels), model.num_classes)
  if num_per_label < 1:
    raise ValueError(f"num_per_label must be >= 1, got {num_per_label}")
  z = model_prior_noise(key, model, num_per_label, clip)
  x = np.tile(z, (len(labels), 1, 1, 1))
  out = apply_repeatedly(
      model, variables, x, np.repeat(labels, num_per_label), applications
  )
  return out.reshape((len(labels), num_per_label) + out.shape[1:])


def write_sample_grid(
    config,
    model: models.IdempotentNetwork,
    variables,
    path: Optional[str] = None,
    num_per_label: int = 10,
):
  """The paper's figure for a run (`config.samples_noise_seed`, its prior):
  a row per label, the same noise in every row; as a uint8 image ((H, W)
  grey, (H, W, 3) RGB), also written to `path` as PNG when given."""
  rows = label_grid(
      model,
      variables,
      jax.random.key(config.samples_noise_seed),
      num_per_label=num_per_label,
      clip=config.model.clip_prior,
  )
  grid = grid_image(rows)
  if path:
    save_png(grid, path)
  return grid


def grid_image(rows: np.ndarray, pad: int = 2) -> np.ndarray:
  """(R, C, h, w[, ch]) in [-1, 1] -> one uint8 image with gaps: (H, W)
  for one channel, (H, W, 3) for three (RGB)."""
  r, c, h, w = rows.shape[:4]
  channels = rows.shape[4] if rows.ndim == 5 else 1
  if channels not in (1, 3):
    raise ValueError(
        f"a grid shows images of 1 (grey) or 3 (RGB) channels, got {channels}"
    )
  shape = (r * (h + pad) + pad, c * (w + pad) + pad, channels)
  canvas = np.ones(shape, np.float32)
  for i in range(r):
    for j in range(c):
      img = rows[i, j].reshape(h, w, channels)
      top, left = pad + i * (h + pad), pad + j * (w + pad)
      canvas[top : top + h, left : left + w] = (img + 1.0) / 2.0
  if channels == 1:
    canvas = canvas[..., 0]
  return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def save_png(
    image_u8: np.ndarray, path: str, scale: int = 2, text: Optional[dict] = None
):
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


_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"


def open_npz(path: str, what: str) -> dict:
  """The arrays of the .npz `path`, read whole (so a damaged member fails
  here, not at first use). `what` is the file's role in words (such as 'the
  inputs file'): each error starts with it and names the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{what} {path} does not exist; expected an .npz "
        "written by numpy.savez with an 'images' array"
    )
  with open(path, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
  if not head:
    raise ValueError(
        f"{what} {path} is empty; expected an .npz written "
        "by numpy.savez with an 'images' array"
    )
  if head == _NPY_MAGIC:
    raise ValueError(
        f"{what} {path} holds a single array (.npy), not an "
        ".npz with named arrays ('images', 'labels')"
    )
  if not head.startswith(_ZIP_MAGIC):
    raise ValueError(
        f"{what} {path} is not an .npz (it does not start "
        "as a zip archive does); expected one written by "
        "numpy.savez with an 'images' array"
    )
  try:
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(
        f"{what} {path} cannot be read as an .npz ({e}); "
        "expected a whole one written by numpy.savez, without "
        "object arrays"
    ) from None
