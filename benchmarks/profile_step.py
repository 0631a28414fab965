"""Where the time of one CIGN train step goes, per XLA operation (CPU or GPU).

  python benchmarks/profile_step.py --config=configs/channel_small.py [--steps=2] [--top=30]

  python benchmarks/profile_step.py --config=configs/channel_small.py \
      --passes=batched --channel_conv=per_class   # the GPU levers

Runs the jitted train step of a config at its real batch size on random
inputs under `jax.profiler.trace`, then reads the trace's XPlane with
`jax.profiler.ProfileData` (no TensorFlow needed, so it runs on a bare GPU
machine) and prints the XLA operations (thunks on CPU, kernels on a GPU) that
took the most time, summed over the profiled steps and divided by their
number, by kind and one by one, with the number of launches per step.
The fused-computation names (`fusion.12`, `dot.3`, `custom-call...`) are those
of the optimised HLO: `--dump_hlo=DIR` writes it there to look them up.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# benchmarks/config_overrides.py, beside this script
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import config_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position


def read_xplane_events(trace_dir):
  """{(plane, line, event name): (total ns, count)} over the trace's XPlanes."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top

  files = glob.glob(
      os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True
  )
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  totals = collections.Counter()
  counts = collections.Counter()
  for path in files:
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          key = (plane.name, line.name, event.name)
          totals[key] += event.duration_ns
          counts[key] += 1
  return totals, counts


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=0)
  parser.add_argument(
      "--passes", default="", help="config.loss.passes (sequential, batched)"
  )
  parser.add_argument(
      "--channel_conv",
      default="",
      help="config.model.channel_conv (concat, per_class)",
  )
  parser.add_argument("--dump_hlo", default="")
  args = parser.parse_args()
  if args.dump_hlo:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump_hlo}"
        " --xla_dump_hlo_as_text"
    )

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(args.config)
  given = config_overrides.apply(config, args)
  config = config_lib.validate(config)
  b = config.batch_size
  rs = np.random.RandomState(0)
  x = jax.device_put(rs.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32))
  c = jax.device_put(rs.randint(0, 10, (b,)).astype(np.int32))
  state = ts.create_train_state(config)
  step = jax.jit(ts.make_train_step(config), donate_argnums=(0,))
  key = jax.random.key(0)
  state, m = step(state, x, c, key)  # compile and warm up
  jax.block_until_ready(m)

  trace_dir = tempfile.mkdtemp(prefix="cign_profile_")
  t0 = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for i in range(args.steps):
      state, m = step(state, x, c, jax.random.fold_in(key, i + 1))
      jax.block_until_ready(m)
  wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
  totals, counts = read_xplane_events(trace_dir)

  flags = config_overrides.command_line(given)
  print(
      f"# python benchmarks/profile_step.py --config={args.config} "
      f"--steps={args.steps}{flags}"
  )
  print(
      f"# jax {jax.__version__} on {jax.default_backend()}; batch {b}; "
      f"{wall_ms:.1f} ms per step under the profiler; trace in {trace_dir}"
  )
  # The device's operations: on a GPU the kernels of its stream lines; on a
  # CPU the thunks of the worker threads (which run concurrently, so these
  # are CPU-time shares, not wall-clock). Skipped: the Python host threads,
  # the executor's own spans and the per-module spans on a GPU.
  gpu = any(plane.startswith("/device:GPU") for plane, _, _ in totals)
  by_op, launches = collections.Counter(), collections.Counter()
  by_kind = collections.Counter()
  for (plane, line, name), ns in totals.items():
    if gpu and (
        not plane.startswith("/device:GPU")
        or line.startswith("XLA Modules")
        or line.startswith("XLA Ops")
    ):
      continue
    if not gpu and (
        line.startswith("python") or name.startswith("ThunkExecutor")
    ):
      continue
    by_op[name] += ns
    launches[name] += counts[(plane, line, name)]
    by_kind[re.sub(r"\.\d+$", "", name)] += ns
  total = sum(by_op.values())
  if not total:
    raise RuntimeError(f"no device operations in the trace {trace_dir}")
  print(
      f"# {total / 1e6 / args.steps:.2f} ms of operation time per step, "
      f"{sum(launches.values()) / args.steps:.0f} operations per step"
  )
  print("## by kind")
  for name, ns in by_kind.most_common(args.top):
    print(f"{ns / 1e6 / args.steps:9.3f} ms {100 * ns / total:5.1f}%  {name}")
  print("## by operation (ms per step, % of operation time, launches per step)")
  for name, ns in by_op.most_common(args.top):
    print(
        f"{ns / 1e6 / args.steps:9.3f} ms {100 * ns / total:5.1f}% "
        f"x{launches[name] / args.steps:<4.0f} {name[:120]}"
    )


if __name__ == "__main__":
  main()
