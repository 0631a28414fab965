"""Dropout masks from a counter-based generator that XLA fuses (Threefry-2x32).

A CIGN train step draws about 10^8 dropout decisions (seven forward calls,
nine of the ten layers, ~25k activations per image). Drawn with
`jax.random.bernoulli`, every bit is produced by a separate generator
computation and written to memory before the mask is applied, a large part
of a CPU train step for threefry and 'rbg' keys alike (docs/performance.md,
"What made the difference (CPU)"). Here the same generator as JAX's default PRNG,
Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC 2011), is written as plain uint32 element-wise operations on
the element's index, so XLA fuses it into the dropout multiply itself: no
bits are materialised, and the cost falls to a small fraction.

The mask of an array of shape S with key k and stream n keeps element i
(row-major flat index) when

    threefry2x32_20(k, (i, n))[0] < round(keep_prob * 2^32),

so P(keep) equals keep_prob to within 2^-33 (JAX's float-based bernoulli is
within 2^-23), and decisions are independent across elements, keys and
streams as far as Threefry's statistical quality goes (it passes TestU01's
BigCrush; JAX uses it by default). `tests/test_dropout.py` checks the
generator against the Random123 known-answer vectors and
`jax.extend.random.threefry_2x32`, and the masks' rate, independence and
determinism.

The two key words are the JAX key itself when it is a Threefry key (JAX's
default; `key_words`), else two words drawn from it with `jax.random.bits`.
A CIGN half-network draws one key per forward call and gives each of its
dropout layers its own stream n (its layer index), so every layer and
forward call gets its own mask, as with `jax.random.bernoulli`, without a
key derivation (`jax.random.fold_in`) per layer. Counters are the global
element index, so a mask does not depend on how the array is sharded over
devices.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Threefry-2x32 rotation constants and key-schedule parity (Random123).
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA


def _rotate_left(x, r: int):
  return lax.bitwise_or(
      lax.shift_left(x, np.uint32(r)),
      lax.shift_right_logical(x, np.uint32(32 - r)),
  )


def threefry2x32_20(key0, key1, x0, x1):
  """Threefry-2x32, 20 rounds, element-wise on uint32 arrays.

  key0, key1: uint32 scalars (or arrays broadcasting with x); x0, x1: the two
  counter words. Returns the two output words. Plain integer adds, shifts and
  xors, so XLA fuses it with whatever consumes the result. (Written with
  `lax` operations on arrays of one shape: the same operations as with
  `jax.numpy`'s operators, traced in less than half the time, which matters
  because a network traces it once per dropout layer and forward call.)
  """
  words = [jnp.asarray(w, jnp.uint32) for w in (key0, key1, x0, x1)]
  shape = jnp.broadcast_shapes(*(w.shape for w in words))
  key0, key1, x0, x1 = (
      w
      if w.shape == shape
      else lax.broadcast_in_dim(
          w, shape, tuple(range(len(shape) - w.ndim, len(shape)))
      )
      for w in words
  )
  schedule = (
      key0,
      key1,
      lax.bitwise_xor(lax.bitwise_xor(key0, key1), np.uint32(_PARITY)),
  )
  x0 = lax.add(x0, schedule[0])
  x1 = lax.add(x1, schedule[1])
  for block in range(5):
    for r in range(4):
      x0 = lax.add(x0, x1)
      x1 = _rotate_left(x1, _ROTATIONS[4 * (block % 2) + r])
      x1 = lax.bitwise_xor(x1, x0)
    injection = block + 1
    x0 = lax.add(x0, schedule[injection % 3])
    x1 = lax.add(
        lax.add(x1, schedule[(injection + 1) % 3]), np.uint32(injection)
    )
  return x0, x1


# A sweep's per-member rate (`per_member_rate`): while a sweep's step is
# traced, the masks compare with the member's threshold and scale by its
# keep probability, traced arrays, instead of the network's constant rate.
_MEMBER_RATE = threading.local()


@contextlib.contextmanager
def per_member_rate(threshold, keep_prob):
  """Within this block (while a function is traced), every dropout mask
  keeps the elements whose bits are below `threshold` (uint32, the member's
  `keep_threshold(1 - rate)`, computed on the host as a single run computes
  it) and scales them by 1 / `keep_prob` (1 - rate), both traced values,
  so that one program serves members of different rates. The network's
  own rate must be positive (a rate of 0 builds no dropout at all)."""
  previous = getattr(_MEMBER_RATE, "value", None)
  _MEMBER_RATE.value = (threshold, keep_prob)
  try:
    yield
  finally:
    _MEMBER_RATE.value = previous


def _threshold_and_keep(rate: float, dtype):
  """The mask's uint32 threshold and the kept elements' divisor for
  `rate`, or the member's (`per_member_rate`)."""
  member = getattr(_MEMBER_RATE, "value", None)
  if member is not None:
    threshold, keep_prob = member
    return jnp.asarray(threshold, jnp.uint32), jnp.asarray(keep_prob, dtype)
  return jnp.uint32(keep_threshold(1.0 - rate)), jnp.asarray(1.0 - rate, dtype)


def keep_threshold(keep_prob: float) -> int:
  """The uint32 threshold t with P(bits < t) = t / 2^32 closest to keep_prob."""
  if not 0.0 <= keep_prob <= 1.0:
    raise ValueError(f"keep probability must be in [0, 1], got {keep_prob}")
  return int(min(round(keep_prob * 2.0**32), 2**32 - 1))


def key_words(key) -> jax.Array:
  """The two uint32 Threefry key words (2,) of a JAX key.

  A threefry2x32 key, typed (`jax.random.key`) or raw (uint32 (2,)), is its
  own two words: no computation. Keys of other implementations ('rbg', ...)
  draw two words with `jax.random.bits`. (Drawing them from a Threefry key
  too would add a `jax.random` call per layer, a rolled loop that XLA's CPU
  backend unrolls into a copy per round: docs/performance.md, "Dropout keys
  without a derivation per layer".)
  """
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) == "threefry2x32":
      return jax.random.key_data(key)
    return jax.random.bits(key, (2,), jnp.uint32)
  key = jnp.asarray(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError(
        f"a raw key must be a Threefry key, uint32 of shape (2,); "
        f"got {key.dtype} {tuple(key.shape)} (or pass a typed "
        "key from jax.random.key)"
    )
  return key


def element_bits(key, shape, stream: int = 0):
  """uint32 Threefry bits, one per element of `shape`, from a JAX key.

  Counter of element i is (i, stream), i its row-major flat index; the key
  words are `key_words(key)`. Distinct streams of one key are independent
  (Threefry is a keyed bijection of the 64-bit counter), so the layers of a
  network can draw from one key, each with its own stream.
  """
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(
        f"an array of {size} elements is too large for 32-bit "
        "element counters"
    )
  words = key_words(key)
  index = (
      lax.iota(jnp.uint32, size).reshape(shape) if shape else (jnp.uint32(0))
  )
  bits, _ = threefry2x32_20(
      words[0], words[1], index, jnp.uint32(check_stream(stream))
  )
  return bits


def check_stream(stream: int) -> int:
  """`stream` as an int, checked to fit the 32-bit counter word."""
  if not 0 <= int(stream) < 2**32:
    raise ValueError(f"stream must be in [0, 2^32), got {stream}")
  return int(stream)


def keep_mask(key, keep_prob: float, shape, stream: int = 0):
  """Boolean mask, True with probability keep_prob, independently per element."""
  return element_bits(key, shape, stream) < jnp.uint32(
      keep_threshold(keep_prob)
  )


def dropout(x, rate: float, key, stream: int = 0):
  """PyTorch's nn.Dropout in training: zero with probability `rate`, scale
  the rest by 1 / (1 - rate); the mask is `keep_mask(key, 1 - rate, x.shape,
  stream)`."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  if rate == 0.0:
    return x
  return drop_by_bits(x, rate, element_bits(key, x.shape, stream))


def drop_by_bits(x, rate: float, bits):
  """x with the elements whose uint32 `bits` are at or above the keep
  threshold of 1 - rate zeroed, the rest scaled by 1 / (1 - rate): the
  masking step of `dropout`, for bits drawn elsewhere (the grouped
  `models.Dropout`)."""
  # The barrier makes XLA compute the mask once (1 byte per element) instead
  # of fusing the 20 Threefry rounds into every consumer of the activation
  # (the next BatchNorm's reductions, the backward pass, ...).
  threshold, keep_prob = _threshold_and_keep(rate, x.dtype)
  keep = lax.optimization_barrier(bits < threshold)
  return jnp.where(keep, x / keep_prob, jnp.zeros((), x.dtype))


def channel_dropout(x, rate: float, key):
  """PyTorch's nn.Dropout2d in training, NHWC: every (sample, channel) pair
  is zeroed whole with probability `rate` (one decision per feature map,
  shared by its H x W positions), the kept maps scaled by 1 / (1 - rate).

  The decisions are `keep_mask(key, 1 - rate, (B, 1, 1, C))`, the same
  Threefry stream as `dropout`, so they depend only on the key.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  if x.ndim != 4:
    raise ValueError(
        f"channel dropout needs (B, H, W, C) activations, got "
        f"shape {tuple(x.shape)}"
    )
  if rate == 0.0:
    return x
  threshold, keep_prob = _threshold_and_keep(rate, x.dtype)
  keep = element_bits(key, (x.shape[0], 1, 1, x.shape[-1])) < threshold
  return jnp.where(keep, x / keep_prob, jnp.zeros((), x.dtype))
