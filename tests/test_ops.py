"""The conditioning and convolution ops against naive loops written here.

The naive references below are independent of cign_jax: explicit loops over
samples, channels and kernel taps in numpy, following PyTorch's definitions
of conv2d / conv_transpose2d (with groups for the per-sample ops).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cign_jax.kernels import cpu_conv
from cign_jax.kernels import native_conv
from cign_jax import ops

jax.config.update("jax_default_matmul_precision", "highest")


def naive_depthwise_correlation(x, f, s, p):
  b, h, w, c = x.shape
  k1, k2 = f.shape[1], f.shape[2]
  xp = np.zeros((b, h + 2 * p, w + 2 * p, c))
  xp[:, p : p + h, p : p + w] = x
  ho, wo = (h + 2 * p - k1) // s + 1, (w + 2 * p - k2) // s + 1
  out = np.zeros((b, ho, wo, c))
  for n in range(b):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          acc = 0.0
          for di in range(k1):
            for dj in range(k2):
              acc += xp[n, i * s + di, j * s + dj, ch] * f[n, di, dj, ch]
          out[n, i, j, ch] = acc
  return out


def naive_depthwise_transposed(x, f, s, p):
  b, h, w, c = x.shape
  k1, k2 = f.shape[1], f.shape[2]
  full = np.zeros((b, (h - 1) * s + k1, (w - 1) * s + k2, c))
  for n, ch, i, j, di, dj in itertools.product(
      range(b), range(c), range(h), range(w), range(k1), range(k2)
  ):
    full[n, i * s + di, j * s + dj, ch] += x[n, i, j, ch] * f[n, di, dj, ch]
  return full[:, p : full.shape[1] - p, p : full.shape[2] - p]


def naive_conv2d(x, kern, s, p):
  b, h, w, ci = x.shape
  k1, k2, _, co = kern.shape
  xp = np.zeros((b, h + 2 * p, w + 2 * p, ci))
  xp[:, p : p + h, p : p + w] = x
  ho, wo = (h + 2 * p - k1) // s + 1, (w + 2 * p - k2) // s + 1
  out = np.zeros((b, ho, wo, co))
  for i in range(ho):
    for j in range(wo):
      patch = xp[
          :, i * s : i * s + k1, j * s : j * s + k2, :
      ]  # (b, k1, k2, ci)
      for o in range(co):
        out[:, i, j, o] = np.sum(patch * kern[None, :, :, :, o], axis=(1, 2, 3))
  return out


def naive_conv_transpose2d(x, kern, s, p):
  b, h, w, ci = x.shape
  k1, k2, _, co = kern.shape
  full = np.zeros((b, (h - 1) * s + k1, (w - 1) * s + k2, co))
  for i in range(h):
    for j in range(w):
      for di in range(k1):
        for dj in range(k2):
          full[:, i * s + di, j * s + dj, :] += x[:, i, j, :] @ kern[di, dj]
  return full[:, p : full.shape[1] - p, p : full.shape[2] - p]


# Odd and even sizes, strides 1 and 2, padding 0 and 1, CIGN's kernels.
CASES = [
    # (batch, H, W, C, k, stride, padding)
    (3, 7, 5, 2, 3, 2, 1),
    # (H + 2p - k) % s = 1 with p = 1: the last input row is read by a
    # window whose col2im row lies past the end crop (the input gradient's
    # window, kernels/shared.input_window).
    (2, 5, 5, 3, 4, 2, 1),
    (2, 6, 7, 2, 2, 1, 0),
    (2, 4, 3, 3, 3, 1, 1),
    (2, 5, 6, 2, 3, 2, 0),
    (1, 2, 2, 4, 4, 2, 1),
]


def _rand(shape, seed):
  return np.random.RandomState(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_per_sample_depthwise_correlation(case):
  b, h, w, c, k, s, p = case
  x, f = _rand((b, h, w, c), 0), _rand((b, k, k, c), 1)
  want = naive_depthwise_correlation(x, f, s, p)
  assert want.shape[1] == ops.conv_output_size(h, k, s, p)
  for fn in (
      ops.per_sample_depthwise_correlation,
      ops.per_sample_depthwise_correlation_reference,
  ):
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(f), s, p))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_per_sample_depthwise_transposed_correlation(case):
  b, h, w, c, k, s, p = case
  if p > k - 1:
    pytest.skip("padding must be smaller than the kernel for a transpose")
  x, f = _rand((b, h, w, c), 2), _rand((b, k, k, c), 3)
  want = naive_depthwise_transposed(x, f, s, p)
  assert want.shape[1] == ops.conv_transpose_output_size(h, k, s, p)
  for fn in (
      ops.per_sample_depthwise_transposed_correlation,
      ops.per_sample_depthwise_transposed_correlation_reference,
  ):
    got = np.asarray(fn(jnp.asarray(x), jnp.asarray(f), s, p))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_shared_kernel_convs(case):
  b, h, w, ci, k, s, p = case
  co = 3
  x = _rand((b, h, w, ci), 4)
  kern = _rand((k, k, ci, co), 5)
  want = naive_conv2d(x, kern, s, p)
  for fn in (
      ops.conv2d,
      cpu_conv.conv2d_im2col,
      cpu_conv.conv2d_cpu,
      ops.conv2d_reference,
  ):
    np.testing.assert_allclose(
        np.asarray(fn(x, kern, s, p)), want, rtol=1e-5, atol=1e-5
    )
  kern_t = _rand((k, k, ci, co), 6)
  want_t = naive_conv_transpose2d(x, kern_t, s, p)
  for fn in (
      ops.conv_transpose2d,
      cpu_conv.conv_transpose2d_col2im,
      cpu_conv.conv_transpose2d_cpu,
      ops.conv_transpose2d_reference,
  ):
    np.testing.assert_allclose(
        np.asarray(fn(x, kern_t, s, p)), want_t, rtol=1e-5, atol=1e-5
    )


def _grad_pairs():
  return [
      (
          ops.per_sample_depthwise_correlation,
          ops.per_sample_depthwise_correlation_reference,
          "per_sample",
      ),
      (
          ops.per_sample_depthwise_transposed_correlation,
          ops.per_sample_depthwise_transposed_correlation_reference,
          "per_sample",
      ),
      (cpu_conv.conv2d_im2col, ops.conv2d_reference, "shared"),
      (
          cpu_conv.conv_transpose2d_col2im,
          ops.conv_transpose2d_reference,
          "shared",
      ),
      (cpu_conv.conv2d_cpu, ops.conv2d_reference, "shared"),
      (cpu_conv.conv_transpose2d_cpu, ops.conv_transpose2d_reference, "shared"),
  ]


def _assert_same_gradients(fn, reference, x, f, g, relative=False):
  """Both gradients of <fn(x, f), g> equal those of <reference(x, f), g>:
  within 1e-4, or, if `relative`, within 1e-5 of the reference gradient's
  largest magnitude (for large layers, whose sums grow with their size)."""
  grads = jax.grad(lambda a, bb: jnp.sum(fn(a, bb) * g), argnums=(0, 1))(x, f)
  ref = jax.grad(lambda a, bb: jnp.sum(reference(a, bb) * g), argnums=(0, 1))(
      x, f
  )
  for got, want in zip(grads, ref):
    if relative:
      scale = float(jnp.max(jnp.abs(want)))
      np.testing.assert_allclose(
          np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5
      )
    else:
      np.testing.assert_allclose(
          np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4
      )


@pytest.mark.parametrize("case", CASES[:5])
@pytest.mark.parametrize("pair", range(6))
def test_gradients(case, pair):
  """Gradients: finite differences (exact for these bilinear maps up to
  rounding) and the lax reference's autodiff gradient."""
  fast, reference, kind = _grad_pairs()[pair]
  b, h, w, c, k, s, p = case
  x = jnp.asarray(_rand((b, h, w, c), 7))
  if kind == "per_sample":
    f = jnp.asarray(_rand((b, k, k, c), 8))
  else:
    f = jnp.asarray(_rand((k, k, c, 2), 8))
  fn = lambda a, bb: fast(a, bb, s, p)
  check_grads(
      fn, (x, f), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2
  )
  out_shape = jax.eval_shape(fn, x, f).shape
  g = jnp.asarray(_rand(out_shape, 9))
  _assert_same_gradients(fn, lambda a, bb: reference(a, bb, s, p), x, f, g)


def test_transposed_is_adjoint_of_correlation():
  """<corr(x, f), y> == <x, corr_T(y, f)>: the transposed op is the adjoint."""
  b, h, c, k, s, p = 2, 7, 3, 3, 2, 1
  x = jnp.asarray(_rand((b, h, h, c), 10))
  f = jnp.asarray(_rand((b, k, k, c), 11))
  y = ops.per_sample_depthwise_correlation(x, f, s, p)
  v = jnp.asarray(_rand(y.shape, 12))
  lhs = jnp.sum(y * v)
  back = ops.per_sample_depthwise_transposed_correlation(v, f, s, p)
  # (H'-1)s - 2p + k may be smaller than H when (H + 2p - k) % s != 0.
  rhs = jnp.sum(x[:, : back.shape[1], : back.shape[2]] * back)
  np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-4)


def test_channel_condition():
  b, h, w, c, e = 3, 5, 4, 2, 5
  x = _rand((b, h, w, c), 13)
  emb = _rand((b, e), 14)
  kern = _rand((e, h * w), 15)
  bias = _rand((h * w,), 16)
  got = np.asarray(ops.channel_condition(x, emb, kern, bias))
  assert got.shape == (b, h, w, c + 1)
  np.testing.assert_array_equal(got[..., :c], x)
  for n in range(b):
    for i in range(h):
      for j in range(w):
        want = np.tanh(
            sum(emb[n, q] * kern[q, i * w + j] for q in range(e))
            + bias[i * w + j]
        )
        np.testing.assert_allclose(got[n, i, j, c], want, rtol=1e-5, atol=1e-6)
  check_grads(
      lambda a, bb: ops.channel_condition(a, bb, kern, bias),
      (jnp.asarray(x), jnp.asarray(emb)),
      order=1,
      modes=("rev",),
      eps=1e-3,
      atol=1e-2,
      rtol=1e-2,
  )


def test_bad_shapes_are_named():
  x = jnp.zeros((2, 5, 5, 3))
  with pytest.raises(ValueError, match="agree in batch"):
    ops.per_sample_depthwise_correlation(x, jnp.zeros((2, 3, 3, 4)), 1, 0)
  with pytest.raises(ValueError, match="rank 4"):
    ops.per_sample_depthwise_transposed_correlation(
        jnp.zeros((5, 5, 3)), jnp.zeros((2, 3, 3, 3)), 1, 0
    )
  with pytest.raises(ValueError, match="H\\*W"):
    ops.channel_condition(
        x, jnp.zeros((2, 5)), jnp.zeros((5, 24)), jnp.zeros((24,))
    )


# Every formulation in every pass position, twice: the three uniform plans
# and the three cyclic mixtures (the passes are independent code paths, so
# this covers what all 27 combinations would).
_F = cpu_conv.FORMULATIONS
PLANS_UNDER_TEST = [(f, f, f) for f in _F] + [
    (_F[i], _F[(i + 1) % 3], _F[(i + 2) % 3]) for i in range(3)
]


def _needs_native(plan):
  if "native" in plan and not native_conv.available():
    pytest.skip(
        f"native kernels unavailable: " f"{native_conv.unavailable_reason()}"
    )


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]])
@pytest.mark.parametrize("plan", PLANS_UNDER_TEST)
@pytest.mark.parametrize("transposed", [False, True])
def test_every_cpu_plan_matches_the_reference(case, plan, transposed):
  """Each CPU formulation of each pass (forward, dx, dk): values and both
  gradients equal the lax reference's."""
  b, h, w, c, k, s, p = case
  if transposed and p > k - 1:
    pytest.skip("padding must be smaller than the kernel for a transpose")
  _needs_native(plan)
  fast = cpu_conv.conv_transpose2d_cpu if transposed else cpu_conv.conv2d_cpu
  reference = (
      ops.conv_transpose2d_reference if transposed else ops.conv2d_reference
  )
  x = jnp.asarray(_rand((b, h, w, c), 17))
  kern = jnp.asarray(_rand((k, k, c, 3), 18))
  y = fast(x, kern, s, p, plan)
  np.testing.assert_allclose(
      np.asarray(y), np.asarray(reference(x, kern, s, p)), rtol=1e-5, atol=1e-5
  )
  g = jnp.asarray(_rand(y.shape, 19))
  _assert_same_gradients(
      lambda a, bb: fast(a, bb, s, p, plan),
      lambda a, bb: reference(a, bb, s, p),
      x,
      kern,
      g,
  )


def test_bad_cpu_plan_is_named():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match="plan"):
    cpu_conv.conv2d_cpu(
        x, jnp.zeros((2, 2, 1, 1)), 1, 0, ("xla", "fast", "xla")
    )


def test_native_kernels_build_where_a_compiler_is():
  """Where a C++ compiler exists (this project's machines and CI), the
  native kernels must build: a silent fallback would hide a 1.5x slowdown."""
  import shutil  # pylint: disable=g-import-not-at-top

  if not shutil.which("c++") and not shutil.which("g++"):
    pytest.skip("no C++ compiler on this machine")
  assert native_conv.available(), native_conv.unavailable_reason()
  assert cpu_conv.cpu_plan(False, (1, 14, 14, 33), (4, 4, 33, 64), 2, 1) == (
      "native",
      "native",
      "native",
  )
  with native_conv.disabled():
    assert "native" not in cpu_conv.cpu_plan(
        False, (1, 14, 14, 33), (4, 4, 33, 64), 2, 1
    )
  assert native_conv.available()
  # The kernels are float32 only: other precisions stay in XLA.
  for dtype in (jnp.bfloat16, np.float64):
    assert "native" not in cpu_conv.cpu_plan(
        True, (1, 7, 7, 65), (4, 4, 65, 32), 2, 1, dtype
    )


@pytest.mark.parametrize(
    "layer",
    [
        # CIGN layers at a batch that spans several chunks and row blocks:
        # (batch, H, C_in, k, s, p, C_out, transposed)
        (40, 14, 33, 4, 2, 1, 64, False),  # discriminator block 2
        (24, 4, 129, 4, 2, 1, 256, False),  # discriminator block 4 (K = 2064)
        (24, 7, 65, 4, 2, 1, 32, True),  # generator block 4
        (24, 2, 257, 4, 2, 1, 128, True),  # generator block 2
    ],
)
def test_native_kernels_on_cign_layers(layer):
  """The blocked, chunked native passes at CIGN's sizes against the lax
  reference (values and both gradients)."""
  _needs_native(("native",))
  b, h, c, k, s, p, o, transposed = layer
  fast = cpu_conv.conv_transpose2d_cpu if transposed else cpu_conv.conv2d_cpu
  reference = (
      ops.conv_transpose2d_reference if transposed else ops.conv2d_reference
  )
  x = jnp.asarray(_rand((b, h, h, c), 20))
  kern = jnp.asarray(_rand((k, k, c, o), 21) * 0.1)
  plan = ("native",) * 3
  y = fast(x, kern, s, p, plan)
  want = reference(x, kern, s, p)
  np.testing.assert_allclose(
      np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-4
  )
  g = jnp.asarray(_rand(y.shape, 22))
  _assert_same_gradients(
      lambda a, bb: fast(a, bb, s, p, plan),
      lambda a, bb: reference(a, bb, s, p),
      x,
      kern,
      g,
      relative=True,
  )


def test_native_kernels_name_bad_geometry():
  """The C++ side checks shapes it is handed and says what is wrong."""
  _needs_native(("native",))
  g = jnp.zeros((2, 3, 3, 4))
  kern = jnp.zeros((4, 4, 2, 4))
  # A 4x4 stride-2 conv of a 9x9 input gives 4x4, not 3x3.
  with pytest.raises(Exception, match="does not match input 9x9"):
    jax.block_until_ready(native_conv.conv_input_grad(g, kern, 2, 1, (9, 9)))


def test_native_kernels_under_vmap():
  """A mapped axis over the public ops (as a user's jax.vmap of the model
  makes) runs the kernels once per element: values and gradients as the
  reference's."""
  _needs_native(("native",))
  x = jnp.asarray(_rand((3, 2, 6, 6, 4), 23))
  kern = jnp.asarray(_rand((4, 4, 4, 5), 24))
  for fn, reference in (
      (ops.conv2d, ops.conv2d_reference),
      (ops.conv_transpose2d, ops.conv_transpose2d_reference),
  ):
    got = jax.vmap(lambda a, f=fn: f(a, kern, 2, 1))(x)
    want = jax.vmap(lambda a, r=reference: r(a, kern, 2, 1))(x)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5
    )
    g = jax.grad(
        lambda k, f=fn: jnp.sum(jnp.sin(jax.vmap(lambda a: f(a, k, 2, 1))(x)))
    )(kern)
    g_ref = jax.grad(
        lambda k, r=reference: jnp.sum(
            jnp.sin(jax.vmap(lambda a: r(a, k, 2, 1))(x))
        )
    )(kern)
    np.testing.assert_allclose(
        np.asarray(g), np.asarray(g_ref), rtol=1e-4, atol=1e-4
    )
