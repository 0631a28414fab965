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
  im2col / sub-pixel col2im, or the C++ kernels of `cign_jax.native_conv`
  (the same products with the patches built in cache-sized blocks), chosen
  by `cpu_plan`: the C++ kernels for float32 wherever they build, else per
  layer shape from measurements (XLA's CPU lowering of some passes was up to
  10x slower). On GPU/TPU: XLA's own convolutions.

`tests/test_ops.py` checks every implementation against the lax reference and
against an independent naive loop, values and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from cign_jax import native_conv

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


def condition_maps(class_embeddings, kernel, bias, h: int, w: int):
  """The channel-conditioning maps of every class: (num_classes, H, W, 1).

  class_embeddings: (num_classes, E), the label embedding table; kernel
  (E, H*W) and bias (H*W,) as in `channel_condition`, whose map for label c
  is row c of this.
  """
  if kernel.shape[-1] != h * w:
    raise ValueError(f"condition_maps: the linear map gives "
                     f"{kernel.shape[-1]} values, the input needs H*W = {h * w}")
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


def _place_taps(tap_values, kh: int, kw: int, stride: int):
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
      shifted = jnp.pad(y, ((0, 0), (qh, qh_max - qh), (qw, qw_max - qw),
                            (0, 0)))
      key = (rh, rw)
      phases[key] = shifted if key not in phases else phases[key] + shifted
  b, c = y.shape[0], y.shape[3]
  hb, wb = h + qh_max, w + qw_max
  zero = jnp.zeros((b, hb, wb, c), y.dtype)
  grid = jnp.stack([jnp.stack([phases.get((rh, rw), zero)
                               for rw in range(stride)], axis=3)
                    for rh in range(stride)], axis=2)  # (B, hb, s, wb, s, C)
  full = grid.reshape(b, hb * stride, wb * stride, c)
  return full[:, :(h - 1) * stride + kh, :(w - 1) * stride + kw]


def _crop(y, padding: int):
  if padding == 0:
    return y
  return y[:, padding:y.shape[1] - padding, padding:y.shape[2] - padding, :]


def _fit(y, h: int, w: int):
  """Zero-pads y at the bottom/right to (h, w) (the rows a strided conv
  never reads, when (H + 2p - k) % s != 0)."""
  dh, dw = h - y.shape[1], w - y.shape[2]
  if dh == 0 and dw == 0:
    return y
  return jnp.pad(y, ((0, 0), (0, dh), (0, dw), (0, 0)))


# ---------------------------------------------------------------------------
# Per-sample depthwise ops (CIGN filter conditioning).


def _depthwise_correlation(x, filters, stride, padding):
  kh, kw = filters.shape[1], filters.shape[2]
  out = None
  for (di, dj), tap in _tap_slices(x, kh, kw, stride, padding):
    term = tap * filters[:, di, dj, :][:, None, None, :]
    out = term if out is None else out + term
  return out


def _depthwise_transposed(x, filters, stride, padding):
  kh, kw = filters.shape[1], filters.shape[2]
  full = _place_taps(lambda di, dj: x * filters[:, di, dj, :][:, None, None, :],
                     kh, kw, stride)
  return _crop(full, padding)


def _stack_taps(sums, kh, kw):
  return jnp.stack([jnp.stack([sums[(di, dj)] for dj in range(kw)], axis=1)
                    for di in range(kh)], axis=1)


def _one_reduction_for_tap_sums() -> bool:
  """The per-sample filter gradient as one reduction over the stacked taps
  (GPU/TPU: one kernel instead of kh*kw small ones) or kh*kw reductions
  (CPU, where it was measured)."""
  return jax.default_backend() != "cpu"


def _filter_grad(taps, g, kh, kw, crop=None):
  """sum over (i, j) of tap * g per tap: the (B, kh, kw, C) filter gradient.

  taps: [((di, dj), tap)] in row-major tap order; `crop` (h, w): multiply
  g's taps cropped to that size with g itself (`g` is then x)."""
  def product(tap):
    if crop is not None:
      tap = tap[:, :crop[0], :crop[1]]
    return tap * g
  if _one_reduction_for_tap_sums():
    stacked = jnp.stack([product(tap) for _, tap in taps], axis=1)
    sums = jnp.sum(stacked, axis=(2, 3))  # (B, kh*kw, C)
    return sums.reshape(sums.shape[0], kh, kw, sums.shape[-1])
  return _stack_taps({key: jnp.sum(product(tap), axis=(1, 2))
                      for key, tap in taps}, kh, kw)


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
  dx = _fit(_depthwise_transposed(g, filters, stride, padding), x.shape[1],
            x.shape[2])
  df = _filter_grad(list(_tap_slices(x, kh, kw, stride, padding)), g, kh, kw)
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
  df = _filter_grad(list(_tap_slices(g, kh, kw, stride, padding)), x, kh, kw,
                    crop=(h, w))
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


def per_sample_depthwise_transposed_correlation(x, filters, stride: int,
                                                padding: int):
  """out[b, i*s - p + di, j*s - p + dj, c] += x[b,i,j,c] filters[b,di,dj,c].

  x: (B, H, W, C); filters: (B, kh, kw, C) -> (B, (H-1)s - 2p + kh, ..., C),
  PyTorch's conv_transpose2d with groups = B*C. Custom VJP as above.
  """
  _check_per_sample("per_sample_depthwise_transposed_correlation", x, filters)
  return _depthwise_transposed_vjp(x, filters, stride, padding)


# ---------------------------------------------------------------------------
# Shared-kernel convolutions.


def conv2d_im2col(x, kernel, stride: int, padding: int):
  """conv2d as im2col (strided slices) and one matrix product."""
  kh, kw, ci, co = kernel.shape
  return _im2col(x, kh, kw, stride, padding) @ kernel.reshape(kh * kw * ci, co)


def conv_transpose2d_col2im(x, kernel, stride: int, padding: int):
  """conv_transpose2d as one matrix product and col2im (placements)."""
  kh, kw, ci, co = kernel.shape
  cols = x @ kernel.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co)
  cols = cols.reshape(x.shape[:3] + (kh, kw, co))
  full = _place_taps(lambda di, dj: cols[:, :, :, di, dj, :], kh, kw, stride)
  return _crop(full, padding)


def _im2col(x, kh: int, kw: int, stride: int, padding: int):
  """(B, H', W', kh*kw*C) patches, tap-major (matches a (kh, kw, C, O) kernel)."""
  return jnp.concatenate(
      [tap for _, tap in _tap_slices(x, kh, kw, stride, padding)], axis=-1)


# On CPU each of a convolution's three passes (forward, input gradient dx,
# kernel gradient dk) runs in one of two formulations, chosen per layer shape
# by `cpu_plan` from measurements (`benchmarks/conv_components.py`):
#   "xla":    lax.conv_general_dilated, or its autodiff gradient;
#   "matmul": im2col by strided slices + one matrix product, or one matrix
#             product + sub-pixel col2im.
#   "native": the same products with the patches built block by block in
#             cache (C++ kernels, `cign_jax.native_conv`); only where
#             `native_conv.available()`.
# A plan is the tuple (forward, dx, dk). Every plan is exact (the same sums
# in another order); tests/test_ops.py checks every formulation in every
# pass position.
FORMULATIONS = ("xla", "matmul", "native")
ALL_PLANS = tuple((f, dx, dk) for f in FORMULATIONS for dx in FORMULATIONS
                  for dk in FORMULATIONS)


def _check_plan(plan):
  if len(plan) != 3 or any(p not in FORMULATIONS for p in plan):
    raise ValueError(f"a CPU conv plan is (forward, dx, dk), each one of "
                     f"{FORMULATIONS}; got {plan!r}")


def _xla_grads(reference, x, kernel, g, stride, padding):
  """(dx, dk) by autodiff of the lax formulation (XLA's gradient convs);
  XLA drops whichever of the two is unused."""
  _, vjp = jax.vjp(lambda a, b: reference(a, b, stride, padding), x, kernel)
  return vjp(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_cpu(x, kernel, stride: int, padding: int,
               plan=("xla", "matmul", "matmul")):
  """conv2d for CPU, each pass in the formulation `plan` names (see above).
  XLA's CPU lowering of the input gradient was 5-10x slower than col2im for
  CIGN's shapes; its forward and kernel gradient win for some layers."""
  return _conv2d_cpu_fwd(x, kernel, stride, padding, plan)[0]


def _planned_forward(formulations, x, kernel, stride, padding, plan):
  """The forward pass in the plan's formulation; residuals (x, kernel)."""
  _check_plan(plan)
  return formulations[plan[0]](x, kernel, stride, padding), (x, kernel)


def _conv_transpose2d_native(x, kernel, stride, padding):
  # The adjoint (input gradient) of the conv from the output's space back to
  # x's, whose kernel is this one with its channel axes swapped.
  kh, kw = kernel.shape[0], kernel.shape[1]
  hw = (conv_transpose_output_size(x.shape[1], kh, stride, padding),
        conv_transpose_output_size(x.shape[2], kw, stride, padding))
  return native_conv.conv_input_grad(x, kernel.transpose(0, 1, 3, 2), stride,
                                     padding, hw)


_conv2d_cpu_fwd = functools.partial(
    _planned_forward, {"xla": conv2d_reference, "matmul": conv2d_im2col,
                       "native": native_conv.conv_forward})


def _conv2d_cpu_bwd(stride, padding, plan, res, g):
  x, kernel = res
  kh, kw, ci, co = kernel.shape
  if "xla" in plan[1:]:
    xla_dx, xla_dk = _xla_grads(conv2d_reference, x, kernel, g, stride,
                                padding)
  if plan[1] == "matmul":
    dx = conv_transpose2d_col2im(g, kernel.transpose(0, 1, 3, 2), stride,
                                 padding)
    dx = _fit(dx, x.shape[1], x.shape[2])
  elif plan[1] == "native":
    dx = native_conv.conv_input_grad(g, kernel, stride, padding,
                                     x.shape[1:3])
  else:
    dx = xla_dx
  if plan[2] == "matmul":
    patches = _im2col(x, kh, kw, stride, padding)
    dk = jnp.einsum("bhwk,bhwo->ko", patches, g).reshape(kh, kw, ci, co)
  elif plan[2] == "native":
    dk = native_conv.conv_kernel_grad(x, g, kh, kw, stride, padding)
  else:
    dk = xla_dk
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv2d_cpu_fwd, _conv2d_cpu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_transpose2d_cpu(x, kernel, stride: int, padding: int,
                         plan=("matmul", "xla", "matmul")):
  """conv_transpose2d for CPU, each pass in the formulation `plan` names:
  forward "matmul" is col2im; dx "xla" is XLA's plain convolution of the
  output gradient, "matmul" its im2col form; dk "matmul" an im2col product."""
  return _conv_transpose2d_cpu_fwd(x, kernel, stride, padding, plan)[0]


_conv_transpose2d_cpu_fwd = functools.partial(
    _planned_forward, {"xla": conv_transpose2d_reference,
                       "matmul": conv_transpose2d_col2im,
                       "native": _conv_transpose2d_native})


def _conv_transpose2d_cpu_bwd(stride, padding, plan, res, g):
  x, kernel = res
  kh, kw, ci, co = kernel.shape
  kernel_t = kernel.transpose(0, 1, 3, 2)
  if plan[1] == "matmul":
    dx = conv2d_im2col(g, kernel_t, stride, padding)
  elif plan[1] == "native":
    dx = native_conv.conv_forward(g, kernel_t, stride, padding)
  else:
    dx = conv2d_reference(g, kernel_t, stride, padding)
  if plan[2] == "native":
    # The kernel gradient of that conv (input g, output gradient x).
    dk = native_conv.conv_kernel_grad(g, x, kh, kw, stride, padding)
    dk = dk.transpose(0, 1, 3, 2)
  elif plan[2] == "matmul":
    # dK[di, dj, c, o] = sum_{b,i,j} x[b,i,j,c] g_pad[b, i*s+di, j*s+dj, o]
    patches = _im2col(g, kh, kw, stride, padding)[:, :x.shape[1], :x.shape[2]]
    dk = jnp.einsum("bhwc,bhwk->ck", x, patches).reshape(ci, kh, kw, co)
    dk = dk.transpose(1, 2, 0, 3)
  else:
    dk = _xla_grads(conv_transpose2d_reference, x, kernel, g, stride,
                    padding)[1]
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_transpose2d_cpu.defvjp(_conv_transpose2d_cpu_fwd,
                            _conv_transpose2d_cpu_bwd)


def cpu_plan(transposed: bool, x_shape, kernel_shape, stride: int,
             padding: int, dtype=jnp.float32):
  """The CPU formulation of each pass for one layer, from measurements
  (`python benchmarks/conv_components.py`, docs/performance.md).

  With the C++ kernels built (`native_conv.available()`) and float32 data,
  every pass is "native": 1.4x to 5.3x faster than the better of the two
  XLA formulations for CIGN's large layers at batch 1152 (up to 31x faster
  than XLA's own convolution gradients), and within a millisecond of it for
  the small ones. The kernels are float32 only, so
  float64 and bfloat16 convolutions keep their precision in XLA's
  formulations. Without the kernels: XLA's forward conv beats im2col + product
  for the strided convs (the im2col copy costs 4-5x the product); col2im
  beats XLA's input gradient of a conv (up to 7x) and XLA's transposed-conv
  forward and kernel gradient (up to 10x); XLA's kernel gradient beats the
  im2col product when a strided conv's output is at most 4x4
  (discriminator blocks 3-4)."""
  if jnp.dtype(dtype) == jnp.float32 and native_conv.available():
    return ("native", "native", "native")
  if transposed:
    return ("matmul", "xla", "matmul")
  out_h = conv_output_size(x_shape[1], kernel_shape[0], stride, padding)
  kernel_grad = "xla" if stride > 1 and out_h <= 4 else "matmul"
  return ("xla", "matmul", kernel_grad)


def _use_matmul_convs() -> bool:
  return jax.default_backend() == "cpu"


def conv2d(x, kernel, stride: int, padding: int):
  """Cross-correlation with a shared kernel; see `cign_jax.ops`."""
  _check_rank("conv2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d: x has {x.shape[-1]} channels, the kernel "
                     f"{tuple(kernel.shape)} expects {kernel.shape[2]}")
  if _use_matmul_convs():
    return conv2d_cpu(x, kernel, stride, padding,
                      cpu_plan(False, x.shape, kernel.shape, stride,
                               padding, jnp.result_type(x, kernel)))
  return conv2d_reference(x, kernel, stride, padding)


def conv_transpose2d(x, kernel, stride: int, padding: int):
  """PyTorch-style transposed convolution; see `cign_jax.ops`."""
  _check_rank("conv_transpose2d", x, 4, "x (B, H, W, C)")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv_transpose2d: x has {x.shape[-1]} channels, the "
                     f"kernel {tuple(kernel.shape)} expects {kernel.shape[2]}")
  if _use_matmul_convs():
    return conv_transpose2d_cpu(x, kernel, stride, padding,
                                cpu_plan(True, x.shape, kernel.shape, stride,
                                         padding, jnp.result_type(x, kernel)))
  return conv_transpose2d_reference(x, kernel, stride, padding)
