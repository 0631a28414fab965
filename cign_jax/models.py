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

`DCGANIdempotentNetwork` (config.model.architecture = 'ign_dcgan', at the end
of this file) is the unconditional network of the IGN code that CIGN grew
from; `model_from_config` builds either.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import grouped
from cign_jax import ops

# (kernel, stride, padding) of the five blocks (appendix A, tables 4-7).
DISCRIMINATOR_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 2, 1), (4, 2, 1), (2, 1, 0))
GENERATOR_LAYOUT = ((2, 1, 0), (4, 2, 1), (3, 2, 1), (4, 2, 1), (4, 2, 1))


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
    self.discriminator = Discriminator(
        channels=(ld, 2 * ld, 4 * ld, 8 * ld, self.intermediate_dim), **common
    )
    self.generator = Generator(
        channels=(8 * ld, 4 * ld, 2 * ld, ld, self.image_channels), **common
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
      x: images (B, 28, 28, image_channels).
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
    if x.ndim != 4 or x.shape[1:] != (28, 28, self.image_channels):
      raise ValueError(
          f"expected images of shape (B, 28, 28, "
          f"{self.image_channels}), got {tuple(x.shape)}"
      )
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


def precision_context(matmul_precision: str):
  """`jax.default_matmul_precision` for 'high'/'highest'; for 'default' a
  no-op context (XLA's own choice)."""
  if matmul_precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(matmul_precision)


def model_from_config(config: ml_collections.ConfigDict) -> nn.Module:
  """The network `config.model` describes: `IdempotentNetwork` for
  architecture 'cign' (the default), `DCGANIdempotentNetwork` for
  'ign_dcgan'."""
  m = config.model
  architecture = m.get("architecture", "cign")
  if architecture == "ign_dcgan":
    return dcgan_model_from_config(config)
  if architecture != "cign":
    raise ValueError(
        f"config.model.architecture: unknown architecture "
        f"{architecture!r}; expected 'cign' or 'ign_dcgan'"
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
  )


def init_variables(model: IdempotentNetwork, key, batch_size: int = 2):
  """Initial variables (PyTorch's init distributions), jitted: run eagerly
  the init dispatches thousands of small ops and takes most of a minute.
  The model is a static argument (modules compare by their fields), so
  equal networks share one compiled init."""
  return _jitted_init(model, key, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(model, key, batch_size):
  x = jnp.zeros((batch_size, 28, 28, model.image_channels), jnp.float32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  return model.init({"params": key}, x, labels, train=False)


def check_labels(labels, num_classes: int, num_images: Optional[int] = None):
  """Validates concrete labels at an API boundary; returns them as int32."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be a vector, got shape {labels.shape}")
  if num_images is not None and labels.shape[0] != num_images:
    raise ValueError(f"got {labels.shape[0]} labels for {num_images} images")
  if labels.dtype == bool or not (
      np.issubdtype(labels.dtype, np.integer)
      or np.issubdtype(labels.dtype, np.floating)
  ):
    # Booleans and strings are not class indices, though numpy would cast.
    raise ValueError(
        f"labels must be integer class indices, got an array of "
        f"dtype {labels.dtype}"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    if labels.size and not np.all(labels == np.round(labels)):
      raise ValueError("labels must be integers")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(
        f"label out of range: {bad} (labels must be in 0.."
        f"{num_classes - 1})"
    )
  return labels.astype(np.int32)


def check_finite(array, what: str):
  """Raises ValueError when `array` holds NaN or Inf, naming how many and
  the first position.

  Args:
    array: a numpy-convertible array.
    what: what the array is, for the message (e.g. "--inputs images").
  """
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.floating):
    return
  bad = ~np.isfinite(a)
  count = int(bad.sum())
  if count:
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{what} hold {count} non-finite value(s) (NaN or Inf) of {a.size}, "
        f"the first at index {first} (value {a[first]})"
    )


def check_images(images, image_channels: int = 1):
  """Validates images in [-1, 1] at an API boundary: (N, 28, 28[, C])."""
  images = np.asarray(images, np.float32)
  if images.ndim == 3 and image_channels == 1:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != (28, 28, image_channels):
    raise ValueError(
        f"wrong image shape {images.shape}: expected (N, 28, 28) "
        f"or (N, 28, 28, {image_channels})"
    )
  if images.shape[0] == 0:
    raise ValueError(
        f"no images: got shape {images.shape}; expected at least " "one"
    )
  check_finite(images, "the images")
  if images.size and (images.min() < -1.0 - 1e-6 or images.max() > 1.0 + 1e-6):
    raise ValueError(
        f"images must be in [-1, 1], got range [{images.min()}, "
        f"{images.max()}]"
    )
  return images


def count_parameters(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


# --- The IGN code's unconditional DCGAN-like network ------------------------

# (kernel, stride, padding) of the five convolutions of each half. Encoder:
# 28 -> 14 -> 7 -> 5 -> 3 -> 1; decoder (transposed): 1 -> 3 -> 5 -> 7 -> 14
# -> 28.
DCGAN_ENCODER_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 1, 0), (3, 1, 0), (3, 1, 0))
DCGAN_DECODER_LAYOUT = ((3, 1, 0), (3, 1, 0), (3, 1, 0), (4, 2, 1), (4, 2, 1))


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

  def setup(self):
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
    if x.ndim != 4 or x.shape[1:] != (28, 28, self.image_channels):
      raise ValueError(
          f"expected images of shape (B, 28, 28, "
          f"{self.image_channels}), got {tuple(x.shape)}"
      )
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
  )
