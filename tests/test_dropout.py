"""The fused Threefry dropout masks: generator, rate, independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import random as jax_random

from cign_jax import dropout
from cign_jax import models

# Random123's known-answer vectors for Threefry-2x32 with 20 rounds:
# (key, counter) -> output.
KNOWN_ANSWERS = [
    (
        (0x00000000, 0x00000000),
        (0x00000000, 0x00000000),
        (0x6B200159, 0x99BA4EFE),
    ),
    (
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x1CB996FC, 0xBB002BE7),
    ),
    (
        (0x13198A2E, 0x03707344),
        (0x243F6A88, 0x85A308D3),
        (0xC4923A9C, 0x483DF7A0),
    ),
]


@pytest.mark.parametrize("key,counter,expected", KNOWN_ANSWERS)
def test_threefry_known_answers(key, counter, expected):
  out = dropout.threefry2x32_20(
      np.uint32(key[0]),
      np.uint32(key[1]),
      np.uint32(counter[0]),
      np.uint32(counter[1]),
  )
  assert tuple(int(v) for v in out) == expected


def test_threefry_matches_jax_on_random_inputs():
  rs = np.random.RandomState(0)
  key = rs.randint(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
  x = rs.randint(0, 2**32, size=(2, 1000), dtype=np.uint64).astype(np.uint32)
  ours = jax.jit(dropout.threefry2x32_20)(key[0], key[1], x[0], x[1])
  theirs = jax_random.threefry_2x32(key, x)
  np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
  np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(theirs[1]))


def test_keep_threshold():
  assert dropout.keep_threshold(0.5) == 2**31
  assert dropout.keep_threshold(0.0) == 0
  assert dropout.keep_threshold(1.0) == 2**32 - 1
  assert abs(dropout.keep_threshold(0.85) / 2**32 - 0.85) < 2**-32
  with pytest.raises(ValueError, match="keep probability"):
    dropout.keep_threshold(1.5)


def test_mask_rate_and_independence():
  n = 1_000_000
  keep = (
      np.asarray(
          jax.jit(lambda k: dropout.keep_mask(k, 0.85, (1000, 1000)))(
              jax.random.key(3)
          )
      )
      .astype(np.float64)
      .ravel()
  )
  # Rate: within 5 binomial standard deviations of 0.85.
  sd = np.sqrt(0.85 * 0.15 / n)
  assert abs(keep.mean() - 0.85) < 5 * sd
  # Neighbouring elements (in memory, and one row apart) are uncorrelated.
  centred = keep - keep.mean()
  for lag in (1, 2, 1000):
    corr = np.mean(centred[:-lag] * centred[lag:]) / keep.var()
    assert abs(corr) < 5 / np.sqrt(n), (lag, corr)
  # Runs of dropped elements are as long as for independent draws: the number
  # of (keep, drop) transitions is n * 2 p q within 5 standard deviations.
  transitions = np.sum(keep[1:] != keep[:-1])
  expected = (n - 1) * 2 * 0.85 * 0.15
  assert abs(transitions - expected) < 5 * np.sqrt(expected)


def test_masks_differ_across_keys_and_repeat_for_one_key():
  shape = (64, 7, 7, 8)
  mask = jax.jit(lambda k: dropout.keep_mask(k, 0.85, shape))
  a = np.asarray(mask(jax.random.key(0)))
  b = np.asarray(mask(jax.random.key(1)))
  np.testing.assert_array_equal(a, np.asarray(mask(jax.random.key(0))))
  # Two independent masks agree where both keep or both drop:
  # p^2 + q^2 = 0.745 of the time.
  agree = np.mean(a == b)
  assert abs(agree - (0.85**2 + 0.15**2)) < 0.01, agree
  # Any key implementation works (an 'rbg' key's words come from
  # jax.random.bits; a Threefry key is its own words).
  c = np.asarray(mask(jax.random.key(0, impl="rbg")))
  assert abs(c.mean() - 0.85) < 0.01
  np.testing.assert_array_equal(
      np.asarray(dropout.key_words(jax.random.key(5))),
      np.asarray(jax.random.key_data(jax.random.key(5))),
  )
  raw = jax.random.PRNGKey(5)  # a raw uint32 (2,) Threefry key
  np.testing.assert_array_equal(
      np.asarray(dropout.key_words(raw)), np.asarray(raw)
  )
  with pytest.raises(ValueError, match="uint32 of shape \\(2,\\)"):
    dropout.key_words(np.zeros(4, np.uint32))


def test_streams_of_one_key_are_independent():
  """Stream n of a key is counter word n: its bits are Threefry's on
  (i, n), and two streams' masks agree only as independent masks do."""
  shape = (64, 7, 7, 8)
  key = jax.random.key(0)
  bits = np.asarray(dropout.element_bits(key, shape, stream=7))
  words = np.asarray(jax.random.key_data(key))
  index = np.arange(np.prod(shape), dtype=np.uint32)
  want = jax_random.threefry_2x32(
      words, np.stack([index, np.full_like(index, 7)])
  )[0]
  np.testing.assert_array_equal(bits.ravel(), np.asarray(want))
  a = np.asarray(dropout.keep_mask(key, 0.85, shape, stream=1))
  b = np.asarray(dropout.keep_mask(key, 0.85, shape, stream=2))
  agree = np.mean(a == b)
  assert abs(agree - (0.85**2 + 0.15**2)) < 0.01, agree
  with pytest.raises(ValueError, match="stream must be in"):
    dropout.keep_mask(key, 0.85, shape, stream=-1)


def test_dropout_values_and_gradient():
  x = jnp.asarray(np.random.RandomState(1).randn(4, 5, 5, 3), jnp.float32)
  key = jax.random.key(5)
  y = dropout.dropout(x, 0.15, key)
  keep = np.asarray(dropout.keep_mask(key, 0.85, x.shape))
  np.testing.assert_allclose(
      np.asarray(y), np.where(keep, np.asarray(x) / 0.85, 0.0), rtol=1e-6
  )
  grad = jax.grad(lambda v: jnp.sum(dropout.dropout(v, 0.15, key) * 2.0))(x)
  np.testing.assert_allclose(
      np.asarray(grad), np.where(keep, 2.0 / 0.85, 0.0), rtol=1e-6
  )
  assert dropout.dropout(x, 0.0, key) is x
  with pytest.raises(ValueError, match="dropout rate"):
    dropout.dropout(x, 1.0, key)


def test_dropout_layer_uses_the_dropout_stream():
  x = jnp.ones((2, 28, 28, 1))
  layer = models.Dropout(0.15)
  y1 = layer.apply(
      {}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
  )
  y2 = layer.apply(
      {}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  assert not np.array_equal(np.asarray(y1), np.asarray(y2))
  np.testing.assert_array_equal(
      np.asarray(layer.apply({}, x, deterministic=True)), np.asarray(x)
  )
  values = np.unique(np.asarray(y1))
  assert len(values) == 2
  np.testing.assert_allclose(values, [0.0, 1 / 0.85], rtol=1e-6)
