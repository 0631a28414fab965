"""What `cign_jax.ops` and the CPU formulations of `cign_jax.kernels.cpu_conv`
both use: output sizes, XLA's shared-kernel convolutions in PyTorch's
conventions (the references of `ops.conv2d` / `ops.conv_transpose2d`, and the
"xla" formulation of the CPU plans), and the tap geometry (strided slices of
the padded input per kernel tap, and their placement back, the col2im of a
transposed convolution). NHWC, kernels (kh, kw, C_in, C_out).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
  """Output size of a correlation (PyTorch's conv2d arithmetic)."""
  return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_output_size(
    size: int, kernel: int, stride: int, padding: int
) -> int:
  """Output size of a transposed correlation: (H - 1) s - 2p + k."""
  return (size - 1) * stride - 2 * padding + kernel


def conv2d_reference(x, kernel, stride: int, padding: int):
  """Cross-correlation, x (B,H,W,Ci), kernel (kh,kw,Ci,Co) -> (B,H',W',Co)."""
  return lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      dimension_numbers=_DIMS,
  )


def conv_transpose2d_reference(x, kernel, stride: int, padding: int):
  """PyTorch conv_transpose2d, x (B,H,W,Ci), kernel (kh,kw,Ci,Co).

  out[b, i*s - p + di, j*s - p + dj, o] += x[b, i, j, c] * kernel[di, dj, c, o]
  """
  kh, kw = kernel.shape[0], kernel.shape[1]
  if padding > min(kh, kw) - 1:
    raise ValueError(
        f"conv_transpose2d: padding {padding} must be < kernel "
        f"size {min(kh, kw)}"
    )
  return lax.conv_general_dilated(
      x,
      kernel[::-1, ::-1],
      window_strides=(1, 1),
      padding=((kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2),
      lhs_dilation=(stride, stride),
      dimension_numbers=_DIMS,
  )


def pad_hw(x, padding: int):
  if padding == 0:
    return x
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def tap_slices(x, kh: int, kw: int, stride: int, padding: int):
  """Yields ((di, dj), x_pad[:, di + s*i, dj + s*j, :]) for every tap."""
  xp = pad_hw(x, padding)
  hp, wp = xp.shape[1], xp.shape[2]
  # 0 where the kernel does not fit (lax's empty output).
  ho = max(0, (hp - kh) // stride + 1)
  wo = max(0, (wp - kw) // stride + 1)

  def rows(start, n):  # (start, limit) of n strided rows; (0, 0) for none
    return (start, start + stride * (n - 1) + 1) if n else (0, 0)

  for di in range(kh):
    for dj in range(kw):
      (h0, h1), (w0, w1) = rows(di, ho), rows(dj, wo)
      yield (di, dj), lax.slice(
          xp,
          (0, h0, w0, 0),
          (xp.shape[0], h1, w1, xp.shape[3]),
          (1, stride, stride, 1),
      )


def place_taps(tap_values, kh: int, kw: int, stride: int):
  """sum over taps of tap_values(di, dj)[:, i, j] placed at (i*s + di, j*s + dj)
  in a ((H-1)s + kh, (W-1)s + kw) map: the col2im of a transposed conv.

  Sub-pixel form: tap (di, dj) = (s*qh + rh, s*qw + rw) lands on the output
  phase (rh, rw) shifted by (qh, qw), so each phase is a sum of small
  shifted (unstrided, zero-padded) maps, and the phases are interleaved by
  one reshape. That moves s^2 times less memory than placing every tap into
  a full-size interior-padded map.
  """
  qh_max, qw_max = (kh - 1) // stride, (kw - 1) // stride
  phases = {}
  h = w = None
  for di in range(kh):
    for dj in range(kw):
      y = tap_values(di, dj)
      h, w = y.shape[1], y.shape[2]
      (qh, rh), (qw, rw) = divmod(di, stride), divmod(dj, stride)
      shifted = jnp.pad(
          y, ((0, 0), (qh, qh_max - qh), (qw, qw_max - qw), (0, 0))
      )
      key = (rh, rw)
      phases[key] = shifted if key not in phases else phases[key] + shifted
  b, c = y.shape[0], y.shape[3]
  hb, wb = h + qh_max, w + qw_max
  zero = jnp.zeros((b, hb, wb, c), y.dtype)
  grid = jnp.stack(
      [
          jnp.stack(
              [phases.get((rh, rw), zero) for rw in range(stride)], axis=3
          )
          for rh in range(stride)
      ],
      axis=2,
  )  # (B, hb, s, wb, s, C)
  full = grid.reshape(b, hb * stride, wb * stride, c)
  return full[:, : (h - 1) * stride + kh, : (w - 1) * stride + kw]


def crop(y, padding: int):
  if padding == 0:
    return y
  return y[:, padding : y.shape[1] - padding, padding : y.shape[2] - padding, :]


def input_window(full, padding: int, h: int, w: int):
  """The (h, w) input's part of a strided correlation's col2im `full`.

  `full` ((H'-1)s + kh, (W'-1)s + kw), the output gradient placed at every
  tap, covers the padded input's rows from 0, that is input rows from -p:
  the input's rows are full[p : p + h]. When (h + 2p - kh) % s = r != 0 the
  last r rows of the padded input are read by no window and `full` stops
  before them: the max(0, r - p) input rows among them get zero gradient,
  padded at the bottom (likewise columns).
  An empty convolution's col2im (a kernel larger than the padded input) can
  be larger than the input: cut to it."""
  y = full[:, padding : padding + h, padding : padding + w]
  dh, dw = h - y.shape[1], w - y.shape[2]
  if dh == 0 and dw == 0:
    return y
  return jnp.pad(y, ((0, 0), (0, dh), (0, dw), (0, 0)))
