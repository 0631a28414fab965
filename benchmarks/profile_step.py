"""Where the time of one CIGN train step goes, per XLA operation (CPU or GPU).

  python benchmarks/profile_step.py --config=configs/channel_small.py [--steps=2] [--top=30]

Runs the jitted train step of a config at its real batch size on random
inputs under `jax.profiler.trace`, then reads the trace's XPlane (the
protobuf that TensorBoard's profiler reads; its Python module comes with
tensorflow) and prints the XLA operations (thunks / kernels) that took the
most time, summed over the profiled steps and divided by their number.
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


def read_xplane_events(trace_dir):
  """{(plane, event name): total ps} over every XPlane in the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                    recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  totals = collections.Counter()
  for path in files:
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
      space.ParseFromString(f.read())
    for plane in space.planes:
      names = {k: v.name for k, v in plane.event_metadata.items()}
      for line in plane.lines:
        for event in line.events:
          totals[(plane.name, line.name,
                  names.get(event.metadata_id, "?"))] += event.duration_ps
  return totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--batch_size", type=int, default=0)
  parser.add_argument("--dump_hlo", default="")
  args = parser.parse_args()
  if args.dump_hlo:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_dump_to={args.dump_hlo}"
                               " --xla_dump_hlo_as_text")

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(args.config)
  if args.batch_size:
    config.batch_size = args.batch_size
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
  totals = read_xplane_events(trace_dir)

  print(f"# python benchmarks/profile_step.py --config={args.config} "
        f"--steps={args.steps}" +
        (f" --batch_size={args.batch_size}" if args.batch_size else ""))
  print(f"# jax {jax.__version__} on {jax.default_backend()}; batch {b}; "
        f"{wall_ms:.0f} ms per step under the profiler; trace in {trace_dir}")
  # The per-operation lines: skip the Python host threads' own events.
  # Operations summed over the worker threads (which run concurrently, so
  # these are CPU-time shares, not wall-clock), then by kind (the name
  # without its ".N").
  by_op, by_kind = collections.Counter(), collections.Counter()
  for (_, line, name), ps in totals.items():
    if line.startswith("python") or name.startswith("ThunkExecutor"):
      continue
    by_op[name] += ps
    by_kind[re.sub(r"\.\d+$", "", name)] += ps
  total = sum(by_op.values())
  print(f"# {total / 1e9 / args.steps:.0f} ms of operation time per step "
        "(all threads)")
  print("## by kind")
  for name, ps in by_kind.most_common(args.top):
    print(f"{ps / 1e9 / args.steps:9.1f} ms {100 * ps / total:5.1f}%  {name}")
  print("## by operation")
  for name, ps in by_op.most_common(args.top):
    print(f"{ps / 1e9 / args.steps:9.1f} ms {100 * ps / total:5.1f}%  {name}")


if __name__ == "__main__":
  main()
