"""Times the jitted train step of the networks for other image sizes.

  python benchmarks/image_sizes.py [--steps=5] [--batch_size=N]

For each setting (CIGN channel at 32x32x3 as configs/cifar10.py has it,
CIGN channel at 64x64x3 with the same widths, and the IGN paper's CelebA
DCGAN at 64x64x3, configs/ign_celeba64.py): the parameter count, the
compile time, then `--steps` steps on random images at the config's batch
size (or --batch_size), their median and range in ms, and real images per
second. The shape and class count a training takes from its data are set
here (RGB, ten classes). Ends each setting with one line
`setting=<name> ms_per_step=<median>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cign_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from cign_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def _settings():
  def cifar(size):
    config = config_lib.load_config_file(
        os.path.join(ROOT, "configs", "cifar10.py")
    )
    config.model.image_size = size
    config.model.image_channels = 3
    config.model.num_classes = 10
    return config

  celeba = config_lib.load_config_file(
      os.path.join(ROOT, "configs", "ign_celeba64.py")
  )
  return {"cign_channel_32": cifar(32), "cign_channel_64": cifar(64),
          "ign_celeba_dcgan_64": celeba}  # fmt: skip


def time_setting(name, config, steps):
  config = config_lib.validate(config)
  state = train_step_lib.create_train_state(config)
  step = jax.jit(train_step_lib.make_train_step(config))
  size, channels = config.model.image_size, config.model.image_channels
  b = config.batch_size
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (b, size, size, channels)).astype(np.float32)
  c = (np.arange(b) % config.model.num_classes).astype(np.int32)
  key = jax.random.key(0)
  t = time.perf_counter()
  state, metrics = step(state, x, c, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = step(state, x, c, key)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) * 1000)
  median = statistics.median(times)
  print(
      f"{name}: {models.count_parameters(state.params):,} parameters, batch "
      f"{b}, {size}x{size}x{channels}; compile + first step {compile_s:.1f} "
      f"s; step median {median:.1f} ms (min {min(times):.1f}, max "
      f"{max(times):.1f}), {b / median * 1000:.1f} real images/s"
  )
  print(f"setting={name} ms_per_step={median:.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=0)
  parser.add_argument("--only", default="", help="one setting's name")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPUs")  # fmt: skip
  for name, config in _settings().items():
    if args.only and name != args.only:
      continue
    if args.batch_size:
      config.batch_size = args.batch_size
    time_setting(name, config, args.steps)


if __name__ == "__main__":
  main()
