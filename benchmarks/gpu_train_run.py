"""A timed training run from MNIST in an .npz, for a machine without
tensorflow / tensorflow-datasets (the lent GPU machine).

  python benchmarks/gpu_train_run.py --npz=.gpu/mnist.npz \
      --config=configs/channel_small.py --workdir=/tmp/run [--epochs=50] \
      [--max_seconds=240] [--num_train_steps=N] [--compilation_cache=DIR]

Trains through `cign_jax.train.train_and_evaluate(config, workdir,
dataset=(images, labels))`, the loop of `python -m cign_jax.main`
(checkpoints, sample grids and metrics as configured), and prints the wall
clock of the whole call, compilation included. The .npz holds uint8
`train_images` (N, 28, 28) and `train_labels` (N,).

TensorBoard events are written by `cign_jax.metric_writers` with or without
TensorFlow. With `--max_seconds` the run
stops at that wall clock (SIGALRM) and prints how far it got and the
training loop's own rate; the run's checkpoints stay in --workdir.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class _TimeUp(Exception):
  pass


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--npz", required=True)
  parser.add_argument(
      "--config", default=os.path.join(ROOT, "configs", "channel_small.py")
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--epochs", type=int, default=50)
  parser.add_argument(
      "--num_train_steps",
      type=int,
      default=-1,
      help="> 0: that many steps instead of --epochs",
  )
  parser.add_argument(
      "--max_seconds",
      type=float,
      default=0,
      help="stop after this wall clock (0: no limit)",
  )
  parser.add_argument("--compilation_cache", default="")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      help="config overrides KEY=VALUE (e.g. "
      "compute_dtype=bfloat16, log_every_steps=200)",
  )
  args = parser.parse_args()

  t_process = time.time()
  from absl import logging  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.INFO)
  logging.set_stderrthreshold(logging.INFO)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import utils  # pylint: disable=g-import-not-at-top

  if args.compilation_cache:
    utils.enable_compilation_cache(args.compilation_cache)
  from cign_jax import train  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config_file(args.config)
  config.num_epochs = args.epochs
  config.num_train_steps = args.num_train_steps
  for item in args.set:
    key, _, value = item.partition("=")
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = type(node[last])(value)
  config = config_lib.validate(config)

  with np.load(args.npz) as d:
    images = d["train_images"]
    labels = d["train_labels"].astype(np.int32)
  if images.ndim == 3:
    images = images[..., None]
  print(
      f"# {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
      f"{jax.__version__}; {len(labels)} training images; metric writer: "
      f"{'clu' if importlib.util.find_spec('tensorflow') else 'tensorboard (no TensorFlow)'}",
      flush=True,
  )
  steps_per_epoch = len(labels) // config.batch_size
  total = (
      config.num_train_steps
      if config.num_train_steps > 0
      else config.num_epochs * steps_per_epoch
  )
  print(
      f"# {os.path.basename(args.config)}: {total} steps "
      f"({steps_per_epoch} per epoch), batch {config.batch_size}, "
      f"compute_dtype {config.compute_dtype}, matmul_precision "
      f"{config.matmul_precision}, passes {config.loss.passes}, "
      f"channel_conv {config.model.channel_conv}",
      flush=True,
  )

  def time_up(signum, frame):
    del signum, frame
    raise _TimeUp()

  if args.max_seconds > 0:
    signal.signal(signal.SIGALRM, time_up)
    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)
  t0 = time.time()
  try:
    train.train_and_evaluate(config, args.workdir, dataset=(images, labels))
    signal.setitimer(signal.ITIMER_REAL, 0)
    wall = time.time() - t0
    print(
        f"RESULT train_run finished: {total} steps in {wall:.1f} s wall "
        f"clock (compilation, checkpoints and sample grids included; "
        f"{total * config.batch_size / wall:.0f} images/s overall); "
        f"process {time.time() - t_process:.1f} s",
        flush=True,
    )
  except _TimeUp:
    wall = time.time() - t0
    print(
        f"RESULT train_run stopped at the time limit after {wall:.1f} s "
        f"of {total} steps; see the last 'step N/{total}' line above for "
        f"the steps done, the rate and the ETA",
        flush=True,
    )


if __name__ == "__main__":
  main()
