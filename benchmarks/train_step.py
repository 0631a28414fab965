"""Times the jitted CIGN train step against PyTorch, in one process.

  python benchmarks/train_step.py --config=configs/channel_small.py
  python benchmarks/train_step.py --all [--steps=5] [--no_torch]
  python benchmarks/train_step.py --config=configs/channel_small.py --batch_size=32
  python benchmarks/train_step.py --all --forward_only   # sampling images/s

For each config: compile time, then `--steps` steps of ours and of our
PyTorch port of the same step (`tests/torch_reference.py`), alternating,
at the config's real batch size on random inputs; median and spread (min,
max) in ms, images/s (real images, and images through the loss: 11 per real
image with 9 mismatched labels), the process's peak resident memory, and the
ratios against our PyTorch port and against the original's figures measured
on the 2-core CPU class (`reference/baseline.md`). Ends each config with one
line `config=<name> ms_per_step=<median>`.

PyTorch's OpenMP threads spin after each of its steps and slowed our
alternating steps by up to 45% on 2 cores; unless set, OMP_WAIT_POLICY is
PASSIVE here (PyTorch's own step time did not change with it:
docs/performance.md). Compare our figures with the original's from a
`--no_torch` run.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# The PyTorch port of the step (a test oracle) lives with the tests.
sys.path.insert(0, os.path.join(ROOT, "tests"))
# Before torch (and its OpenMP runtime) loads; see the module docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The original PyTorch code on the 2-core CPU class, ms per step
# (reference/baseline.md, PyTorch 2.13.0, 2 threads).
ORIGINAL_MS = {"channel_small": 3532, "channel_large": 11637,
               "filter_small": 4946, "filter_large": 9314}
PAPER_CONFIGS = ("channel_small", "channel_large", "filter_small",
                 "filter_large")


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spread(times_ms):
  return (f"median {statistics.median(times_ms):.0f} ms "
          f"(min {min(times_ms):.0f}, max {max(times_ms):.0f}, "
          f"n={len(times_ms)})")


def bench_train(name, config, steps, use_torch):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  b = config.batch_size
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32)
  c = rs.randint(0, 10, (b,)).astype(np.int32)
  state = ts.create_train_state(config)
  step = jax.jit(ts.make_train_step(config), donate_argnums=(0,))
  key = jax.random.key(0)
  xj, cj = jax.device_put(x), jax.device_put(c)
  t0 = time.perf_counter()
  compiled = step.lower(state, xj, cj, key).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, xj, cj, key)  # warm-up
  jax.block_until_ready(m)
  rss_jax = peak_rss_mib()

  torch_step = None
  if use_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import torch_reference as tr  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(os.cpu_count() or 1)
      torch.manual_seed(0)
      model = tr.CIGNTorch(config.model.conditioning, config.model.latent_dim,
                           config.model.intermediate_dim,
                           config.model.embedding_dim,
                           config.model.dropout_rate)
      l = config.loss
      torch_step = tr.TorchTrainStep(
          model, config.optimizer.learning_rate, l.rec_weight,
          l.idem_noise_weight, l.tight_noise_weight, l.idem_mismatch_weight,
          l.tight_mismatch_weight)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      ct = torch.from_numpy(c.astype(np.int64))
      torch_step.step(xt, ct)  # warm-up
    except ImportError:
      print("  PyTorch not installed: skipping the PyTorch port "
            "(pip install torch==2.13.0)")
      torch_step = None

  ours, theirs = [], []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, xj, cj, key)
    jax.block_until_ready(m)
    ours.append(1000 * (time.perf_counter() - t))
    if torch_step is not None:
      t = time.perf_counter()
      torch_step.step(xt, ct)
      theirs.append(1000 * (time.perf_counter() - t))

  med = statistics.median(ours)
  through_loss = b * (2 + config.loss.num_mismatch_labels)
  print(f"{name}: batch {b} real images ({through_loss} through the loss)")
  print(f"  compile {compile_s:.1f} s")
  print(f"  ours (JAX):      {spread(ours)}; {1000 * b / med:.1f} real "
        f"images/s, {1000 * through_loss / med:.0f} images/s through the "
        f"loss; peak RSS {rss_jax:.0f} MiB")
  if theirs:
    tmed = statistics.median(theirs)
    print(f"  our PyTorch port: {spread(theirs)}; {1000 * b / tmed:.1f} real "
          f"images/s; speed-up {tmed / med:.2f}x")
  if name in ORIGINAL_MS and b == {"channel_small": 128, "channel_large": 128,
                                   "filter_small": 64,
                                   "filter_large": 64}[name]:
    print(f"  original (reference/baseline.md): {ORIGINAL_MS[name]} ms; "
          f"speed-up {ORIGINAL_MS[name] / med:.2f}x")
  print(f"config={name} ms_per_step={med:.0f}")
  return med


def bench_forward(name, config, steps, batch=1000):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from cign_jax import models  # pylint: disable=g-import-not-at-top

  model = models.model_from_config(config)
  variables = models.init_variables(model, jax.random.key(0))
  z = jax.random.normal(jax.random.key(1), (batch, 28, 28, 1))
  c = jnp.arange(batch) % 10
  f = jax.jit(lambda v, x, y: model.apply(v, x, y, train=False))
  t0 = time.perf_counter()
  jax.block_until_ready(f(variables, z, c))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(f(variables, z, c))
    times.append(1000 * (time.perf_counter() - t))
  med = statistics.median(times)
  print(f"{name}: sampling f(z, c) at batch {batch}: {spread(times)}; "
        f"{1000 * batch / med:.0f} images/s (compile {compile_s:.1f} s)")
  print(f"config={name} ms_per_forward={med:.0f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", help="a config file")
  parser.add_argument("--all", action="store_true",
                      help="the paper's four configs")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=0,
                      help="override the config's batch size")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--forward_only", action="store_true",
                      help="time sampling f(z, c) at batch 1000 instead")
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  paths = ([os.path.join(ROOT, "configs", f"{n}.py") for n in PAPER_CONFIGS]
           if args.all else [args.config])
  if not paths or paths[0] is None:
    parser.error("give --config=PATH or --all")
  print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
  print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}")
  if jax.default_backend() == "cpu":
    from cign_jax.kernels import native_conv  # pylint: disable=g-import-not-at-top
    print("# CPU convolutions: " + (
        "C++ kernels (cign_jax.kernels.native_conv)" if native_conv.available() else
        f"XLA formulations ({native_conv.unavailable_reason()})"))
  for path in paths:
    config = config_lib.load_config_file(path)
    if args.batch_size:
      config.batch_size = args.batch_size
    name = os.path.splitext(os.path.basename(path))[0]
    if args.forward_only:
      bench_forward(name, config, args.steps)
    else:
      bench_train(name, config, args.steps, use_torch=not args.no_torch)


if __name__ == "__main__":
  main()
