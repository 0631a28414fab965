"""Per-layer cost of each pass of the shared-kernel convolutions, by formulation.

  python benchmarks/conv_components.py [--config=channel_small] [--batch_size=1152]

For every conv layer of a channel-conditioned config (shapes at the mismatch
group's batch, C+1 input channels), times each of the three passes
(forward, input gradient dx, kernel gradient dk) in each formulation:

  xla      lax.conv_general_dilated and its autodiff (what GPUs run)
  matmul   im2col by strided slices + one matrix product (conv forward,
           transposed-conv dx, both dk), or one matrix product + sub-pixel
           col2im (conv dx, transposed-conv forward)

and prints the faster one per pass, so that `cign_jax.ops`' CPU choice per
pass can be checked against numbers. Median of 5 runs after compilation, ms.
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
  return float(np.median(ts) * 1e3), r


def layers(ld: int, idim: int):
  """(name, H_in, C_in incl. the label channel, k, s, p, C_out, transposed)."""
  return (("disc_1", 28, 2, 4, 2, 1, ld, False),
          ("disc_2", 14, ld + 1, 4, 2, 1, 2 * ld, False),
          ("disc_3", 7, 2 * ld + 1, 3, 2, 1, 4 * ld, False),
          ("disc_4", 4, 4 * ld + 1, 4, 2, 1, 8 * ld, False),
          ("disc_5", 2, 8 * ld + 1, 2, 1, 0, idim, False),
          ("gen_1", 1, idim + 1, 2, 1, 0, 8 * ld, True),
          ("gen_2", 2, 8 * ld + 1, 4, 2, 1, 4 * ld, True),
          ("gen_3", 4, 4 * ld + 1, 3, 2, 1, 2 * ld, True),
          ("gen_4", 7, 2 * ld + 1, 4, 2, 1, ld, True),
          ("gen_5", 14, ld + 1, 4, 2, 1, 1, True))


CONFIGS = {"channel_small": (32, 128), "channel_large": (64, 128)}


def passes(transposed: bool, s: int, p: int, x, kernel):
  """{pass: {formulation: fn()}} for one layer."""
  ref = ops.conv_transpose2d_reference if transposed else ops.conv2d_reference
  y = ref(x, kernel, s, p)
  g = jnp.cos(y)
  kh, kw, ci, co = kernel.shape

  def xla_vjp(which):
    def fn(x, kernel, g):
      _, vjp = jax.vjp(lambda a, b: ref(a, b, s, p), x, kernel)
      return vjp(g)[which]
    return fn

  def im2col_dk(a, b):  # dk[tap, c, o] = sum patches(a)[.., tap c] b[.., o]
    patches = ops._im2col(a, kh, kw, s, p)  # pylint: disable=protected-access
    return jnp.einsum("bhwk,bhwo->ko", patches, b)

  if not transposed:
    table = {
        "fwd": {"xla": lambda x, k, g: ref(x, k, s, p),
                "matmul": lambda x, k, g: ops.conv2d_im2col(x, k, s, p)},
        "dx": {"xla": xla_vjp(0),
               "matmul": lambda x, k, g: ops.conv_transpose2d_col2im(
                   g, k.transpose(0, 1, 3, 2), s, p)},
        "dk": {"xla": xla_vjp(1),
               "matmul": lambda x, k, g: im2col_dk(x, g)},
    }
  else:
    h, w = x.shape[1], x.shape[2]
    table = {
        "fwd": {"xla": lambda x, k, g: ref(x, k, s, p),
                "matmul": lambda x, k, g: ops.conv_transpose2d_col2im(
                    x, k, s, p)},
        "dx": {"xla": xla_vjp(0),
               "matmul": lambda x, k, g: ops.conv2d_im2col(
                   g, k.transpose(0, 1, 3, 2), s, p)},
        "dk": {"xla": xla_vjp(1),
               "matmul": lambda x, k, g: jnp.einsum(
                   "bhwc,bhwk->ck", x,
                   ops._im2col(g, kh, kw, s, p)[:, :h, :w]).reshape(  # pylint: disable=protected-access
                       ci, kh, kw, co).transpose(1, 2, 0, 3)},
    }
  return table, g


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="channel_small",
                      choices=sorted(CONFIGS))
  parser.add_argument("--batch_size", type=int, default=1152)
  args = parser.parse_args()
  print(f"# python benchmarks/conv_components.py --config={args.config} "
        f"--batch_size={args.batch_size}")
  print(f"# jax {jax.__version__} on {jax.default_backend()}")
  rs = np.random.RandomState(0)
  best_total = {"fwd": 0.0, "dx": 0.0, "dk": 0.0}
  for name, h, c, k, s, p, o, transposed in layers(*CONFIGS[args.config]):
    x = jnp.asarray(rs.randn(args.batch_size, h, h, c).astype(np.float32))
    kernel = jnp.asarray(rs.randn(k, k, c, o).astype(np.float32) * 0.1)
    table, g = passes(transposed, s, p, x, kernel)
    cells = []
    for pass_name, impls in table.items():
      times = {}
      results = {}
      for impl, fn in impls.items():
        times[impl], results[impl] = bench(fn, x, kernel, g)
      a, b = results["xla"], results["matmul"]
      b = b.reshape(a.shape)
      err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
      if err > 1e-4:
        raise AssertionError(f"{name} {pass_name}: formulations differ by "
                             f"{err:.1e}")
      best = min(times, key=times.get)
      best_total[pass_name] += times[best]
      cells.append(f"{pass_name} xla {times['xla']:7.1f} matmul "
                   f"{times['matmul']:7.1f} -> {best:6s}")
    print(f"{name:7s} " + " | ".join(cells), flush=True)
  print("sum of the faster per pass (ms): " +
        ", ".join(f"{k} {v:.0f}" for k, v in best_total.items()))


if __name__ == "__main__":
  main()
