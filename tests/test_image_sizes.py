"""The networks at other image sizes: CIGN at 32x32 and 64x64 (any
conditioning, any channel count) and pytorch/examples' DCGAN as an IGN at
64x64; the config's size checks; sampling and grids of RGB images."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import sampling
from cign_jax import train_step as train_step_lib
from conftest import tiny_config


def _config(size, channels, conditioning="channel", num_classes=3, **more):
  return tiny_config(
      **{
          "model.image_size": size,
          "model.image_channels": channels,
          "model.num_classes": num_classes,
          "model.conditioning": conditioning,
          "loss.num_mismatch_labels": 1 if conditioning != "none" else 0,
          **more,
      }
  )


def _shapes(model):
  return jax.eval_shape(
      lambda k: models.init_variables(model, k), jax.random.key(0)
  )


def _hand_count_cign(size, channels, conditioning, ld, idim, ed, k):
  """From the description: halving 4x4 convolutions from `size` to 4, a 4x4
  valid one to 1x1, mirrored; ld, 2 ld, ... channels; conditioning in every
  block."""
  halvings = {32: 3, 64: 4}[size]
  widths = [ld * 2**i for i in range(halvings)]
  down_in = [channels] + widths
  down_out = widths + [idim]
  up_in = [idim] + widths[::-1]
  up_out = widths[::-1] + [channels]
  down_maps = [size // 2**i for i in range(halvings + 1)]  # input sizes
  up_maps = [1] + [4 * 2**i for i in range(halvings)]
  n = 0
  for ci, co, m in zip(down_in + up_in, down_out + up_out, down_maps + up_maps):
    if conditioning == "channel":
      n += (ci + 1) * co * 16 + (ed + 1) * m * m
    elif conditioning == "filter":
      n += (ed + 1) * 16 * ci + (ci + 1) * co
    else:
      n += ci * co * 16
  if conditioning != "none":
    n += 2 * k * ed  # one label embedding per half
  n += 2 * sum(widths)  # discriminator BatchNorms, before blocks 2..
  n += 2 * (idim + sum(widths))  # generator BatchNorms, before every block
  return n


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("conditioning", ["channel", "filter", "none"])
def test_cign_parameter_count_by_hand(size, conditioning):
  config = _config(size, 3, conditioning)
  shapes = _shapes(models.model_from_config(config))
  m = config.model
  assert models.count_parameters(shapes["params"]) == _hand_count_cign(
      size, 3, conditioning, m.latent_dim, m.intermediate_dim,
      m.embedding_dim, m.num_classes,
  )  # fmt: skip


@pytest.mark.parametrize("size,channels", [(32, 3), (64, 3), (32, 1)])
@pytest.mark.parametrize("conditioning", ["channel", "filter"])
def test_cign_maps_images_to_their_shape(size, channels, conditioning):
  model = models.model_from_config(_config(size, channels, conditioning))
  variables = models.init_variables(model, jax.random.key(0))
  x = jnp.asarray(
      np.random.RandomState(0).uniform(-1, 1, (2, size, size, channels)),
      jnp.float32,
  )
  out = model.apply(variables, x, jnp.array([0, 2]))
  assert out.shape == (2, size, size, channels)
  assert np.all(np.abs(np.asarray(out)) <= 1.0)  # tanh out
  # The label changes the output: the conditioning reaches the network.
  other = model.apply(variables, x, jnp.array([1, 1]))
  assert not np.allclose(out, other)


def test_dcgan_parameter_count_by_hand():
  """pytorch/examples' DCGAN halves with b = 4, nz = 6, C = 3: bias-free
  4x4 convolutions, BatchNorm (scale, bias) after all but the first and last
  encoder convolution and after all but the last decoder one."""
  b, nz, c = 4, 6, 3
  enc = [(c, b), (b, 2 * b), (2 * b, 4 * b), (4 * b, 8 * b), (8 * b, nz)]
  dec = [(nz, 8 * b), (8 * b, 4 * b), (4 * b, 2 * b), (2 * b, b), (b, c)]
  want = sum(ci * co * 16 for ci, co in enc + dec)
  want += 2 * (2 * b + 4 * b + 8 * b) + 2 * (8 * b + 4 * b + 2 * b + b)
  config = _config(
      64, 3, "none", **{"model.architecture": "dcgan",
                        "model.latent_dim": b, "model.intermediate_dim": nz}
  )  # fmt: skip
  model = models.model_from_config(config)
  assert isinstance(model, models.DCGANNetwork)
  assert models.count_parameters(_shapes(model)["params"]) == want


def test_dcgan_paper_size_count():
  """The IGN paper's CelebA network: b = 64, nz = 100, RGB."""
  config = config_lib.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs",
                   "ign_celeba64.py")
  )  # fmt: skip
  config.model.image_size, config.model.image_channels = 64, 3
  params = _shapes(models.model_from_config(config))["params"]
  enc = 3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 100
  dec = 100 * 512 + 512 * 256 + 256 * 128 + 128 * 64 + 64 * 3
  bn = 2 * (128 + 256 + 512) + 2 * (512 + 256 + 128 + 64)
  assert models.count_parameters(params) == 16 * (enc + dec) + bn


@pytest.mark.parametrize(
    "size,architecture,conditioning",
    [(32, "cign", "channel"), (64, "cign", "filter"), (64, "dcgan", "none")],
)
def test_a_training_step_runs_at_the_size(size, architecture, conditioning):
  config = _config(
      size, 3, conditioning, **{"model.architecture": architecture}
  )
  state = train_step_lib.create_train_state(config)
  step = jax.jit(train_step_lib.make_train_step(config))
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.uniform(-1, 1, (4, size, size, 3)), jnp.float32)
  c = jnp.asarray([0, 1, 2, 0], jnp.int32)
  new, metrics = step(state, x, c, jax.random.key(1))
  assert float(metrics["finite"]) == 1.0
  assert np.isfinite(float(metrics["loss"]))
  assert float(metrics["loss_idem_noise"]) > 0  # the idempotence term ran
  moved = jax.tree_util.tree_map(
      lambda a, b: bool(jnp.any(a != b)), new.params, state.params
  )
  assert any(jax.tree_util.tree_leaves(moved))


@pytest.mark.parametrize(
    "architecture,size,sizes",
    [("cign", 48, "28 or 32 or 64"), ("ign_dcgan", 32, "28"),
     ("dcgan", 32, "64")],
)  # fmt: skip
def test_the_config_names_the_sizes_an_architecture_takes(
    architecture, size, sizes
):
  config = _config(
      size,
      3,
      "none",
      **{"model.architecture": architecture, "model.intermediate_dim": 16},
  )
  with pytest.raises(ValueError, match=f"model.image_size.*{sizes}"):
    config_lib.validate(config)


def test_the_unset_shape_is_the_datas():
  config = _config(0, 0, num_classes=0)
  config_lib.validate(config)
  with pytest.raises(ValueError, match="image_size is unset"):
    models.model_from_config(config)
  fitted = config_lib.fit_to_data(config, (32, 32, 3), 4, ("a", "b", "c", "d"))
  assert (fitted.model.image_size, fitted.model.image_channels) == (32, 3)
  assert fitted.model.num_classes == 4
  assert tuple(fitted.data.class_names) == ("a", "b", "c", "d")
  with pytest.raises(ValueError, match="image_channels is 1, but the data"):
    config_lib.fit_to_data(_config(32, 1), (32, 32, 3), 3)
  with pytest.raises(ValueError, match="takes images of size 28 or 32 or 64"):
    config_lib.fit_to_data(_config(0, 0), (48, 48, 3), 3)
  with pytest.raises(ValueError, match="at least two classes"):
    config_lib.fit_to_data(_config(0, 0, num_classes=0), (32, 32, 3), 1)


def test_sample_grid_of_rgb_images_is_rgb():
  config = _config(32, 3)
  model = models.model_from_config(config)
  variables = models.init_variables(model, jax.random.key(0))
  grid = sampling.write_sample_grid(config, model, variables, num_per_label=2)
  pad = 2
  assert grid.shape == (3 * (32 + pad) + pad, 2 * (32 + pad) + pad, 3)
  assert grid.dtype == np.uint8
  noise = sampling.model_prior_noise(jax.random.key(0), model, 5)
  assert noise.shape == (5, 32, 32, 3)


def test_grid_image_places_each_image():
  rows = np.full((2, 3, 4, 5, 3), -1.0, np.float32)
  rows[1, 2] = 1.0
  rows[0, 1, :, :, 0] = 1.0  # a red image
  grid = sampling.grid_image(rows, pad=1)
  assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
  assert np.all(grid[1 + 5 : 1 + 5 + 4, 1 + 12 : 1 + 12 + 5] == 255)
  red = grid[1:5, 7:12]
  assert np.all(red[..., 0] == 255) and np.all(red[..., 1:] == 0)
  assert grid[0, 0].tolist() == [255, 255, 255]  # the gaps are white
