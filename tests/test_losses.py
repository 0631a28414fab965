"""The five-term objective, the frozen copy and the mismatch batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import losses
from cign_jax import models


class ScaleModel:
  """A stand-in network f(x) = w x (labels ignored), so that every loss term
  and its gradient can be written down by hand. It logs each forward call."""

  def __init__(self):
    self.calls = []

  def __call__(self, variables, x, labels, train, rngs, mutable):
    w = variables["params"]["w"]
    stats = variables["batch_stats"]
    self.calls.append(
        dict(
            batch=x.shape[0],
            x=x,
            labels=labels,
            frozen=isinstance(w, jax.core.Tracer) is False,
            stats_in=stats,
        )
    )
    return w * x, {"batch_stats": stats + 1}


def _data(b=3, seed=0):
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32))
  c = jnp.asarray(rs.randint(0, 10, (b,)).astype(np.int32))
  return x, c


def test_mismatch_batch_matches_a_loop():
  x, c = _data(4)
  xm, cm = losses.mismatch_batch(x, c, 10, 9)
  assert xm.shape == (36, 28, 28, 1)
  idx = 0
  for i in range(4):
    for label in [l for l in range(10) if l != int(c[i])]:
      assert int(cm[idx]) == label
      np.testing.assert_array_equal(xm[idx], x[i])
      idx += 1


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_random_wrong_labels(k):
  b = 50
  c = jnp.asarray(np.arange(b) % 10, jnp.int32)
  x = jnp.broadcast_to(
      jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 28, 28, 1)
  )
  xm, cm = losses.mismatch_batch(x, c, 10, k, jax.random.key(3))
  assert xm.shape[0] == cm.shape[0] == b * k
  cm = np.asarray(cm).reshape(b, k)
  for i in range(b):
    assert len(set(cm[i])) == k, "wrong labels of one image are distinct"
    assert i % 10 not in cm[i], "never the true label"
    assert np.all(np.asarray(xm).reshape(b, k, 28 * 28)[i] == i)
  if k:
    assert 0 <= cm.min() and cm.max() <= 9
    assert len(np.unique(cm)) == 10  # all labels get used over 50 images


def test_terms_and_gradient_by_hand():
  """With f(x) = w x every term and d/dw can be computed by hand; the
  gradient shows the frozen copy (outer f) and the stopped tightness input."""
  x, c = _data(3)
  w0 = 0.7
  cfg = losses.LossConfig()
  model = ScaleModel()
  params = {"w": jnp.float32(w0)}
  (total, (terms, stats)), grad = jax.value_and_grad(
      lambda p: losses.idempotent_loss(
          model, p, jnp.float32(0), x, c, jax.random.key(0), cfg
      ),
      has_aux=True,
  )(params)

  # Seven forward calls, each its own batch, in the original's order.
  assert [call["batch"] for call in model.calls] == [3, 3, 27, 3, 3, 27, 27]
  # Running statistics chain through the trained network's calls only
  # (real, noise, mismatch, tight-noise, tight-mismatch); copies are dropped.
  assert [float(call["stats_in"]) for call in model.calls] == [
      0,
      1,
      2,
      3,
      3,
      4,
      4,
  ]
  assert float(stats) == 5
  z = np.asarray(model.calls[1]["x"])
  mz, mx = np.abs(z).mean(), np.abs(np.asarray(x)).mean()
  a = abs(w0 - 1)
  want = {
      "loss_rec": 20 * a * mx,
      "loss_idem_noise": 20 * a * w0 * mz,
      "loss_tight_noise": -2.5 * a * w0 * mz,
      "loss_idem_mismatch": 3.0 * a * w0 * mx,
      "loss_tight_mismatch": -1.0 * a * w0 * mx,
  }
  for key, value in want.items():
    np.testing.assert_allclose(float(terms[key]), value, rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(total), sum(want.values()), rtol=1e-5)
  # d/dw: rec |w-1| mx -> -mx (w < 1); idem |w0 w - w| -> |w0 - 1| through
  # the inner f only; tight -|w - 1| |y| with y = w0 z stopped -> +w0 mz.
  grad_want = (
      20 * -mx + 20 * a * mz + 2.5 * w0 * mz + 3.0 * a * mx + 1.0 * w0 * mx
  )
  np.testing.assert_allclose(float(grad["w"]), grad_want, rtol=1e-5)


def test_smooth_clamp_tightness_by_hand():
  x, c = _data(3, seed=1)
  w0, a_const = 0.4, 1.5
  cfg = losses.LossConfig(tightness="smooth_clamp", tightness_clamp_a=a_const)
  model = ScaleModel()
  _, (terms, _) = losses.idempotent_loss(
      model,
      {"w": jnp.float32(w0)},
      jnp.float32(0),
      x,
      c,
      jax.random.key(1),
      cfg,
  )
  z = np.asarray(model.calls[1]["x"])
  rec = abs(w0 - 1) * np.abs(np.asarray(x)).mean()
  per_sample = -abs(w0 - 1) * w0 * np.abs(z).reshape(3, -1).mean(1)
  scale = a_const * rec
  want = 2.5 * np.mean(np.tanh(per_sample / scale) * scale)
  np.testing.assert_allclose(float(terms["loss_tight_noise"]), want, rtol=1e-5)


def test_unconditional_has_no_mismatch_terms():
  x, c = _data(2)
  model = ScaleModel()
  cfg = losses.LossConfig(conditional=False)
  _, (terms, _) = losses.idempotent_loss(
      model,
      {"w": jnp.float32(0.5)},
      jnp.float32(0),
      x,
      c,
      jax.random.key(0),
      cfg,
  )
  assert [call["batch"] for call in model.calls] == [2, 2, 2, 2]
  assert float(terms["loss_idem_mismatch"]) == 0.0
  assert float(terms["loss_tight_mismatch"]) == 0.0


def test_stop_gradient_equals_a_separate_frozen_copy():
  """The real network: gradient with stop_gradient(params) as the frozen copy
  equals the gradient with a genuinely separate, constant copy of the
  parameters; without freezing, it would differ (the loss depends on the
  copy: its gradient there is not zero)."""
  model = models.IdempotentNetwork(
      conditioning="channel", latent_dim=2, intermediate_dim=4
  )
  variables = models.init_variables(model, jax.random.key(0))
  params, stats = variables["params"], variables["batch_stats"]
  x, c = _data(2)
  cfg = losses.LossConfig()
  key = jax.random.key(5)

  def loss(p, frozen=None):
    return losses.idempotent_loss(
        model.apply, p, stats, x, c, key, cfg, frozen_params=frozen
    )[0]

  g_stop = jax.jit(jax.grad(loss))(params)
  copy = jax.tree_util.tree_map(lambda a: jnp.array(np.asarray(a)), params)
  # The gradient with respect to the live parameters (the separate copy held
  # constant) and to the copy, in one program: without freezing, the
  # gradient of loss(p, frozen=p) would be their sum (the chain rule).
  g_copy, g_through_copy = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, copy)
  flat = lambda g: np.concatenate(
      [np.ravel(a) for a in jax.tree_util.tree_leaves(g)]
  )
  np.testing.assert_allclose(flat(g_stop), flat(g_copy), rtol=1e-5, atol=1e-7)
  assert np.max(np.abs(flat(g_through_copy))) > 1e-4


def test_training_noise_and_prior():
  key = jax.random.key(0)
  x = jnp.zeros((64, 28, 28, 1))
  noisy = np.asarray(losses.add_training_noise(key, x, 0.15))
  assert abs(noisy.std() - 0.15) < 0.005
  ones = np.asarray(losses.add_training_noise(key, jnp.ones_like(x), 0.15))
  assert ones.max() == 1.0  # clamped
  z = np.asarray(losses.sample_prior(key, (64, 28, 28, 1), clip=False))
  assert abs(z.std() - 1) < 0.02 and np.abs(z).max() > 1.5
  zc = np.asarray(losses.sample_prior(key, (64, 28, 28, 1), clip=True))
  assert np.abs(zc).max() == 1.0
