"""The IGN code's unconditional DCGAN-like network (`ign_dcgan`).

The reference is a PyTorch model written here from the network's description
(bias-free convolutions 4x4/2, 4x4/2, then three 3x3 without padding down to
a 1x1 code, transposed convolutions back; BatchNorm; Dropout2d; LeakyReLU 0.2
in the encoder, ReLU in the decoder, tanh out). Ours must have the same
parameters, layer shapes and outputs (eval mode, and train mode without
dropout, running statistics included); its channel dropout must drop whole
feature maps; its config must train, checkpoint and sample with the
library's ordinary code. The comparisons with PyTorch (parameters, layer
shapes, outputs, Adam) are in `test_ign_dcgan_torch.py`, which needs the
optional `torch` extra.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import models
from cign_jax import sampling
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def _ours(b=64, d=512, p=0.1):
  model = models.DCGANIdempotentNetwork(
      latent_dim=b, intermediate_dim=d, dropout_rate=p
  )
  return model, models.init_variables(model, jax.random.key(0))


def _inputs(n=6, seed=0):
  rs = np.random.RandomState(seed)
  noise = rs.standard_normal((n // 2, 28, 28, 1))
  images = np.clip(rs.uniform(-1.2, 1.0, (n - n // 2, 28, 28, 1)), -1, 1)
  return np.concatenate([noise, images]).astype(np.float32)


def test_channel_dropout_drops_whole_feature_maps():
  b, c, rate = 64, 64, 0.25
  x = jnp.asarray(
      np.random.RandomState(0).uniform(0.5, 1.5, (b, 5, 7, c)), jnp.float32
  )
  key = jax.random.key(3)
  y = np.asarray(dropout_lib.channel_dropout(x, rate, key))
  kept = np.all(y != 0, axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped)  # no map is partly dropped
  np.testing.assert_allclose(
      y[kept.nonzero()[0], :, :, kept.nonzero()[1]],
      np.asarray(x)[kept.nonzero()[0], :, :, kept.nonzero()[1]] / (1 - rate),
      rtol=1e-6,
  )
  # 4096 Bernoulli(0.25) decisions: standard deviation of the rate 0.0068.
  assert abs(dropped.mean() - rate) < 0.03
  # Deterministic in the key, different across keys.
  np.testing.assert_array_equal(
      y, np.asarray(dropout_lib.channel_dropout(x, rate, key))
  )
  other = np.asarray(dropout_lib.channel_dropout(x, rate, jax.random.key(4)))
  assert np.any(np.all(other == 0, axis=(1, 2)) != dropped)
  np.testing.assert_array_equal(
      np.asarray(dropout_lib.channel_dropout(x, 0.0, key)), np.asarray(x)
  )
  with pytest.raises(ValueError, match="dropout rate"):
    dropout_lib.channel_dropout(x, 1.0, key)
  with pytest.raises(ValueError, match="channel dropout needs"):
    dropout_lib.channel_dropout(x[0], 0.1, key)


def test_network_dropout_is_channel_wise_and_follows_the_rng():
  """In train mode every ChannelDropout output map of the network is all
  zero or has no zero; the 'dropout' key alone decides which."""
  model, variables = _ours(16, 128, p=0.3)
  x = jnp.asarray(_inputs(8))

  def run(key):
    return model.apply(
        variables,
        x,
        train=True,
        rngs={"dropout": key},
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, method: isinstance(
            mdl, models.ChannelDropout
        ),
    )

  out_a, state_a = run(jax.random.key(0))
  out_b, _ = run(jax.random.key(0))
  out_c, _ = run(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  assert float(jnp.max(jnp.abs(out_a - out_c))) > 1e-4
  maps = jax.tree_util.tree_leaves(state_a["intermediates"])
  assert len(maps) == 8  # four in each half
  total = dropped = 0
  for y in maps:
    y = np.asarray(y)
    zero = np.all(y == 0, axis=(1, 2))
    assert np.all(zero | np.all(y != 0, axis=(1, 2)))
    total += zero.size
    dropped += zero.sum()
  assert abs(dropped / total - 0.3) < 0.05
  # Eval mode: no dropout, the same output whatever the key.
  f = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(
      np.asarray(f), np.asarray(model.apply(variables, x, train=False))
  )


def test_configs():
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py")
  )
  assert config.model.architecture == "ign_dcgan"
  assert config.model.conditioning == "none"
  assert config.model.dropout_rate == 0.1
  assert (
      config.optimizer.name,
      config.optimizer.learning_rate,
      config.optimizer.b1,
      config.optimizer.b2,
      config.optimizer.weight_decay,
  ) == ("adam", 1e-4, 0.5, 0.999, 0.0)
  assert (config.batch_size, config.num_epochs) == (256, 50)
  assert (
      config.loss.rec_weight,
      config.loss.idem_noise_weight,
      config.loss.tight_noise_weight,
  ) == (20.0, 20.0, 2.5)
  assert config.loss.tightness == "l1"  # the IGN code's plain L1
  model = models.model_from_config(config)
  assert isinstance(model, models.DCGANIdempotentNetwork)
  assert (model.latent_dim, model.intermediate_dim) == (64, 512)

  ablation = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ablation_unconditional.py")
  )
  model = models.model_from_config(ablation)
  assert isinstance(model, models.IdempotentNetwork)
  assert (ablation.model.architecture, model.conditioning) == ("cign", "none")


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "model.architecture",
            "unet",
            "config.model.architecture: unknown architecture 'unet'",
        ),
        (
            "model.conditioning",
            "channel",
            "config.model.conditioning: the 'ign_dcgan' network is unconditional",
        ),
        (
            "model.intermediate_dim",
            100,
            "config.model.intermediate_dim: .* multiple of 16, got 100",
        ),
        (
            "optimizer.name",
            "sgd",
            "config.optimizer.name: unknown optimizer 'sgd'.*'adamw', 'adam'",
        ),
    ],
)
def test_bad_config_is_named(field, value, message):
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py")
  )
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_bad_model_arguments_are_named():
  with pytest.raises(ValueError, match="multiple of 16"):
    _ours(8, 24)
  with pytest.raises(ValueError, match="unconditional"):
    models.init_variables(
        models.DCGANIdempotentNetwork(conditioning="channel"), jax.random.key(0)
    )
  model, variables = _ours(8, 64)
  with pytest.raises(ValueError, match=r"\(B, 28, 28, 1\)"):
    model.apply(variables, jnp.zeros((2, 32, 32, 1)))
  config = config_lib.base_config()
  config.model.architecture = "unet"
  with pytest.raises(ValueError, match="unknown architecture 'unet'"):
    models.model_from_config(config)


def test_train_step_on_fake_data_is_finite():
  """One step of the real config (5.5M parameters) on a small fake batch."""
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py")
  )
  state = train_step_lib.create_train_state(config)
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.uniform(-1, 1, (4, 28, 28, 1)), jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)
  step = jax.jit(train_step_lib.make_train_step(config))
  new_state, metrics = step(state, images, labels, jax.random.key(0))
  assert float(metrics["finite"]) == 1.0
  for name in ("loss", "loss_rec", "loss_idem_noise", "loss_tight_noise"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["loss_rec"]) > 0
  assert float(metrics["loss_tight_noise"]) < 0
  assert float(metrics["loss_idem_mismatch"]) == 0.0
  assert float(metrics["loss_tight_mismatch"]) == 0.0
  assert int(new_state.step) == 1
  before = jax.tree_util.tree_leaves(state.params)
  after = jax.tree_util.tree_leaves(new_state.params)
  # Adam's first step moves every weight by about the learning rate.
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(after, before))
  assert 0.5e-4 < moved <= 1.01e-4
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in after)


def test_training_checkpoints_and_sampling_work_unchanged(tmp_path):
  """A tiny ign_dcgan run through `train_and_evaluate` on fake data, then
  `checkpoints.load_model` and `sampling.generate` on its directory."""
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py")
  )
  config.model.latent_dim = 4
  config.model.intermediate_dim = 32
  config.batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (16, 28, 28, 1)).astype(np.uint8)
  labels = rs.randint(0, 10, (16,)).astype(np.int64)
  workdir = str(tmp_path / "run")
  # A test split: the config keeps its best checkpoint by validation loss.
  train.train_and_evaluate(
      config,
      workdir,
      dataset={"train": (images, labels), "test": (images[:8], labels[:8])},
  )
  assert os.path.isfile(os.path.join(workdir, "samples.png"))
  assert checkpoints.read_best(workdir)["metric"] == "val_loss"
  loaded, model, variables, step = checkpoints.load_model(workdir)
  assert step == 2
  assert loaded.model.architecture == "ign_dcgan"
  assert isinstance(model, models.DCGANIdempotentNetwork)
  out = sampling.generate(model, variables, [0, 0, 0], jax.random.key(0))
  assert out.shape == (3, 28, 28, 1)
  assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1)
