"""IGN and CIGN networks (Flax linen), NHWC, with the paper's architecture.

f(x, c) = generator(discriminator(x, c), c)   (CIGN paper, section 4; IGN's
DCGAN-style encoder/decoder). Each of the two halves has five blocks; block i:

  discriminator: [BatchNorm, not before block 1] -> conditioning -> conv
                 (no bias) -> dropout 0.15 -> LeakyReLU 0.2 (block 5: sigmoid)
  generator:     BatchNorm -> conditioning -> transposed conv (no bias)
                 -> dropout 0.15 (not in block 5) -> ReLU (block 5: tanh)

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

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import ops
from cign_jax import run_dir

# (kernel, stride, padding) of the five blocks (appendix A, tables 4-7).
DISCRIMINATOR_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 2, 1), (4, 2, 1), (2, 1, 0))
GENERATOR_LAYOUT = ((2, 1, 0), (4, 2, 1), (3, 2, 1), (4, 2, 1), (4, 2, 1))



def torch_uniform_init(fan_in: int):
  """PyTorch's default init of Linear/Conv weights and biases: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1)**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchBatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics (momentum 0.1, eps 1e-5).

  Training: normalises with the biased batch variance over (B, H, W) and
  updates the running variance with the unbiased one, as torch.nn.BatchNorm2d
  does (flax.linen.BatchNorm uses the biased one for both). Evaluation: the
  running statistics. Statistics are computed in float32 whatever the
  compute dtype. Under `jit` with a batch sharded over devices the means are
  over the global batch (synchronised BatchNorm).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x32 * mul + (bias - mean * mul)
    return y.astype(self.dtype)


class Conv(nn.Module):
  """Conv (transposed if `transpose`) with a shared kernel (kh, kw, Ci, Co)."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  transpose: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, ci = self.kernel_size, x.shape[-1]
    # PyTorch computes fan_in from its weight layout: (Co, Ci, k, k) for a
    # conv, (Ci, Co, k, k) for a transposed conv.
    fan_in = (self.features if self.transpose else ci) * k * k
    kernel = self.param("kernel", torch_uniform_init(fan_in),
                        (k, k, ci, self.features))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    fn = ops.conv_transpose2d if self.transpose else ops.conv2d
    return fn(x, kernel, self.stride, self.padding)


class Linear(nn.Module):
  """nn.Dense with PyTorch's Linear init; `__call__(None)` only returns
  (kernel (in, out), bias (out,)) for ops that take the weights directly."""
  in_features: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x=None):
    init = torch_uniform_init(self.in_features)
    kernel = self.param("kernel", init, (self.in_features, self.features))
    bias = self.param("bias", init, (self.features,))
    if x is None:
      return kernel, bias
    y = x.astype(self.dtype) @ kernel.astype(self.dtype)
    return y + bias.astype(self.dtype)


class FilterConditionedConv(nn.Module):
  """CIGN filter conditioning: depthwise per-sample (transposed) correlation
  with tanh(Linear(embedding)) as the filter, then a channel mixer.

  x (B, H, W, Ci), embedding (B, E) -> (B, H', W', features).
  The filter Linear is named `linear_{index}`, the mixer
  `channel_mixer_{index}` (the original's names). The Linear's outputs are in
  our (kh, kw, Ci) order; `convert` permutes the original's (Ci, kh, kw).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  index: int
  transpose: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, embedding):
    b, _, _, ci = x.shape
    k = self.kernel_size
    filters = jnp.tanh(
        Linear(embedding.shape[-1], k * k * ci, name=f"linear_{self.index}")(
            embedding)).reshape(b, k, k, ci).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.transpose:
      y = ops.per_sample_depthwise_transposed_correlation(
          x, filters, self.stride, self.padding)
    else:
      y = ops.per_sample_depthwise_correlation(x, filters, self.stride,
                                               self.padding)
    return Linear(ci, self.features, dtype=self.dtype,
                  name=f"channel_mixer_{self.index}")(y)


class ChannelConditioning(nn.Module):
  """CIGN channel conditioning: appends tanh(Linear(e)) as an (H, W) channel."""
  index: int

  @nn.compact
  def __call__(self, x, embedding):
    h, w = x.shape[1], x.shape[2]
    kernel, bias = Linear(embedding.shape[-1], h * w,
                          name=f"linear_{self.index}")()
    return ops.channel_condition(x, embedding, kernel, bias)


class _Half(nn.Module):
  """One half of f: five conditioned blocks (shared code of both halves)."""
  conditioning: str
  channels: Sequence[int]  # output channels of the five blocks
  layout: Sequence[Tuple[int, int, int]]
  transpose: bool
  embedding_dim: int = 5
  num_classes: int = 10
  dropout_rate: float = 0.15
  dtype: Any = jnp.float32

  def _norm_before(self, i: int) -> bool:
    raise NotImplementedError

  def _activation(self, i: int, y):
    raise NotImplementedError

  def _dropout_in(self, i: int) -> bool:
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, labels, train: bool):
    embedding = None
    if self.conditioning != "none":
      embedding = nn.Embed(self.num_classes, self.embedding_dim,
                           name="label_embedder",
                           embedding_init=nn.initializers.normal(1.0))(labels)
    bn_index = 0
    for i, (features, (k, s, p)) in enumerate(zip(self.channels, self.layout),
                                              start=1):
      if self._norm_before(i):
        bn_index += 1
        x = TorchBatchNorm(name=f"batch_norm_{bn_index}", dtype=self.dtype)(
            x, train)
      if self.conditioning == "filter":
        y = FilterConditionedConv(features, k, s, p, index=i,
                                  transpose=self.transpose, dtype=self.dtype,
                                  name=f"filter_conditioned_conv_{i}")(
                                      x, embedding)
      else:
        if self.conditioning == "channel":
          x = ChannelConditioning(index=i, name=f"channel_conditioning_{i}")(
              x, embedding)
        y = Conv(features, k, s, p, transpose=self.transpose, dtype=self.dtype,
                 name=f"conv_{i}")(x)
      if self._dropout_in(i) and self.dropout_rate > 0:
        y = Dropout(self.dropout_rate)(y, deterministic=not train)
      x = self._activation(i, y)
    return x


class Discriminator(_Half):
  """The encoder half: (B, 28, 28, 1) -> (B, 1, 1, intermediate_dim)."""
  transpose: bool = False
  layout: Sequence[Tuple[int, int, int]] = DISCRIMINATOR_LAYOUT

  def _norm_before(self, i):
    return i > 1

  def _dropout_in(self, i):
    return True

  def _activation(self, i, y):
    return nn.sigmoid(y) if i == 5 else nn.leaky_relu(y, 0.2)


class Generator(_Half):
  """The decoder half: (B, 1, 1, intermediate_dim) -> (B, 28, 28, 1)."""
  transpose: bool = True
  layout: Sequence[Tuple[int, int, int]] = GENERATOR_LAYOUT

  def _norm_before(self, i):
    return True

  def _dropout_in(self, i):
    return i < 5

  def _activation(self, i, y):
    return jnp.tanh(y) if i == 5 else nn.relu(y)


class Dropout(nn.Module):
  """Element-wise dropout (PyTorch's nn.Dropout): zero with probability
  `rate`, scale the rest by 1 / (1 - rate).

  The mask comes from the 'dropout' RNG stream through
  `cign_jax.dropout.dropout`: Threefry-2x32 on the element index, written as
  element-wise integer ops that XLA fuses (no generator call per layer;
  `jax.random.bernoulli` cost about 12 ns per element on CPU, for threefry
  and 'rbg' keys alike: over a second of CPU time per CIGN train step).
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout_lib.dropout(x, self.rate, self.make_rng("dropout"))


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

  def setup(self):
    if self.conditioning not in config_lib.CONDITIONINGS:
      raise ValueError(f"unknown conditioning {self.conditioning!r}; expected "
                       f"one of {config_lib.CONDITIONINGS}")
    ld = self.latent_dim
    common = dict(conditioning=self.conditioning,
                  embedding_dim=self.embedding_dim,
                  num_classes=self.num_classes,
                  dropout_rate=self.dropout_rate, dtype=self.dtype)
    self.discriminator = Discriminator(
        channels=(ld, 2 * ld, 4 * ld, 8 * ld, self.intermediate_dim), **common)
    self.generator = Generator(
        channels=(8 * ld, 4 * ld, 2 * ld, ld, self.image_channels), **common)

  def __call__(self, x, labels: Optional[jax.Array] = None,
               train: bool = False):
    if x.ndim != 4 or x.shape[1:] != (28, 28, self.image_channels):
      raise ValueError(f"expected images of shape (B, 28, 28, "
                       f"{self.image_channels}), got {tuple(x.shape)}")
    if self.conditioning != "none":
      if labels is None:
        raise ValueError(f"a {self.conditioning}-conditioned CIGN needs labels")
      if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},), got "
                         f"{tuple(labels.shape)}")
      labels = labels.astype(jnp.int32)
    h = self.discriminator(x, labels, train)
    return self.generator(h, labels, train).astype(jnp.float32)


def model_from_config(config: ml_collections.ConfigDict) -> IdempotentNetwork:
  m = config.model
  return IdempotentNetwork(
      conditioning=m.conditioning, latent_dim=m.latent_dim,
      intermediate_dim=m.intermediate_dim, embedding_dim=m.embedding_dim,
      num_classes=m.num_classes, image_channels=m.image_channels,
      dropout_rate=m.dropout_rate,
      dtype=jnp.dtype(config.get("compute_dtype", "float32")))


def init_variables(model: IdempotentNetwork, key, batch_size: int = 2):
  """Initial variables (PyTorch's init distributions), jitted: run eagerly
  the init dispatches thousands of small ops and takes most of a minute."""
  x = jnp.zeros((batch_size, 28, 28, model.image_channels), jnp.float32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  return jax.jit(lambda k: model.init({"params": k}, x, labels,
                                      train=False))(key)


def check_labels(labels, num_classes: int, num_images: Optional[int] = None):
  """Validates concrete labels at an API boundary; returns them as int32."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a vector, got shape {labels.shape}")
  if num_images is not None and labels.shape[0] != num_images:
    raise ValueError(f"got {labels.shape[0]} labels for {num_images} images")
  if not np.issubdtype(labels.dtype, np.integer):
    if labels.size and not np.all(labels == np.round(labels)):
      raise ValueError("labels must be integers")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(f"label out of range: {bad} (labels must be in 0.."
                     f"{num_classes - 1})")
  return labels.astype(np.int32)


def check_images(images, image_channels: int = 1):
  """Validates images in [-1, 1] at an API boundary: (N, 28, 28[, C])."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3 and image_channels == 1:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (28, 28, image_channels):
    raise ValueError(f"wrong image shape {images.shape}: expected (N, 28, 28) "
                     f"or (N, 28, 28, {image_channels})")
  run_dir.check_finite(images, "the images")
  if images.size and (images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6):
    raise ValueError(f"images must be in [-1, 1], got range [{images.min()}, "
                     f"{images.max()}]")
  return images


def count_parameters(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
