"""The DCGAN of pytorch/examples as an IGN: the IGN paper's CelebA network.

f(x) = decoder(encoder(x)) at 64x64 (config.model.architecture = 'dcgan').
With b = latent_dim (pytorch/examples' ndf = ngf = 64) and d =
intermediate_dim (its nz = 100, the code's channels):

  encoder (DCGAN's discriminator, its last convolution giving the d-channel
  code instead of one logit, with no sigmoid):
    conv 4x4/2 C -> b, LeakyReLU 0.2;
    conv 4x4/2 b -> 2b, 2b -> 4b, 4b -> 8b, each BatchNorm, LeakyReLU 0.2;
    conv 4x4/1 valid 8b -> d (64 -> 32 -> 16 -> 8 -> 4 -> 1).
  decoder (DCGAN's generator):
    transposed conv 4x4/1 valid d -> 8b, then 4x4/2 8b -> 4b -> 2b -> b,
    each BatchNorm, ReLU; transposed conv 4x4/2 b -> C, tanh.

Every convolution is bias-free, as in pytorch/examples; BatchNorm has
PyTorch's semantics (`layers.TorchBatchNorm`) and follows the convolution,
as there. Unconditional: labels are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cign_jax.models.checks import check_input_shape
from cign_jax.models.layers import Conv
from cign_jax.models.layers import TorchBatchNorm

# The encoder's (kernel, stride, padding); the decoder's are the reverse.
ENCODER_LAYOUT = ((4, 2, 1),) * 4 + ((4, 1, 0),)
IMAGE_SIZES = (64,)


class Encoder(nn.Module):
  """(B, 64, 64, C) -> (B, 1, 1, code_channels)."""

  base_channels: int
  code_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b = self.base_channels
    channels = (b, 2 * b, 4 * b, 8 * b, self.code_channels)
    last = len(channels)
    for i, (features, (k, s, p)) in enumerate(
        zip(channels, ENCODER_LAYOUT), start=1
    ):
      x = Conv(features, k, s, p, dtype=self.dtype, name=f"conv_{i}")(x)
      if i == last:
        break
      if i > 1:
        x = TorchBatchNorm(name=f"batch_norm_{i}", dtype=self.dtype)(x, train)
      x = nn.leaky_relu(x, 0.2)
    return x


class Decoder(nn.Module):
  """(B, 1, 1, code_channels) -> (B, 64, 64, image_channels) in (-1, 1)."""

  base_channels: int
  image_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b = self.base_channels
    channels = (8 * b, 4 * b, 2 * b, b, self.image_channels)
    last = len(channels)
    layout = tuple(reversed(ENCODER_LAYOUT))
    for i, (features, (k, s, p)) in enumerate(zip(channels, layout), start=1):
      x = Conv(
          features, k, s, p, transpose=True, dtype=self.dtype, name=f"conv_{i}"
      )(x)
      if i == last:
        break
      x = TorchBatchNorm(name=f"batch_norm_{i}", dtype=self.dtype)(x, train)
      x = nn.relu(x)
    return jnp.tanh(x)


class DCGANNetwork(nn.Module):
  """f(x) = decoder(encoder(x)), pytorch/examples' DCGAN halves at 64x64.

  Same call signature as `IdempotentNetwork`; `conditioning` is always
  'none' and `num_classes` serves only the label checks of sampling.
  """

  latent_dim: int = 64  # b: pytorch/examples' ndf = ngf
  intermediate_dim: int = 100  # d: its nz, the code's channels
  image_channels: int = 3
  image_size: int = 64
  num_classes: int = 1
  conditioning: str = "none"
  dtype: Any = jnp.float32

  def setup(self):
    if self.conditioning != "none":
      raise ValueError(
          "the 'dcgan' network is unconditional: conditioning must be "
          f"'none', got {self.conditioning!r}"
      )
    if self.image_size not in IMAGE_SIZES:
      raise ValueError(
          f"the 'dcgan' network takes images of size {list(IMAGE_SIZES)}, "
          f"got {self.image_size}"
      )
    self.discriminator = Encoder(
        self.latent_dim, self.intermediate_dim, dtype=self.dtype
    )
    self.generator = Decoder(
        self.latent_dim, self.image_channels, dtype=self.dtype
    )

  def __call__(
      self, x, labels: Optional[jax.Array] = None, train: bool = False
  ):
    """f(x): (B, 64, 64, C) in [-1, 1] -> the same shape, float32; `labels`
    are ignored; `train`: batch statistics (else the running ones)."""
    del labels
    check_input_shape(x, self.image_size, self.image_channels)
    h = self.discriminator(x, train)
    return self.generator(h, train).astype(jnp.float32)
