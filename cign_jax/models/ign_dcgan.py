"""The unconditional DCGAN-like network of the IGN code (MNIST, 28x28):
`DCGANIdempotentNetwork`, config.model.architecture = 'ign_dcgan'."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cign_jax.models.checks import check_input_shape
from cign_jax.models.layers import ChannelDropout
from cign_jax.models.layers import Conv
from cign_jax.models.layers import TorchBatchNorm

# (kernel, stride, padding) of the five convolutions of each half. Encoder:
# 28 -> 14 -> 7 -> 5 -> 3 -> 1; decoder (transposed): 1 -> 3 -> 5 -> 7 -> 14
# -> 28.
DCGAN_ENCODER_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 1, 0), (3, 1, 0), (3, 1, 0))
DCGAN_DECODER_LAYOUT = ((3, 1, 0), (3, 1, 0), (3, 1, 0), (4, 2, 1), (4, 2, 1))


class DCGANEncoder(nn.Module):
  """The encoder half, (B, 28, 28, C) -> (B, 1, 1, channels[-1]).

  Blocks 1-4: conv_i (no bias) -> channel dropout -> LeakyReLU 0.2, then
  batch_norm_i after blocks 1-3; block 5: conv_5 alone (no norm, dropout or
  activation), the code.
  """

  channels: Sequence[int]
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    last = len(self.channels)
    for i, (features, (k, s, p)) in enumerate(
        zip(self.channels, DCGAN_ENCODER_LAYOUT), start=1
    ):
      x = Conv(features, k, s, p, dtype=self.dtype, name=f"conv_{i}")(x)
      if i == last:
        break
      x = ChannelDropout(self.dropout_rate)(x, deterministic=not train)
      x = nn.leaky_relu(x, 0.2)
      if i < last - 1:
        x = TorchBatchNorm(name=f"batch_norm_{i}", dtype=self.dtype)(x, train)
    return x


class DCGANDecoder(nn.Module):
  """The decoder half, (B, 1, 1, C) -> (B, 28, 28, channels[-1]).

  Blocks 1-4: batch_norm_i -> transposed conv_i (no bias) -> channel
  dropout -> ReLU; block 5: transposed conv_5 -> tanh.
  """

  channels: Sequence[int]
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    last = len(self.channels)
    for i, (features, (k, s, p)) in enumerate(
        zip(self.channels, DCGAN_DECODER_LAYOUT), start=1
    ):
      if i < last:
        x = TorchBatchNorm(name=f"batch_norm_{i}", dtype=self.dtype)(x, train)
      x = Conv(
          features, k, s, p, transpose=True, dtype=self.dtype, name=f"conv_{i}"
      )(x)
      if i < last:
        x = ChannelDropout(self.dropout_rate)(x, deterministic=not train)
        x = nn.relu(x)
    return jnp.tanh(x)


class DCGANIdempotentNetwork(nn.Module):
  """The unconditional IGN network of the IGN code (MNIST), f(x) =
  decoder(encoder(x)), DCGAN-like with BatchNorm and Dropout2d.

  Channels, with b = latent_dim (64 in the IGN code) and d =
  intermediate_dim (512 = 8 b there):
    encoder ('discriminator'): C -> b -> 2b -> 4b -> 8b -> d (1x1 code)
    decoder ('generator'):     d -> d/2 -> d/4 -> d/8 -> d/16 -> C
  Same call signature as `IdempotentNetwork`; labels are accepted and
  ignored (`conditioning` is always 'none').

  Args (fields):
    latent_dim: output channels of the first convolution (b).
    intermediate_dim: channels of the 1x1 code (d), a multiple of 16.
    image_channels: C.
    dropout_rate: the channel-dropout probability (0.1 in the IGN code).
    num_classes: only for the label checks of the sampling API.
    dtype: the compute dtype (BatchNorm statistics stay float32).
  """

  latent_dim: int = 64
  intermediate_dim: int = 512
  image_channels: int = 1
  dropout_rate: float = 0.1
  num_classes: int = 10
  conditioning: str = "none"
  dtype: Any = jnp.float32
  image_size: int = 28  # the layouts above take 28x28 only

  def setup(self):
    if self.image_size != 28:
      raise ValueError(
          f"the 'ign_dcgan' network takes images of size [28], got "
          f"{self.image_size}"
      )
    if self.conditioning != "none":
      raise ValueError(
          f"the DCGAN IGN network is unconditional: "
          f"conditioning must be 'none', got "
          f"{self.conditioning!r}"
      )
    if self.intermediate_dim < 16 or self.intermediate_dim % 16:
      raise ValueError(
          f"intermediate_dim must be a multiple of 16 (the "
          f"decoder halves it four times), got "
          f"{self.intermediate_dim}"
      )
    b, d = self.latent_dim, self.intermediate_dim
    common = dict(dropout_rate=self.dropout_rate, dtype=self.dtype)
    self.discriminator = DCGANEncoder(
        channels=(b, 2 * b, 4 * b, 8 * b, d), **common
    )
    self.generator = DCGANDecoder(
        channels=(d // 2, d // 4, d // 8, d // 16, self.image_channels),
        **common,
    )

  def __call__(
      self, x, labels: Optional[jax.Array] = None, train: bool = False
  ):
    """f(x): (B, 28, 28, C) in [-1, 1] -> (B, 28, 28, C) float32.

    Args:
      x: images or noise, (B, 28, 28, image_channels).
      labels: ignored (the network is unconditional).
      train: batch statistics and channel dropout (the 'dropout' RNG) when
        True; running statistics and no dropout when False.

    Returns:
      f(x) in (-1, 1), float32.
    """
    del labels
    check_input_shape(x, self.image_size, self.image_channels)
    h = self.discriminator(x, train)
    return self.generator(h, train).astype(jnp.float32)


def dcgan_model_from_config(
    config: ml_collections.ConfigDict,
) -> DCGANIdempotentNetwork:
  """`DCGANIdempotentNetwork` from config.model (architecture 'ign_dcgan')."""
  m = config.model
  return DCGANIdempotentNetwork(
      latent_dim=m.latent_dim,
      intermediate_dim=m.intermediate_dim,
      image_channels=m.image_channels,
      dropout_rate=m.dropout_rate,
      num_classes=m.num_classes,
      conditioning=m.conditioning,
      dtype=jnp.dtype(config.get("compute_dtype", "float32")),
      image_size=m.get("image_size", 28),
  )
