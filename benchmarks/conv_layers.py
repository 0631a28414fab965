"""Per-layer cost of the shared-kernel convolutions: ours vs space-to-depth.

  python benchmarks/conv_layers.py [--batch_size=1152]

For the eight stride-2 layers of channel_small (shapes at the mismatch
group's batch of 1152, channel-conditioned inputs with C+1 channels), times
forward and forward + both gradients of `ops.conv2d` / `ops.conv_transpose2d`
(what the models use) and of the space-to-depth formulation (every stride-2
conv as a stride-1 XLA conv on a (H/2, W/2, 4C) input, transposed convs as
its adjoint, gradients by autodiff), and prints their largest relative
difference. Median of 5 runs after compilation, ms.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax import lax  # pylint: disable=g-import-not-at-top

from cign_jax import ops  # pylint: disable=g-import-not-at-top


def bench(f, *a, n=5):
  f = jax.jit(f)
  r = f(*a)
  jax.block_until_ready(r)
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*a))
    ts.append(time.perf_counter() - t)
  return np.median(ts) * 1e3, r


def space_to_depth_conv2d(x, kernel, stride, padding):
  """conv2d as a stride-1 VALID conv on the space-to-depth input."""
  if stride == 1:
    return ops.conv2d_reference(x, kernel, 1, padding)
  assert stride == 2, stride
  b, h, w, c = x.shape
  k, o = kernel.shape[0], kernel.shape[3]
  out_h = (h + 2 * padding - k) // 2 + 1
  out_w = (w + 2 * padding - k) // 2 + 1
  hp, wp = h + 2 * padding, w + 2 * padding
  hp, wp = hp + hp % 2, wp + wp % 2  # even, so the 2x2 blocks tile it
  xp = jnp.pad(
      x,
      (
          (0, 0),
          (padding, hp - h - padding),
          (padding, wp - w - padding),
          (0, 0),
      ),
  )
  xs = xp.reshape(b, hp // 2, 2, wp // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  xs = xs.reshape(b, hp // 2, wp // 2, 4 * c)
  ke = k + k % 2
  kp = jnp.pad(kernel, ((0, ke - k), (0, ke - k), (0, 0), (0, 0)))
  ks = kp.reshape(ke // 2, 2, ke // 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
  ks = ks.reshape(ke // 2, ke // 2, 4 * c, o)
  y = lax.conv_general_dilated(
      xs, ks, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return y[:, :out_h, :out_w]


def space_to_depth_conv_transpose2d(x, kernel, stride, padding):
  """conv_transpose2d as the adjoint (VJP) of `space_to_depth_conv2d`."""
  if stride == 1:
    return ops.conv_transpose2d_reference(x, kernel, 1, padding)
  b, h, w, _ = x.shape
  k, co = kernel.shape[0], kernel.shape[3]
  out_h = (h - 1) * stride - 2 * padding + k
  out_w = (w - 1) * stride - 2 * padding + k
  z = jnp.zeros((b, out_h, out_w, co), x.dtype)
  _, vjp = jax.vjp(
      lambda z: space_to_depth_conv2d(
          z, kernel.transpose(0, 1, 3, 2), stride, padding
      ),
      z,
  )
  return vjp(x)[0]


# channel_small's stride-2 layers: name, H, C_in (+1 label channel), k, s, p,
# C_out, transposed.
LAYERS = (
    ("disc_2", 14, 33, 4, 2, 1, 64, False),
    ("disc_3", 7, 65, 3, 2, 1, 128, False),
    ("disc_4", 4, 129, 4, 2, 1, 256, False),
    ("disc_1", 28, 2, 4, 2, 1, 32, False),
    ("gen_2", 2, 257, 4, 2, 1, 128, True),
    ("gen_3", 4, 129, 3, 2, 1, 64, True),
    ("gen_4", 7, 65, 4, 2, 1, 32, True),
    ("gen_5", 14, 33, 4, 2, 1, 1, True),
)


def rel_diff(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=1152)
  args = parser.parse_args()
  print(f"# python benchmarks/conv_layers.py --batch_size={args.batch_size}")
  print(f"# jax {jax.__version__} on {jax.default_backend()}")
  rs = np.random.RandomState(0)
  total = {"ours": 0.0, "space_to_depth": 0.0}
  for name, h, c, k, s, p, o, transposed in LAYERS:
    x = jnp.asarray(rs.randn(args.batch_size, h, h, c).astype(np.float32))
    kernel = jnp.asarray(rs.randn(k, k, c, o).astype(np.float32) * 0.1)
    impls = {
        "ours": ops.conv_transpose2d if transposed else ops.conv2d,
        "space_to_depth": (
            space_to_depth_conv_transpose2d
            if transposed
            else space_to_depth_conv2d
        ),
    }
    grads = {}
    for impl, fn in impls.items():

      def loss(x, kernel, fn=fn):
        y = fn(x, kernel, s, p)
        return jnp.sum(y * jnp.cos(y))

      fwd_ms, _ = bench(lambda x, kernel, fn=fn: fn(x, kernel, s, p), x, kernel)
      both_ms, grads[impl] = bench(jax.grad(loss, argnums=(0, 1)), x, kernel)
      total[impl] += both_ms
      print(
          f"{name:7s} {impl:15s} fwd {fwd_ms:8.1f} ms   fwd+grads "
          f"{both_ms:8.1f} ms"
      )
    dx = rel_diff(grads["space_to_depth"][0], grads["ours"][0])
    dk = rel_diff(grads["space_to_depth"][1], grads["ours"][1])
    print(f"        relative difference: dx {dx:.1e}, dkernel {dk:.1e}")
  print(
      f"total fwd+grads: ours {total['ours']:.0f} ms, space-to-depth "
      f"{total['space_to_depth']:.0f} ms"
  )


if __name__ == "__main__":
  main()
