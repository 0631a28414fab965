"""The building blocks of the networks, with PyTorch's semantics: init,
BatchNorm, (transposed) convolutions with optional channel conditioning,
Linear, the filter-conditioned convolution, and the dropouts."""

from __future__ import annotations

import contextlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import dropout as dropout_lib
from cign_jax import grouped
from cign_jax import ops


def torch_uniform_init(fan_in: int):
  """PyTorch's default init of Linear/Conv weights and biases: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

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

  `groups` (training only): the batch is the concatenation of several
  forward calls' batches, of these sizes; each group is normalised with its
  own statistics and the running statistics are updated once per group, in
  order, exactly as that many separate calls would (`cign_jax.grouped`, an
  alternative no default selects).
  """

  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, groups: Optional[Sequence[int]] = None):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,))
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,))
    x32 = x.astype(jnp.float32)
    if train and groups is not None and len(groups) > 1:
      return self._grouped(x32, groups, scale, bias, ra_mean, ra_var)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        n = x.size // c
        self._update(ra_mean, ra_var, mean, var, n)
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x32 * mul + (bias - mean * mul)
    return y.astype(self.dtype)

  def _update(self, ra_mean, ra_var, mean, var, n):
    unbiased = var * (n / max(n - 1, 1))
    ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
    ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased

  def _grouped(self, x32, groups, scale, bias, ra_mean, ra_var):
    mean, var = grouped.moments(x32, groups)
    if not self.is_initializing():
      per_image = int(np.prod(x32.shape[1:-1]))
      for g, n in enumerate(groups):
        self._update(ra_mean, ra_var, mean[g], var[g], n * per_image)
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x32 * grouped.per_row(mul, groups, x32.shape) + grouped.per_row(
        bias - mean * mul, groups, x32.shape
    )
    return y.astype(self.dtype)


class Conv(nn.Module):
  """Conv (transposed if `transpose`) with a shared kernel (kh, kw, Ci, Co).

  With `class_maps` (num_classes, H, W, 1) and `labels` (B,), x (B, H, W, C)
  is channel-conditioned: the result equals the convolution of
  concat(x, class_maps[labels]) with the kernel (kh, kw, C + 1, Co), computed
  as conv(x, kernel[..., :C, :]) plus the convolution of the num_classes maps
  with the last input channel's kernel, picked per sample by label. The
  same parameters and sums in another order; the convolution then sees C
  input channels (32, 64, ... instead of 33, 65, ...), which GPU kernels
  want, and the map's convolution runs on num_classes maps, not B.
  """

  features: int
  kernel_size: int
  stride: int
  padding: int
  transpose: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, class_maps=None, labels=None):
    k = self.kernel_size
    ci = x.shape[-1] + (0 if class_maps is None else class_maps.shape[-1])
    # PyTorch computes fan_in from its weight layout: (Co, Ci, k, k) for a
    # conv, (Ci, Co, k, k) for a transposed conv.
    fan_in = (self.features if self.transpose else ci) * k * k
    kernel = self.param(
        "kernel", torch_uniform_init(fan_in), (k, k, ci, self.features)
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    fn = ops.conv_transpose2d if self.transpose else ops.conv2d
    if class_maps is None:
      return fn(x, kernel, self.stride, self.padding)
    c = x.shape[-1]
    y = fn(x, kernel[:, :, :c], self.stride, self.padding)
    per_class = fn(
        class_maps.astype(self.dtype),
        kernel[:, :, c:],
        self.stride,
        self.padding,
    )
    return y + ops.pick_by_label(per_class, labels)


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
    filters = (
        jnp.tanh(
            Linear(
                embedding.shape[-1], k * k * ci, name=f"linear_{self.index}"
            )(embedding)
        )
        .reshape(b, k, k, ci)
        .astype(self.dtype)
    )
    x = x.astype(self.dtype)
    if self.transpose:
      y = ops.per_sample_depthwise_transposed_correlation(
          x, filters, self.stride, self.padding
      )
    else:
      y = ops.per_sample_depthwise_correlation(
          x, filters, self.stride, self.padding
      )
    return Linear(
        ci, self.features, dtype=self.dtype, name=f"channel_mixer_{self.index}"
    )(y)


class ChannelConditioning(nn.Module):
  """CIGN channel conditioning: appends tanh(Linear(e)) as an (H, W) channel.

  With `per_class=True`, `embedding` is the (num_classes, E) table and the
  result is the num_classes maps (num_classes, H, W, 1) (for `Conv`'s
  split formulation); x only gives (H, W).
  """

  index: int

  @nn.compact
  def __call__(self, x, embedding, per_class: bool = False):
    h, w = x.shape[1], x.shape[2]
    kernel, bias = Linear(
        embedding.shape[-1], h * w, name=f"linear_{self.index}"
    )()
    if per_class:
      return ops.condition_maps(embedding, kernel, bias, h, w)
    return ops.channel_condition(x, embedding, kernel, bias)


class Dropout(nn.Module):
  """Element-wise dropout (PyTorch's nn.Dropout): zero with probability
  `rate`, scale the rest by 1 / (1 - rate).

  The mask comes from the 'dropout' RNG stream through
  `cign_jax.dropout.dropout`: Threefry-2x32 on the element index, written as
  element-wise integer ops that XLA fuses (no generator call per layer:
  `jax.random.bernoulli` dominated the CPU train step; docs/performance.md,
  "What made the difference (CPU)").

  `stream`: the mask's Threefry stream (`cign_jax.dropout.element_bits`);
  `keys`: the keys to draw from, one per group (the half-networks draw them
  once per forward call for all their layers, each layer with its own
  stream); without them the layer draws its own from the RNG streams.

  `groups`: the batch concatenates several forward calls' batches of these
  sizes; each group gets the mask a separate call would (`grouped.dropout`).
  """

  rate: float
  stream: int = 0

  @nn.compact
  def __call__(
      self,
      x,
      deterministic: bool,
      groups: Optional[Sequence[int]] = None,
      keys: Optional[Sequence[jax.Array]] = None,
  ):
    if deterministic or self.rate == 0.0:
      return x
    num_groups = 1 if groups is None else len(groups)
    if keys is None:
      keys = [
          self.make_rng(grouped.dropout_stream(g)) for g in range(num_groups)
      ]
    if len(keys) != num_groups:
      raise ValueError(
          f"Dropout: {len(keys)} keys for {num_groups} groups; "
          "pass one key per group"
      )
    if num_groups == 1:
      return dropout_lib.dropout(x, self.rate, keys[0], self.stream)
    return grouped.dropout(x, self.rate, keys, groups, self.stream)


class ChannelDropout(nn.Module):
  """PyTorch's nn.Dropout2d: zeroes whole feature maps (one decision per
  sample and channel) with probability `rate`, scales the rest by
  1 / (1 - rate); the mask from the 'dropout' RNG stream through
  `cign_jax.dropout.channel_dropout`."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout_lib.channel_dropout(x, self.rate, self.make_rng("dropout"))


def precision_context(matmul_precision: str):
  """`jax.default_matmul_precision` for 'high'/'highest'; for 'default' a
  no-op context (XLA's own choice)."""
  if matmul_precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(matmul_precision)
