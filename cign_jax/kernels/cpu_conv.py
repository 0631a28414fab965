"""CPU formulations of the shared-kernel convolutions and their per-layer plan.

Each of a convolution's three passes (forward, input gradient dx, kernel
gradient dk) runs in one of three formulations, chosen per layer by
`cpu_plan`; `cign_jax.ops.conv2d` / `conv_transpose2d` use these on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cign_jax.kernels import native_conv
from cign_jax.kernels import shared
from cign_jax.kernels.shared import conv2d_reference
from cign_jax.kernels.shared import conv_output_size
from cign_jax.kernels.shared import conv_transpose2d_reference
from cign_jax.kernels.shared import conv_transpose_output_size

# ---------------------------------------------------------------------------
# Shared-kernel convolutions.


def conv2d_im2col(x, kernel, stride: int, padding: int):
  """conv2d as im2col (strided slices) and one matrix product."""
  kh, kw, ci, co = kernel.shape
  return _im2col(x, kh, kw, stride, padding) @ kernel.reshape(kh * kw * ci, co)


def conv_transpose2d_col2im(x, kernel, stride: int, padding: int):
  """conv_transpose2d as one matrix product and col2im (placements)."""
  return shared.crop(_col2im(x, kernel, stride), padding)


def _col2im(x, kernel, stride: int):
  """x @ kernel per tap, placed: the uncropped ((H-1)s + kh, (W-1)s + kw)
  map of a transposed convolution (kernel (kh, kw, C_in, C_out))."""
  kh, kw, ci, co = kernel.shape
  cols = x @ kernel.transpose(2, 0, 1, 3).reshape(ci, kh * kw * co)
  cols = cols.reshape(x.shape[:3] + (kh, kw, co))
  return shared.place_taps(
      lambda di, dj: cols[:, :, :, di, dj, :], kh, kw, stride
  )


def _im2col(x, kh: int, kw: int, stride: int, padding: int):
  """(B, H', W', kh*kw*C) patches, tap-major (matches a (kh, kw, C, O) kernel)."""
  return jnp.concatenate(
      [tap for _, tap in shared.tap_slices(x, kh, kw, stride, padding)], axis=-1
  )


# On CPU each of a convolution's three passes (forward, input gradient dx,
# kernel gradient dk) runs in one of two formulations, chosen per layer shape
# by `cpu_plan` from measurements (`benchmarks/conv_components.py`):
#   "xla":    lax.conv_general_dilated, or its autodiff gradient;
#   "matmul": im2col by strided slices + one matrix product, or one matrix
#             product + sub-pixel col2im.
#   "native": the same products with the patches built block by block in
#             cache (C++ kernels, `cign_jax.kernels.native_conv`); only where
#             `native_conv.available()`.
# A plan is the tuple (forward, dx, dk). Every plan is exact (the same sums
# in another order); tests/test_ops.py checks every formulation in every
# pass position.
FORMULATIONS = ("xla", "matmul", "native")


def _check_plan(plan):
  if len(plan) != 3 or any(p not in FORMULATIONS for p in plan):
    raise ValueError(
        f"a CPU conv plan is (forward, dx, dk), each one of "
        f"{FORMULATIONS}; got {plan!r}"
    )


def _xla_grads(reference, x, kernel, g, stride, padding):
  """(dx, dk) by autodiff of the lax formulation (XLA's gradient convs);
  XLA drops whichever of the two is unused."""
  _, vjp = jax.vjp(lambda a, b: reference(a, b, stride, padding), x, kernel)
  return vjp(g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_cpu(
    x, kernel, stride: int, padding: int, plan=("xla", "matmul", "matmul")
):
  """conv2d for CPU, each pass in the formulation `plan` names (see above).
  XLA's CPU lowering of the input gradient is slower than col2im for
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
  hw = (
      conv_transpose_output_size(x.shape[1], kh, stride, padding),
      conv_transpose_output_size(x.shape[2], kw, stride, padding),
  )
  return native_conv.conv_input_grad(
      x, kernel.transpose(0, 1, 3, 2), stride, padding, hw
  )


_conv2d_cpu_fwd = functools.partial(
    _planned_forward,
    {
        "xla": conv2d_reference,
        "matmul": conv2d_im2col,
        "native": native_conv.conv_forward,
    },
)


def _conv2d_cpu_bwd(stride, padding, plan, res, g):
  x, kernel = res
  kh, kw, ci, co = kernel.shape
  if "xla" in plan[1:]:
    xla_dx, xla_dk = _xla_grads(conv2d_reference, x, kernel, g, stride, padding)
  if plan[1] == "matmul":
    dx = shared.input_window(
        _col2im(g, kernel.transpose(0, 1, 3, 2), stride),
        padding,
        x.shape[1],
        x.shape[2],
    )
  elif plan[1] == "native":
    dx = native_conv.conv_input_grad(g, kernel, stride, padding, x.shape[1:3])
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
def conv_transpose2d_cpu(
    x, kernel, stride: int, padding: int, plan=("matmul", "xla", "matmul")
):
  """conv_transpose2d for CPU, each pass in the formulation `plan` names:
  forward "matmul" is col2im; dx "xla" is XLA's plain convolution of the
  output gradient, "matmul" its im2col form; dk "matmul" an im2col product."""
  return _conv_transpose2d_cpu_fwd(x, kernel, stride, padding, plan)[0]


_conv_transpose2d_cpu_fwd = functools.partial(
    _planned_forward,
    {
        "xla": conv_transpose2d_reference,
        "matmul": conv_transpose2d_col2im,
        "native": _conv_transpose2d_native,
    },
)


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
    patches = _im2col(g, kh, kw, stride, padding)[:, : x.shape[1], : x.shape[2]]
    dk = jnp.einsum("bhwc,bhwk->ck", x, patches).reshape(ci, kh, kw, co)
    dk = dk.transpose(1, 2, 0, 3)
  else:
    dk = _xla_grads(conv_transpose2d_reference, x, kernel, g, stride, padding)[
        1
    ]
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_transpose2d_cpu.defvjp(
    _conv_transpose2d_cpu_fwd, _conv_transpose2d_cpu_bwd
)


def cpu_plan(
    transposed: bool,
    x_shape,
    kernel_shape,
    stride: int,
    padding: int,
    dtype=jnp.float32,
):
  """The CPU formulation of each pass for one layer, from measurements
  (`python benchmarks/conv_components.py`, docs/performance.md).

  With the C++ kernels built (`native_conv.available()`) and float32 data,
  every pass is "native": faster than the better of the two XLA
  formulations for CIGN's large layers and as fast for the small ones. The
  kernels are float32 only, so float64 and bfloat16 convolutions keep their
  precision in XLA's formulations. Without the kernels: XLA's forward conv
  beats im2col + product for the strided convs (the im2col copy costs more
  than the product); col2im beats XLA's input gradient of a conv and XLA's
  transposed-conv forward and kernel gradient; XLA's kernel gradient beats
  the im2col product when a strided conv's output is at most 4x4
  (discriminator blocks 3-4). The figures: docs/performance.md, "each conv
  pass in its faster formulation"."""
  if jnp.dtype(dtype) == jnp.float32 and native_conv.available():
    return ("native", "native", "native")
  if transposed:
    return ("matmul", "xla", "matmul")
  out_h = conv_output_size(x_shape[1], kernel_shape[0], stride, padding)
  kernel_grad = "xla" if stride > 1 and out_h <= 4 else "matmul"
  return ("xla", "matmul", kernel_grad)
