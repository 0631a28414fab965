"""The CIGN / IGN objective: five weighted terms (CIGN paper, section 3-4).

With D the mean L1 distance, f_theta the trained network and f_theta' the
same network with its parameters' gradients stopped (the "frozen copy":
`jax.lax.stop_gradient(params)`, not a second parameter set):

  rec             D(f(x, c), x)                                 `loss_rec`
  idem, noise     D(f_theta'(f_theta(z, c_z)), f_theta(z, c_z))  `loss_idem_noise`
  tight, noise    -D(f_theta(y), y),  y = sg(f(z, c_z))          `loss_tight_noise`
  idem, mismatch  as idem, noise, on (x, c_wrong)                `loss_idem_mismatch`
  tight, mismatch as tight, noise, on (x, c_wrong)               `loss_tight_mismatch`

Every forward call is its own BatchNorm group, normalised over its own batch,
in the author's order: real, noise, mismatch, copy(noise), tight(noise),
copy(mismatch), tight(mismatch). The running statistics are chained through
the trained network's calls in that order; the frozen copy's updates are
dropped (the original reloads the copy from the model every step).

Two formulations of those seven calls (`LossConfig.passes`):
- 'sequential': seven forward calls, one after another (the reference);
- 'batched': three calls on concatenated batches, real + noise + mismatch
  (trained parameters), copy(noise) + copy(mismatch) (frozen copy), and
  tight(noise) + tight(mismatch) (trained parameters), each with `groups`
  so that BatchNorm normalises every group over its own batch and updates
  the running statistics group by group in the order above, and every group
  draws the dropout masks of its sequential call. The same loss, gradients
  and running statistics (sums in another order); fewer, larger kernels.
  `tests/test_batched_passes.py` checks the two against each other.
- 'auto': 'sequential' (`config.resolve_passes`). 'batched' is an
  alternative no default selects; its machinery is `cign_jax.grouped`.

Tightness is the plain negative L1 (the CIGN code; default) or IGN's smooth
clamp tanh(L / (a L_rec)) a L_rec, per sample, with L_rec the (gradient-
stopped) mean reconstruction loss of the step.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from cign_jax import config as config_lib
from cign_jax import grouped

LOSS_TERMS = (
    "loss_rec",
    "loss_idem_noise",
    "loss_tight_noise",
    "loss_idem_mismatch",
    "loss_tight_mismatch",
)


def l1_distance(a, b):
  """D: mean absolute difference over all elements (torch's L1Loss)."""
  return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def per_sample_l1(a, b):
  return jnp.mean(
      jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)),
      axis=tuple(range(1, a.ndim)),
  )


def sample_prior(key, shape, clip: bool):
  """z ~ N(0, 1) of the images' shape, optionally clipped to [-1, 1]."""
  z = jax.random.normal(key, shape, jnp.float32)
  return jnp.clip(z, -1.0, 1.0) if clip else z


def add_training_noise(key, images, std: float):
  """The training images' regulariser: x + std N(0, 1), clamped to [-1, 1]."""
  if isinstance(std, (int, float)) and std == 0:  # (a sweep's is traced)
    return images
  return jnp.clip(
      images + std * jax.random.normal(key, images.shape, images.dtype),
      -1.0,
      1.0,
  )


def mismatch_batch(images, labels, num_classes: int, num_wrong: int, key=None):
  """Pairs every image with wrong labels, vectorised.

  num_wrong == num_classes - 1: all wrong labels, in increasing order (the
  original's order); otherwise `num_wrong` distinct wrong labels per image
  drawn uniformly at random with `key`. Returns images (B*num_wrong, ...)
  repeated image-major and labels (B*num_wrong,).
  """
  b = images.shape[0]
  if not 0 <= num_wrong <= num_classes - 1:
    raise ValueError(
        f"num_wrong must be in 0..{num_classes - 1}, got " f"{num_wrong}"
    )
  if num_wrong == num_classes - 1:
    slots = jnp.broadcast_to(jnp.arange(num_classes - 1), (b, num_wrong))
  else:
    if key is None:
      raise ValueError(
          "a key is needed to draw a random subset of wrong " "labels"
      )
    order = jnp.argsort(jax.random.uniform(key, (b, num_classes - 1)), axis=1)
    slots = order[:, :num_wrong]
  # Slot j in 0..num_classes-2 names the j-th label other than the true one.
  wrong = slots + (slots >= labels[:, None]).astype(slots.dtype)
  return (
      jnp.repeat(images, num_wrong, axis=0),
      wrong.reshape(-1).astype(jnp.int32),
  )


class LossConfig(NamedTuple):
  rec_weight: float = 20.0
  idem_noise_weight: float = 20.0
  tight_noise_weight: float = 2.5
  idem_mismatch_weight: float = 3.0
  tight_mismatch_weight: float = 1.0
  tightness: str = "l1"
  tightness_clamp_a: float = 1.5
  num_mismatch_labels: int = 9
  num_classes: int = 10
  conditional: bool = True
  clip_prior: bool = False
  passes: str = "auto"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossConfig":
    l, m = config.loss, config.model
    return cls(
        rec_weight=l.rec_weight,
        idem_noise_weight=l.idem_noise_weight,
        tight_noise_weight=l.tight_noise_weight,
        idem_mismatch_weight=l.idem_mismatch_weight,
        tight_mismatch_weight=l.tight_mismatch_weight,
        tightness=l.tightness,
        tightness_clamp_a=l.tightness_clamp_a,
        num_mismatch_labels=l.num_mismatch_labels,
        num_classes=m.num_classes,
        conditional=m.conditioning != "none",
        clip_prior=m.clip_prior,
        passes=l.get("passes", "auto"),
    )


def _tightness(f_y, y, rec_scale, cfg: LossConfig):
  """-D(f(y), y), plain or IGN's smooth clamp (per sample)."""
  if cfg.tightness == "l1":
    return -l1_distance(f_y, y)
  if cfg.tightness == "smooth_clamp":
    raw = -per_sample_l1(f_y, y)
    scale = cfg.tightness_clamp_a * rec_scale
    return jnp.mean(jnp.tanh(raw / scale) * scale)
  raise ValueError(f"unknown tightness {cfg.tightness!r}")


def idempotent_loss(
    apply_fn: Callable,
    params,
    batch_stats,
    images,
    labels,
    key,
    cfg: LossConfig,
    frozen_params: Optional[Any] = None,
    noise=None,
    noise_labels=None,
) -> Tuple[jax.Array, Tuple[Dict[str, jax.Array], Any]]:
  """Total loss and (weighted terms, updated batch_stats).

  apply_fn(variables, x, labels, train=True, rngs=..., mutable=[...]) is the
  Flax model's apply. `images` are the (already noised) training images in
  [-1, 1], `labels` their labels (ignored by an unconditional model).
  `frozen_params` replaces `stop_gradient(params)` for the frozen copy (used
  by the tests to show both give the same gradient).
  `noise` / `noise_labels` replace the prior sample and its uniform labels
  (for cross-checks against other implementations).
  """
  b = images.shape[0]
  keys = jax.random.split(key, 10)
  frozen = (
      jax.lax.stop_gradient(params) if frozen_params is None else frozen_params
  )

  def f(p, stats, x, c, rng):
    out, updates = apply_fn(
        {"params": p, "batch_stats": stats},
        x,
        c,
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats"],
    )
    return out, updates["batch_stats"]

  z = (
      sample_prior(keys[0], images.shape, cfg.clip_prior)
      if noise is None
      else noise
  )
  if noise_labels is not None:
    z_labels = noise_labels
  elif cfg.conditional:
    z_labels = jax.random.randint(keys[1], (b,), 0, cfg.num_classes)
  else:
    z_labels = jnp.zeros((b,), jnp.int32)
  use_mismatch = cfg.conditional and cfg.num_mismatch_labels > 0
  if use_mismatch:
    mm_images, mm_labels = mismatch_batch(
        images, labels, cfg.num_classes, cfg.num_mismatch_labels, keys[2]
    )

  calls = [(images, labels, keys[3]), (z, z_labels, keys[4])]
  if use_mismatch:
    calls.append((mm_images, mm_labels, keys[5]))

  if config_lib.resolve_passes(cfg.passes) == "batched":
    # Real, noise, mismatch: one call with the trained parameters.
    outs, stats = grouped.call(apply_fn, params, batch_stats, calls)
    f_x, f_z = outs[0], outs[1]
    f_m = outs[2] if use_mismatch else None
    y_z = jax.lax.stop_gradient(f_z)
    y_m = jax.lax.stop_gradient(f_m) if use_mismatch else None
    # The frozen copy on both (its statistics updates dropped), then the
    # tightness calls with the trained parameters, statistics chained noise
    # then mismatch. In training mode a call's output does not depend on
    # the running statistics it is given, so only the statistics' order
    # matters, and it is the sequential one.
    copies, _ = grouped.call(
        apply_fn,
        frozen,
        stats,
        [(f_z, z_labels, keys[6])]
        + ([(f_m, mm_labels, keys[8])] if use_mismatch else []),
    )
    tights, stats = grouped.call(
        apply_fn,
        params,
        stats,
        [(y_z, z_labels, keys[7])]
        + ([(y_m, mm_labels, keys[9])] if use_mismatch else []),
    )
  else:
    # The reference: seven calls in the original's order.
    stats = batch_stats
    f_x, stats = f(params, stats, images, labels, keys[3])
    f_z, stats = f(params, stats, z, z_labels, keys[4])
    f_m = None
    if use_mismatch:
      f_m, stats = f(params, stats, mm_images, mm_labels, keys[5])
    copies, tights = [], []
    y_z = jax.lax.stop_gradient(f_z)
    copies.append(f(frozen, stats, f_z, z_labels, keys[6])[0])
    out, stats = f(params, stats, y_z, z_labels, keys[7])
    tights.append(out)
    y_m = None
    if use_mismatch:
      y_m = jax.lax.stop_gradient(f_m)
      copies.append(f(frozen, stats, f_m, mm_labels, keys[8])[0])
      out, stats = f(params, stats, y_m, mm_labels, keys[9])
      tights.append(out)

  rec = l1_distance(f_x, images)
  rec_scale = jax.lax.stop_gradient(rec)
  idem_noise = l1_distance(copies[0], f_z)
  tight_noise = _tightness(tights[0], y_z, rec_scale, cfg)
  if use_mismatch:
    idem_mismatch = l1_distance(copies[1], f_m)
    tight_mismatch = _tightness(tights[1], y_m, rec_scale, cfg)
  else:
    idem_mismatch = jnp.zeros((), jnp.float32)
    tight_mismatch = jnp.zeros((), jnp.float32)

  terms = {
      "loss_rec": cfg.rec_weight * rec,
      "loss_idem_noise": cfg.idem_noise_weight * idem_noise,
      "loss_tight_noise": cfg.tight_noise_weight * tight_noise,
      "loss_idem_mismatch": cfg.idem_mismatch_weight * idem_mismatch,
      "loss_tight_mismatch": cfg.tight_mismatch_weight * tight_mismatch,
  }
  total = sum(terms[k] for k in LOSS_TERMS)
  return total, (terms, stats)
