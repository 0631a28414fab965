"""The networks f: X -> X (Flax linen, NHWC), and building one from a config.

- `cign`: the CIGN paper's network, `IdempotentNetwork` (architecture
  'cign'; channel, filter or no conditioning).
- `ign_dcgan`: the IGN code's unconditional MNIST network,
  `DCGANIdempotentNetwork` (architecture 'ign_dcgan').
- `dcgan`: pytorch/examples' DCGAN as an IGN, the IGN paper's CelebA 64x64
  network, `DCGANNetwork` (architecture 'dcgan').
- `layers`: the blocks both are made of, with PyTorch's semantics.
- `checks`: the checks of labels and images at the API boundary.

`model_from_config` builds the network a config names; `init_variables`
initialises it.
"""

from __future__ import annotations

import functools
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cign_jax.models.checks import check_finite
from cign_jax.models.checks import check_input_shape
from cign_jax.models.checks import check_images
from cign_jax.models.checks import check_labels
from cign_jax.models.checks import count_parameters
from cign_jax.models.cign import Discriminator
from cign_jax.models.cign import DISCRIMINATOR_LAYOUT
from cign_jax.models.cign import Generator
from cign_jax.models.cign import GENERATOR_LAYOUT
from cign_jax.models.cign import IdempotentNetwork
from cign_jax.models.cign import LAYOUTS
from cign_jax.models.dcgan import DCGANNetwork
from cign_jax.models.ign_dcgan import DCGAN_DECODER_LAYOUT
from cign_jax.models.ign_dcgan import DCGAN_ENCODER_LAYOUT
from cign_jax.models.ign_dcgan import DCGANDecoder
from cign_jax.models.ign_dcgan import DCGANEncoder
from cign_jax.models.ign_dcgan import DCGANIdempotentNetwork
from cign_jax.models.ign_dcgan import dcgan_model_from_config
from cign_jax.models.layers import ChannelConditioning
from cign_jax.models.layers import ChannelDropout
from cign_jax.models.layers import Conv
from cign_jax.models.layers import Dropout
from cign_jax.models.layers import FilterConditionedConv
from cign_jax.models.layers import Linear
from cign_jax.models.layers import precision_context
from cign_jax.models.layers import torch_uniform_init
from cign_jax.models.layers import TorchBatchNorm
from cign_jax.models import cign as _cign
from cign_jax.models import dcgan as _dcgan
from cign_jax.models import ign_dcgan as _ign_dcgan
from cign_jax.models import layers as _layers


class _Package(types.ModuleType):
  """Setting a name on the package sets it in the submodules that define it
  too, as when the networks were one module: a port to another precision
  replaces `jnp` and `Linear` here once (tests/test_convert.py)."""

  def __setattr__(self, name, value):
    super().__setattr__(name, value)
    for module in (_layers, _cign, _ign_dcgan, _dcgan):
      if name in vars(module):
        setattr(module, name, value)


sys.modules[__name__].__class__ = _Package


def model_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The network `config.model` describes: `IdempotentNetwork` for
  architecture 'cign' (the default), `DCGANIdempotentNetwork` for
  'ign_dcgan', `DCGANNetwork` for 'dcgan'. The image shape and class count
  must be set (a training fills those left 0 from its data)."""
  m = config.model
  for key in ("image_size", "image_channels", "num_classes"):
    if int(m.get(key, 1)) < 1:
      raise ValueError(
          f"config.model.{key} is unset ({m[key]}): training takes it from "
          "the data; to build the network without data, set it"
      )
  architecture = m.get("architecture", "cign")
  if architecture == "ign_dcgan":
    return dcgan_model_from_config(config)
  if architecture == "dcgan":
    return DCGANNetwork(
        latent_dim=m.latent_dim,
        intermediate_dim=m.intermediate_dim,
        image_channels=m.image_channels,
        image_size=m.image_size,
        num_classes=m.num_classes,
        conditioning=m.conditioning,
        dtype=jnp.dtype(config.get("compute_dtype", "float32")),
    )
  if architecture != "cign":
    raise ValueError(
        f"config.model.architecture: unknown architecture "
        f"{architecture!r}; expected 'cign', 'ign_dcgan' or 'dcgan'"
    )
  return IdempotentNetwork(
      conditioning=m.conditioning,
      latent_dim=m.latent_dim,
      intermediate_dim=m.intermediate_dim,
      embedding_dim=m.embedding_dim,
      num_classes=m.num_classes,
      image_channels=m.image_channels,
      dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(config.get("compute_dtype", "float32")),
      channel_conv=m.get("channel_conv", "auto"),
      matmul_precision=config.get("matmul_precision", "default"),
      image_size=m.get("image_size", 28),
  )


def image_shape(model: nn.Module) -> tuple:
  """(H, W, C) of the images `model` maps."""
  size = getattr(model, "image_size", 28)
  return (size, size, model.image_channels)


def init_variables(model: IdempotentNetwork, key, batch_size: int = 2):
  """Initial variables (PyTorch's init distributions), jitted: run eagerly
  the init dispatches thousands of small ops and takes most of a minute.
  The model is a static argument (modules compare by their fields), so
  equal networks share one compiled init."""
  return _jitted_init(model, key, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(model, key, batch_size):
  x = jnp.zeros((batch_size,) + image_shape(model), jnp.float32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  return model.init({"params": key}, x, labels, train=False)
