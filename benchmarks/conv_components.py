"""Per-layer cost of each pass of the shared-kernel convolutions, by formulation.

  python benchmarks/conv_components.py [--config=channel_small] [--batch_size=1152]

For every conv layer of a channel-conditioned config (shapes at the mismatch
group's batch, C+1 input channels), times each of the three passes
(forward, input gradient dx, kernel gradient dk) in each formulation:

  xla      lax.conv_general_dilated and its autodiff (what GPUs run)
  matmul   im2col by strided slices + one matrix product (conv forward,
           transposed-conv dx, both dk), or one matrix product + sub-pixel
           col2im (conv dx, transposed-conv forward)
  native   the same products, patches built in cache-sized blocks by the
           C++ kernels of `cign_jax.kernels.native_conv` (when they build here)

and prints the fastest per pass, so that `cign_jax.ops`' CPU choice per
pass can be checked against numbers. Median of 5 runs after compilation, ms.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cign_jax import ops  # pylint: disable=g-import-not-at-top
from cign_jax.kernels import cpu_conv  # pylint: disable=g-import-not-at-top
from cign_jax.kernels import native_conv  # pylint: disable=g-import-not-at-top
from conv_layers import bench  # pylint: disable=g-import-not-at-top  # this folder's timer


def layers(ld: int, idim: int):
  """(name, H_in, C_in incl. the label channel, k, s, p, C_out, transposed)."""
  return (
      ("disc_1", 28, 2, 4, 2, 1, ld, False),
      ("disc_2", 14, ld + 1, 4, 2, 1, 2 * ld, False),
      ("disc_3", 7, 2 * ld + 1, 3, 2, 1, 4 * ld, False),
      ("disc_4", 4, 4 * ld + 1, 4, 2, 1, 8 * ld, False),
      ("disc_5", 2, 8 * ld + 1, 2, 1, 0, idim, False),
      ("gen_1", 1, idim + 1, 2, 1, 0, 8 * ld, True),
      ("gen_2", 2, 8 * ld + 1, 4, 2, 1, 4 * ld, True),
      ("gen_3", 4, 4 * ld + 1, 3, 2, 1, 2 * ld, True),
      ("gen_4", 7, 2 * ld + 1, 4, 2, 1, ld, True),
      ("gen_5", 14, ld + 1, 4, 2, 1, 1, True),
  )


CONFIGS = {"channel_small": (32, 128), "channel_large": (64, 128)}


def passes(transposed: bool, s: int, p: int, x, kernel):
  """{pass: {formulation: fn(x, kernel, g)}} for one layer: the CPU ops of
  `cign_jax.ops` with that pass's formulation set in their plan (a gradient
  alone is timed as the VJP in one argument: the forward value is unused,
  so XLA drops it)."""
  op = cpu_conv.conv_transpose2d_cpu if transposed else cpu_conv.conv2d_cpu
  ref = ops.conv_transpose2d_reference if transposed else ops.conv2d_reference
  g = jnp.cos(ref(x, kernel, s, p))

  def forward(form):
    return lambda x, k, g: op(x, k, s, p, (form, "matmul", "matmul"))

  def gradient(which, form):
    plan = (
        ("matmul", form, "matmul") if which == 0 else ("matmul", "matmul", form)
    )

    def fn(x, k, g):
      return jax.grad(
          lambda a, b: jnp.sum(op(a, b, s, p, plan) * g), argnums=which
      )(x, k)

    return fn

  forms = [
      f
      for f in cpu_conv.FORMULATIONS
      if f != "native" or native_conv.available()
  ]
  table = {
      "fwd": {f: forward(f) for f in forms},
      "dx": {f: gradient(0, f) for f in forms},
      "dk": {f: gradient(1, f) for f in forms},
  }
  return table, g


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--config", default="channel_small", choices=sorted(CONFIGS)
  )
  parser.add_argument("--batch_size", type=int, default=1152)
  args = parser.parse_args()
  print(
      f"# python benchmarks/conv_components.py --config={args.config} "
      f"--batch_size={args.batch_size}"
  )
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
      a = results["xla"]
      for impl, b in results.items():
        err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        if err > 1e-4:
          raise AssertionError(
              f"{name} {pass_name}: {impl} differs from xla " f"by {err:.1e}"
          )
      best = min(times, key=times.get)
      best_total[pass_name] += times[best]
      cells.append(
          f"{pass_name} "
          + " ".join(f"{impl} {t:6.1f}" for impl, t in times.items())
          + f" -> {best}"
      )
    print(f"{name:7s} " + " | ".join(cells), flush=True)
  print(
      "sum of the fastest per pass (ms): "
      + ", ".join(f"{k} {v:.0f}" for k, v in best_total.items())
  )


if __name__ == "__main__":
  main()
