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
- Shared-kernel convolution on CPU: im2col by strided slices and one matrix
  product; transposed convolution on CPU: one matrix product and col2im by
  interior-padded placements (XLA's CPU convolutions were ~3x slower than
  PyTorch's here). On GPU/TPU: XLA's own convolutions.

`tests/test_ops.py` checks every implementation against the lax reference and
against an independent naive loop, values and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Output size of a correlation (PyTorch's conv2d arithmetic)."""
  return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int,
                               padding: int) -> int:
  """Output size of a transposed correlation: (H - 1) s - 2p + k."""
  return (size - 1) * stride - 2 * padding + kernel


def _check_rank(name: str, array, rank: int, what: str):
  if array.ndim != rank:
    raise ValueError(f"{name}: expected {what} of rank {rank}, got shape "
                     f"{tuple(array.shape)}")


def conv2d_reference(x, kernel, stride: int, padding: int):
  """Cross-correlation, x (B,H,W,Ci), kernel (kh,kw,Ci,Co) -> (B,H',W',Co)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMS)


def conv_transpose2d_reference(x, kernel, stride: int, padding: int):
  """PyTorch conv_transpose2d, x (B,H,W,Ci), kernel (kh,kw,Ci,Co).

  out[b, i*s - p + di, j*s - p + dj, o] += x[b, i, j, c] * kernel[di, dj, c, o]
  """
  kh, kw = kernel.shape[0], kernel.shape[1]
  if padding > min(kh, kw) - 1:
    raise ValueError(f"conv_transpose2d: padding {padding} must be < kernel "
                     f"size {min(kh, kw)}")
  return lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=((kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2),
      lhs_dilation=(stride, stride), dimension_numbers=_DIMS)


def _check_per_sample(name, x, filters):
  _check_rank(name, x, 4, "x (B, H, W, C)")
  _check_rank(name, filters, 4, "filters (B, kh, kw, C)")
  if x.shape[0] != filters.shape[0] or x.shape[3] != filters.shape[3]:
    raise ValueError(
        f"{name}: x {tuple(x.shape)} and filters {tuple(filters.shape)} must "
        "agree in batch (axis 0) and channels (axis 3)")


def per_sample_depthwise_correlation_reference(x, filters, stride: int,
                                               padding: int):
  """vmap over samples of a depthwise lax.conv_general_dilated."""
  _check_per_sample("per_sample_depthwise_correlation", x, filters)
  channels = x.shape[-1]

  def one(xi, fi):
    # fi (kh, kw, C) -> HWIO (kh, kw, 1, C): one input channel per group.
    return lax.conv_general_dilated(
        xi[None], fi[:, :, None, :], window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=_DIMS, feature_group_count=channels)[0]

  return jax.vmap(one)(x, filters)


def per_sample_depthwise_transposed_correlation_reference(
    x, filters, stride: int, padding: int):
  """vmap over samples of a depthwise transposed lax convolution."""
  _check_per_sample("per_sample_depthwise_transposed_correlation", x, filters)
  channels = x.shape[-1]
  kh, kw = filters.shape[1], filters.shape[2]

  def one(xi, fi):
    return lax.conv_general_dilated(
        xi[None], fi[::-1, ::-1, None, :], window_strides=(1, 1),
        padding=((kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2),
        lhs_dilation=(stride, stride), dimension_numbers=_DIMS,
        feature_group_count=channels)[0]

  return jax.vmap(one)(x, filters)


def channel_condition(x, embedding, kernel, bias):
  """Appends tanh(embedding @ kernel + bias), shaped (B, H, W, 1), to x.

  x: (B, H, W, C); embedding: (B, E); kernel: (E, H*W); bias: (H*W,).
  Returns (B, H, W, C + 1), the map in the last channel as in the original.
  """
  _check_rank("channel_condition", x, 4, "x (B, H, W, C)")
  b, h, w, _ = x.shape
  if kernel.shape[-1] != h * w:
    raise ValueError(f"channel_condition: the linear map gives "
                     f"{kernel.shape[-1]} values, the input needs H*W = {h * w}")
  cond = jnp.tanh(embedding @ kernel + bias).reshape(b, h, w, 1)
  return jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)


# ---------------------------------------------------------------------------
# The implementations the models use.


def _pad_hw(x, padding: int):
  if padding == 0:
    return x
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _tap_slices(x, kh: int, kw: int, stride: int, padding: int):
  """Yields ((di, dj), x_pad[:, di + s*i, dj + s*j, :]) for every tap."""
  xp = _pad_hw(x, padding)
  hp, wp = xp.shape[1], xp.shape[2]
  ho = (hp - kh) // stride + 1
  wo = (wp - kw) // stride + 1
  for di in range(kh):
    for dj in range(kw):
      yield (di, dj), lax.slice(
          xp, (0, di, dj, 0),
          (xp.shape[0], di + stride * (ho - 1) + 1, dj + stride * (wo - 1) + 1,
           xp.shape[3]),
          (1, stride, stride, 1))


def _place_tap(y, di: int, dj: int, kh: int, kw: int, stride: int):
  """Puts y[:, i, j] at (i*s + di, j*s + dj) in a ((H-1)s + kh)-sized map."""
  zero = jnp.zeros((), y.dtype)
  return lax.pad(y, zero, ((0, 0, 0), (di, kh - 1 - di, stride - 1),
                           (dj, kw - 1 - dj, stride - 1), (0, 0, 0)))


def _crop(y, padding: int):
  if padding == 0:
    return y
  return y[:, padding:y.shape[1] - padding, padding:y.shape[2] - padding, :]


# ---------------------------------------------------------------------------
# Per-sample depthwise ops (CIGN filter conditioning).


def per_sample_depthwise_correlation(x, filters, stride: int, padding: int):
  """out[b,i,j,c] = sum_{di,dj} x_pad[b, i*s+di, j*s+dj, c] filters[b,di,dj,c].

  x: (B, H, W, C); filters: (B, kh, kw, C) -> (B, H', W', C) with
  H' = (H + 2p - kh) // s + 1.
  """
  _check_per_sample("per_sample_depthwise_correlation", x, filters)
  kh, kw = filters.shape[1], filters.shape[2]
  out = None
  for (di, dj), tap in _tap_slices(x, kh, kw, stride, padding):
    term = tap * filters[:, di, dj, :][:, None, None, :]
    out = term if out is None else out + term
  return out


def per_sample_depthwise_transposed_correlation(x, filters, stride: int,
                                                padding: int):
  """out[b, i*s - p + di, j*s - p + dj, c] += x[b,i,j,c] filters[b,di,dj,c].

  x: (B, H, W, C); filters: (B, kh, kw, C) -> (B, (H-1)s - 2p + kh, ..., C),
  PyTorch's conv_transpose2d with groups = B*C.
  """
  _check_per_sample("per_sample_depthwise_transposed_correlation", x, filters)
  kh, kw = filters.shape[1], filters.shape[2]
  out = None
  for di in range(kh):
    for dj in range(kw):
      term = _place_tap(x * filters[:, di, dj, :][:, None, None, :], di, dj,
                        kh, kw, stride)
      out = term if out is None else out + term
  return _crop(out, padding)


# ---------------------------------------------------------------------------
# Shared-kernel convolutions.


def conv2d_im2col(x, kernel, stride: int, padding: int):
  """conv2d as im2col (strided slices) and one matrix product."""
  kh, kw, ci, co = kernel.shape
  taps = [tap for _, tap in _tap_slices(x, kh, kw, stride, padding)]
  patches = jnp.concatenate(taps, axis=-1)  # (B, H', W', kh*kw*Ci), tap-major
  return patches @ kernel.reshape(kh * kw * ci, co)


def conv_transpose2d_col2im(x, kernel, stride: int, padding: int):
  """conv_transpose2d as one matrix product and col2im (placements)."""
  kh, kw, ci, co = kernel.shape
  cols = x @ kernel.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co)
  cols = cols.reshape(x.shape[:3] + (kh, kw, co))
  out = None
  for di in range(kh):
    for dj in range(kw):
      term = _place_tap(cols[:, :, :, di, dj, :], di, dj, kh, kw, stride)
      out = term if out is None else out + term
  return _crop(out, padding)


def _use_matmul_convs() -> bool:
  return jax.default_backend() == "cpu"


def conv2d(x, kernel, stride: int, padding: int):
  """Cross-correlation with a shared kernel; see `cign_jax.ops`."""
  _check_rank("conv2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d: x has {x.shape[-1]} channels, the kernel "
                     f"{tuple(kernel.shape)} expects {kernel.shape[2]}")
  if _use_matmul_convs():
    return conv2d_im2col(x, kernel, stride, padding)
  return conv2d_reference(x, kernel, stride, padding)


def conv_transpose2d(x, kernel, stride: int, padding: int):
  """PyTorch-style transposed convolution; see `cign_jax.ops`."""
  _check_rank("conv_transpose2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv_transpose2d: x has {x.shape[-1]} channels, the "
                     f"kernel {tuple(kernel.shape)} expects {kernel.shape[2]}")
  if _use_matmul_convs():
    return conv_transpose2d_col2im(x, kernel, stride, padding)
  return conv_transpose2d_reference(x, kernel, stride, padding)
