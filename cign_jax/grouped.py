"""Grouped forward calls: several training-mode calls' batches as one call.

ALTERNATIVE, NOT A DEFAULT. This module is reached only through
`config.loss.passes = 'batched'` ('auto' resolves to 'sequential', see
`config.resolve_passes`), the benchmarks' flags and
`tests/test_batched_passes.py`. It stays, in this one place, until a GPU
profile decides between the two formulations (docs/performance.md, "GPU
figures"); the network modules only pass `groups` through to it.

A grouped call concatenates the batches of several forward calls; BatchNorm
normalises each group over its own rows and updates the running statistics
group by group in order, and group g draws its dropout masks from the RNG
stream `dropout_stream(g)` with element indices counted within the group:
the same result as the separate calls, one call's kernels.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import dropout as dropout_lib


def check_groups(groups: Sequence[int], batch: int):
  """Checks that group sizes are positive and add up to the batch."""
  if any(int(n) < 1 for n in groups) or sum(groups) != batch:
    raise ValueError(
        f"groups {tuple(groups)} must be positive sizes adding "
        f"up to the batch size {batch}"
    )


def dropout_stream(group: int) -> str:
  """The RNG stream name of group `group` of a grouped forward call: group 0
  uses 'dropout' (as an ungrouped call), group g 'dropout_g'."""
  return "dropout" if group == 0 else f"dropout_{group}"


def per_row(values, groups: Sequence[int], shape):
  """(G, C) per-group values -> (N, 1, ..., 1, C), each group's on its rows
  of a batch of `shape` (N, ..., C)."""
  rows = jnp.repeat(
      values, np.asarray(groups), axis=0, total_repeat_length=shape[0]
  )
  return rows.reshape((shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],))


def moments(x32, groups: Sequence[int]):
  """Per-group mean and biased variance (G, C) of a concatenated batch over
  (rows, H, W): one reduction over (H, W) of the whole batch, then a small
  sum per group over its rows."""
  check_groups(groups, x32.shape[0])
  per_image = int(np.prod(x32.shape[1:-1]))
  spatial = tuple(range(1, x32.ndim - 1))
  bounds = np.cumsum((0,) + tuple(groups))

  def group_means(rows):  # (N, C) sums over (H, W) -> (G, C) means
    return jnp.stack(
        [
            jnp.sum(rows[bounds[g] : bounds[g + 1]], axis=0)
            / (groups[g] * per_image)
            for g in range(len(groups))
        ]
    )

  mean = group_means(jnp.sum(x32, axis=spatial))
  centred = x32 - per_row(mean, groups, x32.shape)
  var = group_means(jnp.sum(jnp.square(centred), axis=spatial))
  return mean, var


def dropout(
    x,
    rate: float,
    keys: Sequence[jax.Array],
    groups: Sequence[int],
    stream: int,
):
  """Dropout of a concatenated batch, group g with keys[g]: the mask each
  group would get from a separate call with its key (one fused mask
  computation for the whole batch)."""
  check_groups(groups, x.shape[0])
  words = [dropout_lib.key_words(k) for k in keys]
  per_image = int(np.prod(x.shape[1:]))
  if max(groups) * per_image >= 2**32:
    raise ValueError(
        f"a group of {max(groups)} x {x.shape[1:]} elements is "
        "too large for 32-bit element counters"
    )
  row_shape = (x.shape[0],) + (1,) * (x.ndim - 1)

  def key_word(word):  # group g's key word on each of its rows
    return jnp.concatenate(
        [jnp.broadcast_to(w[word], (n,)) for w, n in zip(words, groups)]
    ).reshape(row_shape)

  first_row = np.repeat(np.cumsum(groups) - np.asarray(groups), groups)
  row_in_group = (np.arange(x.shape[0]) - first_row).astype(np.uint32)
  inner = jax.lax.iota(jnp.uint32, per_image).reshape((1,) + x.shape[1:])
  index = (
      jnp.asarray(row_in_group).reshape(row_shape) * jnp.uint32(per_image)
      + inner
  )
  bits, _ = dropout_lib.threefry2x32_20(
      key_word(0),
      key_word(1),
      index,
      jnp.uint32(dropout_lib.check_stream(stream)),
  )
  return dropout_lib.drop_by_bits(x, rate, bits)


def call(apply_fn: Callable, params, batch_stats, calls):
  """Several training-mode forward calls [(x, labels, dropout key), ...] as
  one call on their concatenation with `groups`. Returns the per-call
  outputs and the updated batch_stats."""
  if len(calls) == 1:
    x, c, rng = calls[0]
    out, updates = apply_fn(
        {"params": params, "batch_stats": batch_stats},
        x,
        c,
        train=True,
        rngs={"dropout": rng},
        mutable=["batch_stats"],
    )
    return [out], updates["batch_stats"]
  sizes = tuple(int(x.shape[0]) for x, _, _ in calls)
  x = jnp.concatenate([x for x, _, _ in calls])
  c = jnp.concatenate([c for _, c, _ in calls])
  rngs = {dropout_stream(g): rng for g, (_, _, rng) in enumerate(calls)}
  out, updates = apply_fn(
      {"params": params, "batch_stats": batch_stats},
      x,
      c,
      train=True,
      rngs=rngs,
      mutable=["batch_stats"],
      groups=sizes,
  )
  bounds = np.cumsum((0,) + sizes)
  return (
      [out[bounds[g] : bounds[g + 1]] for g in range(len(sizes))],
      updates["batch_stats"],
  )
