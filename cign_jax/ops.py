"""Convolution and conditioning ops of CIGN, as plain functions (NHWC).

Shapes use B batch, H/W spatial, C channels, kh/kw kernel size, s stride,
p padding (the same on all four sides, as in PyTorch).

- `conv2d`: cross-correlation with a shared kernel (kh, kw, C_in, C_out), as
  PyTorch's conv2d; output size (H + 2p - k) // s + 1.
- `conv_transpose2d`: its adjoint with a kernel (kh, kw, C_in, C_out), as
  PyTorch's conv_transpose2d (whose weight is (C_in, C_out, kh, kw));
  output size (H - 1) s - 2p + k.
- `per_sample_depthwise_correlation`: CIGN's filter conditioning in the
  discriminator: every sample b and channel c is cross-correlated with its own
  filter filters[b, :, :, c] (paper, section 4.2 / appendix A.2).
- `per_sample_depthwise_transposed_correlation`: the generator's counterpart,
  the transposed correlation (PyTorch's conv_transpose2d with groups).
- `channel_condition`: CIGN's channel conditioning: tanh(Linear(embedding))
  reshaped to one (H, W) map per sample and appended as the last channel
  (paper, section 4.1 / appendix A.1).

The specified formulation of the per-sample ops is a `jax.vmap` over samples
of `lax.conv_general_dilated` with `feature_group_count` (the `*_reference`
functions below). The public names are the implementations the models use,
one per op, chosen per backend:

- Per-sample depthwise (transposed) correlation, every backend: a sum over the
  kh*kw kernel taps of strided slices (or interior-padded placements) of x
  times that tap's per-sample filter value. Exact (the same sums as the
  convolution, in another order), B*H'*W'*C*kh*kw multiply-adds, and autodiff
  of slices/pads is pads/slices, so the gradient is as cheap. On CPU the
  vmap/grouped formulation was far slower or ran out of memory.
- Shared-kernel (transposed) convolution on CPU: each pass (forward, input
  gradient, kernel gradient) is XLA's convolution, a matrix product with
  im2col / sub-pixel col2im, or the C++ kernels of
  `cign_jax.kernels.native_conv` (the same products with the patches built in
  cache-sized blocks), chosen by `cign_jax.kernels.cpu_conv.cpu_plan`: the C++
  kernels for float32 wherever they build, else per layer shape from
  measurements (XLA's CPU lowering of some passes is far slower). On
  GPU/TPU: XLA's own convolutions.

`tests/test_ops.py` checks every implementation against the lax reference and
against an independent naive loop, values and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cign_jax.kernels import cpu_conv
from cign_jax.kernels import shared

_DIMS = ("NHWC", "HWIO", "NHWC")

# The shared-kernel references and the output sizes live beside the tap
# geometry that the CPU formulations also use (`cign_jax.kernels.shared`);
# they are part of this module's API.
conv2d_reference = shared.conv2d_reference
conv_transpose2d_reference = shared.conv_transpose2d_reference
conv_output_size = shared.conv_output_size
conv_transpose_output_size = shared.conv_transpose_output_size


def _check_rank(name: str, array, rank: int, what: str):
  if array.ndim != rank:
    raise ValueError(
        f"{name}: expected {what} of rank {rank}, got shape "
        f"{tuple(array.shape)}"
    )


def _check_per_sample(name, x, filters):
  _check_rank(name, x, 4, "x (B, H, W, C)")
  _check_rank(name, filters, 4, "filters (B, kh, kw, C)")
  if x.shape[0] != filters.shape[0] or x.shape[3] != filters.shape[3]:
    raise ValueError(
        f"{name}: x {tuple(x.shape)} and filters {tuple(filters.shape)} must "
        "agree in batch (axis 0) and channels (axis 3)"
    )


def per_sample_depthwise_correlation_reference(
    x, filters, stride: int, padding: int
):
  """vmap over samples of a depthwise lax.conv_general_dilated."""
  _check_per_sample("per_sample_depthwise_correlation", x, filters)
  channels = x.shape[-1]

  def one(xi, fi):
    # fi (kh, kw, C) -> HWIO (kh, kw, 1, C): one input channel per group.
    return lax.conv_general_dilated(
        xi[None],
        fi[:, :, None, :],
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_DIMS,
        feature_group_count=channels,
    )[0]

  return jax.vmap(one)(x, filters)


def per_sample_depthwise_transposed_correlation_reference(
    x, filters, stride: int, padding: int
):
  """vmap over samples of a depthwise transposed lax convolution."""
  _check_per_sample("per_sample_depthwise_transposed_correlation", x, filters)
  channels = x.shape[-1]
  kh, kw = filters.shape[1], filters.shape[2]

  def one(xi, fi):
    return lax.conv_general_dilated(
        xi[None],
        fi[::-1, ::-1, None, :],
        window_strides=(1, 1),
        padding=((kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2),
        lhs_dilation=(stride, stride),
        dimension_numbers=_DIMS,
        feature_group_count=channels,
    )[0]

  return jax.vmap(one)(x, filters)


def channel_condition(x, embedding, kernel, bias):
  """Appends tanh(embedding @ kernel + bias), shaped (B, H, W, 1), to x.

  x: (B, H, W, C); embedding: (B, E); kernel: (E, H*W); bias: (H*W,).
  Returns (B, H, W, C + 1), the map in the last channel as in the original.
  """
  _check_rank("channel_condition", x, 4, "x (B, H, W, C)")
  b, h, w, _ = x.shape
  if kernel.shape[-1] != h * w:
    raise ValueError(
        f"channel_condition: the linear map gives "
        f"{kernel.shape[-1]} values, the input needs H*W = {h * w}"
    )
  cond = jnp.tanh(embedding @ kernel + bias).reshape(b, h, w, 1)
  return jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)


def condition_maps(class_embeddings, kernel, bias, h: int, w: int):
  """The channel-conditioning maps of every class: (num_classes, H, W, 1).

  class_embeddings: (num_classes, E), the label embedding table; kernel
  (E, H*W) and bias (H*W,) as in `channel_condition`, whose map for label c
  is row c of this.
  """
  if kernel.shape[-1] != h * w:
    raise ValueError(
        f"condition_maps: the linear map gives "
        f"{kernel.shape[-1]} values, the input needs H*W = {h * w}"
    )
  n = class_embeddings.shape[0]
  return jnp.tanh(class_embeddings @ kernel + bias).reshape(n, h, w, 1)


def pick_by_label(per_class, labels):
  """per_class[labels] for per_class (num_classes, ...) and labels (B,).

  A product with the one-hot labels at full float32 precision (exact: one
  term per output), so that the gradient is a (num_classes, B) product
  rather than a scatter-add into num_classes rows.
  """
  one_hot = jax.nn.one_hot(labels, per_class.shape[0], dtype=per_class.dtype)
  flat = per_class.reshape(per_class.shape[0], -1)
  picked = jnp.matmul(one_hot, flat, precision=lax.Precision.HIGHEST)
  return picked.reshape((labels.shape[0],) + per_class.shape[1:])


# ---------------------------------------------------------------------------
# Per-sample depthwise ops (CIGN filter conditioning).


def _depthwise_correlation(x, filters, stride, padding):
  kh, kw = filters.shape[1], filters.shape[2]
  out = None
  for (di, dj), tap in shared.tap_slices(x, kh, kw, stride, padding):
    term = tap * filters[:, di, dj, :][:, None, None, :]
    out = term if out is None else out + term
  return out


def _depthwise_placed(x, filters, stride):
  """The uncropped ((H-1)s + kh, (W-1)s + kw) map of the transposed
  correlation."""
  kh, kw = filters.shape[1], filters.shape[2]
  return shared.place_taps(
      lambda di, dj: x * filters[:, di, dj, :][:, None, None, :], kh, kw, stride
  )


def _depthwise_transposed(x, filters, stride, padding):
  return shared.crop(_depthwise_placed(x, filters, stride), padding)


def _stack_taps(sums, kh, kw):
  return jnp.stack(
      [
          jnp.stack([sums[(di, dj)] for dj in range(kw)], axis=1)
          for di in range(kh)
      ],
      axis=1,
  )


def _filter_grad(taps, g, kh, kw, crop=None):
  """sum over (i, j) of tap * g per tap: the (B, kh, kw, C) filter gradient.

  taps: [((di, dj), tap)] in row-major tap order; `crop` (h, w): multiply
  g's taps cropped to that size with g itself (`g` is then x)."""

  def product(tap):
    if crop is not None:
      tap = tap[:, : crop[0], : crop[1]]
    return tap * g

  return _stack_taps(
      {key: jnp.sum(product(tap), axis=(1, 2)) for key, tap in taps}, kh, kw
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_correlation_vjp(x, filters, stride, padding):
  return _depthwise_correlation(x, filters, stride, padding)


def _dc_fwd(x, filters, stride, padding):
  return _depthwise_correlation(x, filters, stride, padding), (x, filters)


def _dc_bwd(stride, padding, res, g):
  # The adjoint in x is the transposed correlation with the same filters;
  # the filter gradient is, per tap, sum_{i,j} x_tap * g.
  x, filters = res
  kh, kw = filters.shape[1], filters.shape[2]
  dx = shared.input_window(
      _depthwise_placed(g, filters, stride), padding, x.shape[1], x.shape[2]
  )
  df = _filter_grad(
      list(shared.tap_slices(x, kh, kw, stride, padding)), g, kh, kw
  )
  return dx.astype(x.dtype), df.astype(filters.dtype)


_depthwise_correlation_vjp.defvjp(_dc_fwd, _dc_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_transposed_vjp(x, filters, stride, padding):
  return _depthwise_transposed(x, filters, stride, padding)


def _dt_fwd(x, filters, stride, padding):
  return _depthwise_transposed(x, filters, stride, padding), (x, filters)


def _dt_bwd(stride, padding, res, g):
  # The adjoint in x is the correlation of g with the same filters; the
  # filter gradient is, per tap, sum_{i,j} x * (tap of g).
  x, filters = res
  kh, kw = filters.shape[1], filters.shape[2]
  dx = _depthwise_correlation(g, filters, stride, padding)
  h, w = x.shape[1], x.shape[2]
  df = _filter_grad(
      list(shared.tap_slices(g, kh, kw, stride, padding)),
      x,
      kh,
      kw,
      crop=(h, w),
  )
  return dx.astype(x.dtype), df.astype(filters.dtype)


_depthwise_transposed_vjp.defvjp(_dt_fwd, _dt_bwd)


def per_sample_depthwise_correlation(x, filters, stride: int, padding: int):
  """out[b,i,j,c] = sum_{di,dj} x_pad[b, i*s+di, j*s+dj, c] filters[b,di,dj,c].

  x: (B, H, W, C); filters: (B, kh, kw, C) -> (B, H', W', C) with
  H' = (H + 2p - kh) // s + 1. Its gradient is written by hand (custom VJP):
  autodiff of the tap slices scattered kh*kw full-size maps.
  """
  _check_per_sample("per_sample_depthwise_correlation", x, filters)
  return _depthwise_correlation_vjp(x, filters, stride, padding)


def per_sample_depthwise_transposed_correlation(
    x, filters, stride: int, padding: int
):
  """out[b, i*s - p + di, j*s - p + dj, c] += x[b,i,j,c] filters[b,di,dj,c].

  x: (B, H, W, C); filters: (B, kh, kw, C) -> (B, (H-1)s - 2p + kh, ..., C),
  PyTorch's conv_transpose2d with groups = B*C. Custom VJP as above.
  """
  _check_per_sample("per_sample_depthwise_transposed_correlation", x, filters)
  return _depthwise_transposed_vjp(x, filters, stride, padding)


def _use_matmul_convs() -> bool:
  return jax.default_backend() == "cpu"


def conv2d(x, kernel, stride: int, padding: int):
  """Cross-correlation with a shared kernel; see `cign_jax.ops`."""
  _check_rank("conv2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(
        f"conv2d: x has {x.shape[-1]} channels, the kernel "
        f"{tuple(kernel.shape)} expects {kernel.shape[2]}"
    )
  if _use_matmul_convs():
    return cpu_conv.conv2d_cpu(
        x,
        kernel,
        stride,
        padding,
        cpu_conv.cpu_plan(
            False,
            x.shape,
            kernel.shape,
            stride,
            padding,
            jnp.result_type(x, kernel),
        ),
    )
  return conv2d_reference(x, kernel, stride, padding)


def conv_transpose2d(x, kernel, stride: int, padding: int):
  """PyTorch-style transposed convolution; see `cign_jax.ops`."""
  _check_rank("conv_transpose2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(
        f"conv_transpose2d: x has {x.shape[-1]} channels, the "
        f"kernel {tuple(kernel.shape)} expects {kernel.shape[2]}"
    )
  if _use_matmul_convs():
    return cpu_conv.conv_transpose2d_cpu(
        x,
        kernel,
        stride,
        padding,
        cpu_conv.cpu_plan(
            True,
            x.shape,
            kernel.shape,
            stride,
            padding,
            jnp.result_type(x, kernel),
        ),
    )
  return conv_transpose2d_reference(x, kernel, stride, padding)
