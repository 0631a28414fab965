"""IGN and CIGN networks (Flax linen), NHWC, with the paper's architecture.

f(x, c) = generator(discriminator(x, c), c)   (CIGN paper, section 4; IGN's
DCGAN-style encoder/decoder). At 28x28 each of the two halves has the
paper's five blocks; block i:

  discriminator: [BatchNorm, not before block 1] -> conditioning -> conv
                 (no bias) -> dropout 0.15 -> LeakyReLU 0.2 (last: sigmoid)
  generator:     BatchNorm -> conditioning -> transposed conv (no bias)
                 -> dropout 0.15 (not in the last) -> ReLU (last: tanh)

At 32x32 and 64x64 the halves are DCGAN-style with the same blocks:
4x4 stride-2 convolutions down to 4x4, then a 4x4 valid convolution to 1x1,
mirrored by transposed convolutions (four blocks at 32, five at 64; the
channels double per block as at 28: ld, 2 ld, ...). `LAYOUTS` has each.

Conditioning (each half owns a label embedding, 10 x embedding_dim, and every
block owns a Linear from it, passed through tanh):
  'channel': `ops.channel_condition`, one extra input channel (appendix A.1);
  'filter':  `FilterConditionedConv`: per-sample depthwise (transposed)
             correlation with a label-made filter, then a channel mixer
             Linear(C_in -> C_out) with bias (appendix A.2);
  'none':    the unconditional IGN baseline: plain (transposed) convs.

Parameter names follow the author's PyTorch modules (`conv_3`,
`batch_norm_2`, `linear_4`, `channel_mixer_1`, `label_embedder`), so that
`cign_jax.interop.convert` maps checkpoints one to one.

"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cign_jax import config as config_lib
from cign_jax import grouped
from cign_jax.models.checks import check_input_shape
from cign_jax.models.layers import ChannelConditioning
from cign_jax.models.layers import Conv
from cign_jax.models.layers import Dropout
from cign_jax.models.layers import FilterConditionedConv
from cign_jax.models.layers import precision_context
from cign_jax.models.layers import TorchBatchNorm

# (kernel, stride, padding) of the five blocks (appendix A, tables 4-7).
DISCRIMINATOR_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 2, 1), (4, 2, 1), (2, 1, 0))
GENERATOR_LAYOUT = ((2, 1, 0), (4, 2, 1), (3, 2, 1), (4, 2, 1), (4, 2, 1))


def _dcgan_layouts(image_size: int):
  """Halving 4x4/2 convolutions from `image_size` down to 4, then 4x4 valid
  to 1x1; the generator mirrors them."""
  halvings = (image_size // 4).bit_length() - 1
  down = ((4, 2, 1),) * halvings + ((4, 1, 0),)
  return down, tuple(reversed(down))


# image size -> (discriminator layout, generator layout); the sizes the
# 'cign' architecture takes (config.ARCHITECTURE_SIZES lists the same).
LAYOUTS = {
    28: (DISCRIMINATOR_LAYOUT, GENERATOR_LAYOUT),
    32: _dcgan_layouts(32),
    64: _dcgan_layouts(64),
}


class _Half(nn.Module):
  """One half of f: its conditioned blocks (shared code of both halves)."""

  conditioning: str
  channels: Sequence[int]  # output channels of the blocks
  layout: Sequence[Tuple[int, int, int]]
  transpose: bool
  embedding_dim: int = 5
  num_classes: int = 10
  dropout_rate: float = 0.15
  dtype: Any = jnp.float32
  channel_conv: str = "concat"  # resolved: 'concat' or 'per_class'

  def _norm_before(self, i: int) -> bool:
    raise NotImplementedError

  def _activation(self, i: int, y):
    raise NotImplementedError

  def _dropout_in(self, i: int) -> bool:
    raise NotImplementedError

  @nn.compact
  def __call__(
      self, x, labels, train: bool, groups: Optional[Sequence[int]] = None
  ):
    embedding = table = None
    if self.conditioning != "none":
      embed = nn.Embed(
          self.num_classes,
          self.embedding_dim,
          name="label_embedder",
          embedding_init=nn.initializers.normal(1.0),
      )
      embedding = embed(labels)
      if self.channel_conv == "per_class":
        table = embed(jnp.arange(self.num_classes))
    # One dropout key per group for this forward call; layer i masks with
    # stream i of it (no key derivation per layer).
    keys = None
    if train and self.dropout_rate > 0:
      keys = [
          self.make_rng(grouped.dropout_stream(g))
          for g in range(1 if groups is None else len(groups))
      ]
    bn_index = 0
    for i, (features, (k, s, p)) in enumerate(
        zip(self.channels, self.layout), start=1
    ):
      if self._norm_before(i):
        bn_index += 1
        x = TorchBatchNorm(name=f"batch_norm_{bn_index}", dtype=self.dtype)(
            x, train, groups
        )
      if self.conditioning == "filter":
        y = FilterConditionedConv(
            features,
            k,
            s,
            p,
            index=i,
            transpose=self.transpose,
            dtype=self.dtype,
            name=f"filter_conditioned_conv_{i}",
        )(x, embedding)
      else:
        conv = Conv(
            features,
            k,
            s,
            p,
            transpose=self.transpose,
            dtype=self.dtype,
            name=f"conv_{i}",
        )
        if self.conditioning != "channel":
          y = conv(x)
        elif self.channel_conv == "per_class":
          maps = ChannelConditioning(index=i, name=f"channel_conditioning_{i}")(
              x, table, per_class=True
          )
          y = conv(x, maps, labels)
        else:
          x = ChannelConditioning(index=i, name=f"channel_conditioning_{i}")(
              x, embedding
          )
          y = conv(x)
      if self._dropout_in(i) and self.dropout_rate > 0:
        y = Dropout(self.dropout_rate, stream=i)(
            y, deterministic=not train, groups=groups, keys=keys
        )
      x = self._activation(i, y)
    return x


class Discriminator(_Half):
  """The encoder half: (B, H, W, C) -> (B, 1, 1, intermediate_dim)."""

  transpose: bool = False
  layout: Sequence[Tuple[int, int, int]] = DISCRIMINATOR_LAYOUT

  def _norm_before(self, i):
    return i > 1

  def _dropout_in(self, i):
    return True

  def _activation(self, i, y):
    last = i == len(self.layout)
    return nn.sigmoid(y) if last else nn.leaky_relu(y, 0.2)


class Generator(_Half):
  """The decoder half: (B, 1, 1, intermediate_dim) -> (B, H, W, C)."""

  transpose: bool = True
  layout: Sequence[Tuple[int, int, int]] = GENERATOR_LAYOUT

  def _norm_before(self, i):
    return True

  def _dropout_in(self, i):
    return i < len(self.layout)

  def _activation(self, i, y):
    return jnp.tanh(y) if i == len(self.layout) else nn.relu(y)


class IdempotentNetwork(nn.Module):
  """f(x, c) = generator(discriminator(x, c), c); c is ignored for 'none'."""

  conditioning: str = "channel"
  latent_dim: int = 32
  intermediate_dim: int = 128
  embedding_dim: int = 5
  num_classes: int = 10
  image_channels: int = 1
  dropout_rate: float = 0.15
  dtype: Any = jnp.float32
  # How a channel-conditioned conv applies the label map: 'concat' (one
  # extra input channel), 'per_class' (split kernel, the map convolved per
  # class; see `Conv`) or 'auto' (`config.resolve_channel_conv`). Same parameters.
  channel_conv: str = "auto"
  # jax.default_matmul_precision for the convolutions and products of f:
  # 'default' (XLA's choice: TF32 on recent NVIDIA GPUs), 'high' or
  # 'highest' (full float32).
  matmul_precision: str = "default"
  # H = W of the images: 28 (the paper's network) or 32, 64 (`LAYOUTS`).
  image_size: int = 28

  def setup(self):
    if self.conditioning not in config_lib.CONDITIONINGS:
      raise ValueError(
          f"unknown conditioning {self.conditioning!r}; expected "
          f"one of {config_lib.CONDITIONINGS}"
      )
    ld = self.latent_dim
    common = dict(
        conditioning=self.conditioning,
        embedding_dim=self.embedding_dim,
        num_classes=self.num_classes,
        dropout_rate=self.dropout_rate,
        dtype=self.dtype,
        channel_conv=config_lib.resolve_channel_conv(self.channel_conv),
    )
    if self.matmul_precision not in config_lib.MATMUL_PRECISIONS:
      raise ValueError(
          f"unknown matmul_precision {self.matmul_precision!r}; "
          f"expected one of {config_lib.MATMUL_PRECISIONS}"
      )
    if self.image_size not in LAYOUTS:
      raise ValueError(
          f"the CIGN network takes images of size {sorted(LAYOUTS)}, got "
          f"{self.image_size}"
      )
    down, up = LAYOUTS[self.image_size]
    # Channels double per block down to the code, and halve back up.
    widths = tuple(ld * 2**i for i in range(len(down) - 1))
    self.discriminator = Discriminator(
        channels=widths + (self.intermediate_dim,), layout=down, **common
    )
    self.generator = Generator(
        channels=widths[::-1] + (self.image_channels,), layout=up, **common
    )

  def __call__(
      self,
      x,
      labels: Optional[jax.Array] = None,
      train: bool = False,
      groups: Optional[Sequence[int]] = None,
  ):
    """f(x, labels).

    Args:
      x: images (B, image_size, image_size, image_channels).
      labels: int labels (B,) (ignored when unconditional).
      train: batch statistics and dropout (training) or running statistics.
      groups: training only: sizes of the batches of several forward calls
        concatenated into x; BatchNorm normalises each over itself and
        updates the running statistics per group in order, and group g
        draws its dropout masks from the RNG stream `grouped.dropout_stream(g)`:
        the same result as separate calls, one call's kernels.

    Returns:
      f(x, labels), float32, x's shape.
    """
    check_input_shape(x, self.image_size, self.image_channels)
    if self.conditioning != "none":
      if labels is None:
        raise ValueError(f"a {self.conditioning}-conditioned CIGN needs labels")
      if labels.shape != (x.shape[0],):
        raise ValueError(
            f"labels must have shape ({x.shape[0]},), got "
            f"{tuple(labels.shape)}"
        )
      labels = labels.astype(jnp.int32)
    if groups is not None:
      grouped.check_groups(groups, x.shape[0])
    with precision_context(self.matmul_precision):
      h = self.discriminator(x, labels, train, groups)
      return self.generator(h, labels, train, groups).astype(jnp.float32)
