"""Counts the operations of the compiled train step: a proxy for the number of
kernel launches on a GPU, measurable without one.

  CIGN_JAX_NATIVE_CONV=0 python benchmarks/hlo_counts.py \
      --config=configs/channel_small.py [--passes=sequential] \
      [--channel_conv=concat] [--batch_size=B]

Compiles the jitted step for the current backend and counts, in the
optimised HLO outside fused computations, the top-level operations by kind:
fusions, convolutions, dots (matrix products), reductions, custom calls
(the C++ convolution kernels on CPU; cuDNN on GPU) and all together. Prints
the compile time too. With CIGN_JAX_NATIVE_CONV=0 the CPU convolutions are
XLA's (convolutions and im2col products), as close as a CPU gets to the
program a GPU runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# benchmarks/config_overrides.py, beside this script
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import config_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\("
)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def count_ops(hlo_text: str) -> collections.Counter:
  """Opcode counts of the instructions outside fused computations."""
  counts = collections.Counter()
  skip = False
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      name = header.group(2)
      skip = "fused" in name or name.startswith("fusion") or ("wrapped" in name)
      continue
    if skip:
      continue
    m = _INSTRUCTION.match(line)
    if m:
      counts[m.group(1)] += 1
  return counts


KINDS = (
    "fusion",
    "convolution",
    "dot",
    "reduce",
    "custom-call",
    "copy",
    "concatenate",
    "slice",
)
IGNORED = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--passes", default="")
  parser.add_argument("--channel_conv", default="")
  parser.add_argument("--batch_size", type=int, default=0)
  parser.add_argument("--dump", default="", help="write the HLO text here")
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(args.config)
  config_overrides.apply(config, args)
  config = config_lib.validate(config)
  b = config.batch_size
  x = np.zeros((b, 28, 28, 1), np.float32)
  c = np.zeros((b,), np.int32)
  state = ts.create_train_state(config)
  step = jax.jit(ts.make_train_step(config), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, x, c, jax.random.key(0))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  text = compiled.as_text()
  if args.dump:
    with open(args.dump, "w") as f:
      f.write(text)
  counts = count_ops(text)
  total = sum(v for k, v in counts.items() if k not in IGNORED)
  name = os.path.splitext(os.path.basename(args.config))[0]
  passes = config_lib.resolve_passes(config.loss.passes)
  channel_conv = config_lib.resolve_channel_conv(config.model.channel_conv)
  print(
      f"{name} batch {b}, passes {passes}, channel_conv {channel_conv}"
      f", {jax.default_backend()}, CIGN_JAX_NATIVE_CONV="
      f"{os.environ.get('CIGN_JAX_NATIVE_CONV', '1')}: lower {t1 - t0:.1f} s,"
      f" compile {t2 - t1:.1f} s"
  )
  print(
      "  "
      + ", ".join(f"{k} {counts.get(k, 0)}" for k in KINDS)
      + f"; all operations {total}; HLO text {len(text) // 1024} KiB"
  )


if __name__ == "__main__":
  main()
