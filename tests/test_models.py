"""Architecture of the IGN/CIGN models: sizes, parameter counts, BatchNorm."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import config as config_lib
from cign_jax import models

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

# The author's models (paper, tables 1 and 2; reference/cign.md).
PAPER_PARAMETER_COUNTS = {
    "channel_small": 1_546_374,
    "channel_large": 5_607_110,
    "filter_small": 616_005,
    "filter_large": 1_380_293,
}


def _shapes(model):
  return jax.eval_shape(
      lambda k: models.init_variables(model, k), jax.random.key(0)
  )


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETER_COUNTS))
def test_parameter_counts_match_the_paper(name):
  config = config_lib.load_config_file(os.path.join(CONFIGS, f"{name}.py"))
  shapes = _shapes(models.model_from_config(config))
  assert models.count_parameters(shapes["params"]) == (
      PAPER_PARAMETER_COUNTS[name]
  )


def _hand_count_channel(ld, idim, ed=5):
  """Counted from the layer tables of the paper's appendix A.1."""
  disc_convs = [
      (1, ld, 4),
      (ld, 2 * ld, 4),
      (2 * ld, 4 * ld, 3),
      (4 * ld, 8 * ld, 4),
      (8 * ld, idim, 2),
  ]
  gen_convs = [
      (idim, 8 * ld, 2),
      (8 * ld, 4 * ld, 4),
      (4 * ld, 2 * ld, 3),
      (2 * ld, ld, 4),
      (ld, 1, 4),
  ]
  maps_disc = [28 * 28, 14 * 14, 7 * 7, 4 * 4, 2 * 2]
  maps_gen = [1, 2 * 2, 4 * 4, 7 * 7, 14 * 14]
  n = 2 * 10 * ed
  n += sum((ci + 1) * co * k * k for ci, co, k in disc_convs + gen_convs)
  n += sum((ed + 1) * m for m in maps_disc + maps_gen)
  n += 2 * (ld + 2 * ld + 4 * ld + 8 * ld)  # discriminator BN 1..4
  n += 2 * (idim + 8 * ld + 4 * ld + 2 * ld + ld)  # generator BN 1..5
  return n


@pytest.mark.parametrize("ld,idim", [(3, 7), (8, 16)])
def test_channel_parameter_count_by_hand(ld, idim):
  model = models.IdempotentNetwork(
      conditioning="channel", latent_dim=ld, intermediate_dim=idim
  )
  assert models.count_parameters(_shapes(model)["params"]) == (
      _hand_count_channel(ld, idim)
  )


@pytest.mark.parametrize("conditioning", ["channel", "filter", "none"])
def test_shapes_and_ranges(conditioning):
  model = models.IdempotentNetwork(
      conditioning=conditioning, latent_dim=4, intermediate_dim=8
  )
  variables = models.init_variables(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, 28, 28, 1))
  labels = jnp.arange(5)
  y = jax.jit(lambda v, a, c: model.apply(v, a, c, train=False))(
      variables, x, labels
  )
  assert y.shape == (5, 28, 28, 1)
  assert float(jnp.max(jnp.abs(y))) <= 1.0  # tanh output
  h = jax.jit(
      lambda v, a, c: model.apply(
          v,
          a,
          c,
          train=False,
          method=lambda m, a, c, train: m.discriminator(a, c, train),
      )
  )(variables, x, labels)
  assert h.shape == (5, 1, 1, 8)
  assert float(h.min()) >= 0.0 and float(h.max()) <= 1.0  # sigmoid


def test_labels_change_the_output_only_when_conditioned():
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  for conditioning, should_differ in (
      ("channel", True),
      ("filter", True),
      ("none", False),
  ):
    model = models.IdempotentNetwork(
        conditioning=conditioning, latent_dim=4, intermediate_dim=8
    )
    v = models.init_variables(model, jax.random.key(0))
    f = jax.jit(lambda v, x, c: model.apply(v, x, c, train=False))
    a = f(v, x, jnp.zeros(4, jnp.int32))
    b = f(v, x, jnp.full(4, 7, jnp.int32))
    assert bool(jnp.any(jnp.abs(a - b) > 1e-6)) == should_differ, conditioning


def test_eval_mode_is_deterministic_train_mode_uses_dropout():
  model = models.IdempotentNetwork(
      conditioning="channel", latent_dim=4, intermediate_dim=8
  )
  v = models.init_variables(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  c = jnp.arange(4)
  f = jax.jit(lambda v, x, c: model.apply(v, x, c, train=False))
  np.testing.assert_array_equal(f(v, x, c), f(v, x, c))
  g = jax.jit(
      lambda v, x, c, k: model.apply(
          v, x, c, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
      )[0]
  )
  outs = [g(v, x, c, jax.random.key(i)) for i in range(2)]
  assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-4


def test_torch_batchnorm_semantics():
  """Biased variance to normalise, unbiased to update; momentum 0.1."""
  bn = models.TorchBatchNorm()
  x = (
      np.random.RandomState(0).standard_normal((4, 3, 2, 5)).astype(np.float32)
      * 3
      + 1
  )
  v = bn.init(jax.random.key(0), jnp.asarray(x), train=False)
  y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
  flat = x.reshape(-1, 5).astype(np.float64)
  mean, var_b, var_u = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  np.testing.assert_allclose(
      np.asarray(y), (x - mean) / np.sqrt(var_b + 1e-5), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(
      upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
      upd["batch_stats"]["var"], 0.9 + 0.1 * var_u, rtol=1e-5
  )
  y_eval = bn.apply(
      {"params": v["params"], "batch_stats": upd["batch_stats"]},
      jnp.asarray(x),
      train=False,
  )
  rm, rv = 0.1 * mean, 0.9 + 0.1 * var_u
  np.testing.assert_allclose(
      np.asarray(y_eval), (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-4, atol=1e-4
  )


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="unknown conditioning"):
    models.init_variables(
        models.IdempotentNetwork(conditioning="spatial"), jax.random.key(0)
    )
  model = models.IdempotentNetwork(
      conditioning="channel", latent_dim=4, intermediate_dim=8
  )
  v = models.init_variables(model, jax.random.key(0))
  with pytest.raises(ValueError, match="shape"):
    model.apply(v, jnp.zeros((2, 32, 32, 1)), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="needs labels"):
    model.apply(v, jnp.zeros((2, 28, 28, 1)))
  with pytest.raises(ValueError, match="label out of range: 10"):
    models.check_labels([0, 10], 10)
  with pytest.raises(ValueError, match="wrong image shape"):
    models.check_images(np.zeros((2, 27, 28)))


def test_config_errors_name_the_key():
  config = config_lib.base_config()
  config.model.conditioning = "spatial"
  with pytest.raises(ValueError, match="model.conditioning"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.loss.rec_weight = -1.0
  with pytest.raises(ValueError, match="loss.rec_weight"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.loss.num_mismatch_labels = 10
  with pytest.raises(ValueError, match="num_mismatch_labels"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.optimizer.lr_schedule = "linear"
  with pytest.raises(ValueError, match="optimizer.lr_schedule"):
    config_lib.validate(config)
  config = config_lib.base_config()
  with config.unlocked():
    config.model.latentdim = 3
  with pytest.raises(ValueError, match="model.latentdim: unknown config key"):
    config_lib.validate(config)
