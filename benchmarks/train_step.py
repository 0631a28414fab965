"""Times the jitted CIGN train step against PyTorch, in one process.

  python benchmarks/train_step.py --config=configs/channel_small.py
  python benchmarks/train_step.py --all [--steps=5] [--no_torch]
  python benchmarks/train_step.py --config=configs/channel_small.py --batch_size=32
  python benchmarks/train_step.py --all --forward_only   # sampling images/s
  python benchmarks/train_step.py --all --no_torch --compute_dtype=bfloat16
  python benchmarks/train_step.py --config=configs/channel_small.py \
      --matmul_precision=highest --torch_device=cuda
  python benchmarks/train_step.py --config=configs/channel_small.py \
      --members=8 [--xla_convs]        # a sweep's step (cign_jax.sweeps)

For each config: compile time, then `--steps` steps of ours and of our
PyTorch port of the same step (`tests/torch_reference.py`), alternating,
at the config's real batch size on random inputs; median and spread (min,
max) in ms to 0.01 ms, images/s (real images, and images through the loss:
11 per real image with 9 mismatched labels), the FLOP count of the step and
the rate it achieves, the process's peak resident memory, and the ratios
against our PyTorch port and against the original's figures measured on the
2-core CPU class (`reference/baseline.md`). Ends each config with one line
`config=<name> ms_per_step=<median>`.

The FLOP count (`step_flops`) is analytic: the multiply-adds (2 FLOPs each)
of every convolution, per-sample depthwise correlation and channel mixer of
the model as specified (a channel-conditioned conv with its C + 1 input
channels), forward and backward, over the seven forward calls of the loss;
element-wise work (BatchNorm, dropout, activations) is not counted. XLA's
own count (`cost_analysis`) misses the convolutions that run as library
calls (cuDNN on GPU, the C++ kernels on CPU), so it is printed only as a
remark.

With `--members=K`: the step of a sweep of K members (seeds 0..K-1, as
`cign_jax.sweeps.step` compiles it), its median time, real images/s over all
members, and the ratio to K separate single-run steps (the single run's
step timed in the same process); `--xla_convs` traces it with XLA's
convolutions instead of the C++ CPU kernels (which run once per member
under vmap). One line `config=<name> members=K ms_per_step=<median>`.

Our step is compiled as `cign_jax.step_programs` compiles it (the same
shardings), so that with a persistent compilation cache
(`--compilation_cache=DIR`) a following training run with the same config
reuses the compiled step.

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
# benchmarks/config_overrides.py, beside this script
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import config_overrides  # pylint: disable=g-import-not-at-top,wrong-import-position

# The PyTorch port of the step (a test oracle) lives with the tests.
sys.path.insert(0, os.path.join(ROOT, "tests"))
# Before torch (and its OpenMP runtime) loads; see the module docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The original PyTorch code on the 2-core CPU class, ms per step
# (reference/baseline.md, PyTorch 2.13.0, 2 threads).
ORIGINAL_MS = {
    "channel_small": 3532,
    "channel_large": 11637,
    "filter_small": 4946,
    "filter_large": 9314,
}
PAPER_CONFIGS = (
    "channel_small",
    "channel_large",
    "filter_small",
    "filter_large",
)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def spread(times_ms):
  return (
      f"median {statistics.median(times_ms):.2f} ms "
      f"(min {min(times_ms):.2f}, max {max(times_ms):.2f}, "
      f"n={len(times_ms)})"
  )


def layer_flops(config):
  """[(name, FLOPs of one image's forward pass)] of the model's layers:
  convolutions and (filter conditioning) per-sample depthwise correlations
  and channel mixers, 2 FLOPs per multiply-add."""
  from cign_jax import models  # pylint: disable=g-import-not-at-top
  from cign_jax import ops  # pylint: disable=g-import-not-at-top

  m = config.model
  ld, cond = m.latent_dim, m.conditioning
  extra = 1 if cond == "channel" else 0
  out = []
  h, c = 28, m.image_channels
  disc = (ld, 2 * ld, 4 * ld, 8 * ld, m.intermediate_dim)
  for i, (co, (k, s, p)) in enumerate(
      zip(disc, models.DISCRIMINATOR_LAYOUT), 1
  ):
    ho = ops.conv_output_size(h, k, s, p)
    if cond == "filter":
      out.append((f"disc_{i}", 2 * ho * ho * c * (k * k + co)))
    else:
      out.append((f"disc_{i}", 2 * ho * ho * co * k * k * (c + extra)))
    h, c = ho, co
  gen = (8 * ld, 4 * ld, 2 * ld, ld, m.image_channels)
  for i, (co, (k, s, p)) in enumerate(zip(gen, models.GENERATOR_LAYOUT), 1):
    ho = ops.conv_transpose_output_size(h, k, s, p)
    if cond == "filter":
      out.append((f"gen_{i}", 2 * h * h * c * k * k + 2 * ho * ho * c * co))
    else:
      out.append((f"gen_{i}", 2 * h * h * (c + extra) * k * k * co))
    h, c = ho, co
  return out


def step_flops(config, batch_size=None) -> float:
  """FLOPs of one train step (see the module docstring): per image, the
  forward F; the input and kernel gradients 2F where the parameters are
  trained (real, noise, mismatch, tightness calls), the input gradient F
  through the frozen copy."""
  b = batch_size or config.batch_size
  per_image = sum(f for _, f in layer_flops(config))
  k = (
      config.loss.num_mismatch_labels
      if config.model.conditioning != "none"
      else 0
  )
  first = (2 + k) * b  # real, noise, mismatch: forward + dx + dk
  copies = (1 + k) * b  # frozen copy: forward + dx
  tights = (1 + k) * b  # tightness: forward + dx + dk
  return per_image * (3 * first + 2 * copies + 3 * tights)


def import_torch_port():
  """Our PyTorch port, from the package or from tests/ (where it may live)."""
  try:
    from cign_jax import torch_reference  # pylint: disable=g-import-not-at-top

    return torch_reference
  except ImportError:
    pass
  tests_dir = os.path.join(ROOT, "tests")
  if tests_dir not in sys.path:
    sys.path.insert(0, tests_dir)
  import torch_reference  # pylint: disable=g-import-not-at-top

  return torch_reference


def make_torch_step(config, x, c, device):
  """Our PyTorch port's step on `device` and its inputs, or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top

    tr = import_torch_port()
  except ImportError as e:
    print(f"  PyTorch or our port not importable ({e}): skipping the port")
    return None
  import numpy as np  # pylint: disable=g-import-not-at-top

  if device == "cpu":
    torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = tr.CIGNTorch(
      config.model.conditioning,
      config.model.latent_dim,
      config.model.intermediate_dim,
      config.model.embedding_dim,
      config.model.dropout_rate,
  ).to(device)
  l = config.loss
  torch_step = tr.TorchTrainStep(
      model,
      config.optimizer.learning_rate,
      l.rec_weight,
      l.idem_noise_weight,
      l.tight_noise_weight,
      l.idem_mismatch_weight,
      l.tight_mismatch_weight,
  )
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
  ct = torch.from_numpy(c.astype(np.int64)).to(device)

  def run():
    torch_step.step(xt, ct)  # returns floats: waits for the device
    if device.startswith("cuda"):
      torch.cuda.synchronize()

  run()  # warm-up
  return run


def bench_train(
    name,
    config,
    steps,
    use_torch,
    torch_device="cpu",
    warmup=2,
    compile_only=False,
):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import sharding  # pylint: disable=g-import-not-at-top
  from cign_jax import step_programs  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  b = config.batch_size
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (b, 28, 28, 1)).astype(np.float32)
  c = rs.randint(0, 10, (b,)).astype(np.int32)
  mesh = sharding.create_mesh(config)
  state = sharding.put_replicated(ts.create_train_state(config), mesh)
  step = step_programs.compile_train_step(config, mesh)
  key = sharding.put_replicated(jax.random.key(0), mesh)
  batch_sharding = sharding.data_sharding(mesh)
  xj = sharding.put_global_batch(x, batch_sharding)
  cj = sharding.put_global_batch(c, batch_sharding)
  t0 = time.perf_counter()
  compiled = step.lower(state, xj, cj, key).compile()
  compile_s = time.perf_counter() - t0
  if compile_only:
    print(
        f"config={name} compiled in {compile_s:.1f} s ({config.compute_dtype}"
        f", matmul_precision {config.matmul_precision})",
        flush=True,
    )
    return None
  xla_flops = None
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else None
  except Exception:  # pylint: disable=broad-except
    pass
  for _ in range(warmup):
    state, m = compiled(state, xj, cj, key)
  jax.block_until_ready(m)
  rss_jax = peak_rss_mib()

  torch_step = None
  if use_torch:
    torch_step = make_torch_step(config, x, c, torch_device)

  ours, theirs = [], []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, xj, cj, key)
    jax.block_until_ready(m)
    ours.append(1000 * (time.perf_counter() - t))
    if torch_step is not None:
      t = time.perf_counter()
      torch_step()
      theirs.append(1000 * (time.perf_counter() - t))
  if not bool(np.asarray(m["finite"])):
    print("  WARNING: the last step's loss or gradient was not finite")

  med = statistics.median(ours)
  through_loss = b * (2 + config.loss.num_mismatch_labels)
  flops = step_flops(config)
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  print(
      f"{name}: batch {b} real images ({through_loss} through the loss); "
      f"compute_dtype {config.compute_dtype}, matmul_precision "
      f"{config.matmul_precision}, passes "
      f"{config_lib.resolve_passes(config.loss.passes)}, channel_conv "
      f"{config_lib.resolve_channel_conv(config.model.channel_conv)}"
  )
  print(f"  compile {compile_s:.1f} s")
  print(
      f"  ours (JAX):      {spread(ours)}; {1000 * b / med:.1f} real "
      f"images/s, {1000 * through_loss / med:.0f} images/s through the "
      f"loss; peak RSS {rss_jax:.0f} MiB"
  )
  print(
      f"  step FLOPs (analytic, convolutions and products): "
      f"{flops / 1e9:.1f} GFLOP; {flops / med / 1e9:.2f} TFLOP/s"
      + (
          f" (XLA's cost_analysis: {xla_flops / 1e9:.1f} GFLOP, without "
          "library-call convolutions)"
          if xla_flops
          else ""
      )
  )
  if theirs:
    tmed = statistics.median(theirs)
    print(
        f"  our PyTorch port ({torch_device}): {spread(theirs)}; "
        f"{1000 * b / tmed:.1f} real images/s; speed-up {tmed / med:.2f}x"
    )
  if (
      name in ORIGINAL_MS
      and b
      == {
          "channel_small": 128,
          "channel_large": 128,
          "filter_small": 64,
          "filter_large": 64,
      }[name]
      and (jax.default_backend() == "cpu")
  ):
    print(
        f"  original on the 2-core CPU (reference/baseline.md): "
        f"{ORIGINAL_MS[name]} ms; speed-up {ORIGINAL_MS[name] / med:.2f}x"
    )
  print(f"config={name} ms_per_step={med:.2f} compile_s={compile_s:.1f}")
  return med


def _time_steps(fn, state, args, steps, warmup):
  """(median ms, the last state) of `steps` calls of fn(state, *args)."""
  import jax  # pylint: disable=g-import-not-at-top

  for _ in range(warmup):
    state, m = fn(state, *args)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = fn(state, *args)
    jax.block_until_ready(m)
    times.append(1000 * (time.perf_counter() - t))
  return times, m


def bench_members(name, config, members, steps, warmup=2, xla_convs=False):
  """A sweep of `members` seeds against one run's step (module docstring)."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import sharding  # pylint: disable=g-import-not-at-top
  from cign_jax import step_programs  # pylint: disable=g-import-not-at-top
  from cign_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  from cign_jax.kernels import native_conv  # pylint: disable=g-import-not-at-top
  from cign_jax.sweeps import step as sweep_step  # pylint: disable=g-import-not-at-top

  b = config.batch_size
  rs = np.random.RandomState(0)
  x = rs.uniform(-1, 1, (members, b, 28, 28, 1)).astype(np.float32)
  c = rs.randint(0, 10, (members, b)).astype(np.int32)
  mesh = sharding.create_mesh(config)
  # The single run's step, the reference.
  single = step_programs.compile_train_step(config, mesh)
  state = sharding.put_replicated(ts.create_train_state(config), mesh)
  key = sharding.put_replicated(jax.random.key(0), mesh)
  batch = sharding.data_sharding(mesh)
  args = (
      sharding.put_global_batch(x[0], batch),
      sharding.put_global_batch(c[0], batch),
      key,
  )
  t0 = time.perf_counter()
  single = single.lower(state, *args).compile()
  single_compile = time.perf_counter() - t0
  one, _ = _time_steps(single, state, args, steps, warmup)
  # The sweep's.
  swept = config.copy_and_resolve_references()
  swept.sweep.seed = tuple(range(members))
  swept = config_lib.validate(swept)
  member_configs = [
      config_lib.member_config(swept, s)
      for s in config_lib.sweep_members(swept)
  ]
  context = native_conv.disabled() if xla_convs else contextlib.nullcontext()
  with context:
    sweep_step.forget()
    program = sweep_step.get(
        member_configs, ["seed"], mesh, ts.total_train_steps(config)
    )
    states = sharding.put_replicated(
        sweep_step.stack(
            [
                ts.create_train_state(m, model=program.model, tx=program.tx)
                for m in member_configs
            ]
        ),
        mesh,
    )
    member_batch = sweep_step.member_batch_sharding(mesh)
    sweep_args = (
        sharding.put_global_batch(x, member_batch),
        sharding.put_global_batch(c, member_batch),
        sharding.put_replicated(sweep_step.member_keys(range(members)), mesh),
        {},
    )
    t0 = time.perf_counter()
    compiled = program.step_fn.lower(states, *sweep_args).compile()
    sweep_compile = time.perf_counter() - t0
  times, m = _time_steps(compiled, states, sweep_args, steps, warmup)
  if not np.all(np.asarray(m["finite"])):
    print("  WARNING: a member's last step was not finite")
  med, one_med = statistics.median(times), statistics.median(one)
  convs = "XLA convolutions" if xla_convs else "the default convolutions"
  print(
      f"{name}: {members} members, batch {b} each, {convs}; compile "
      f"{sweep_compile:.1f} s (one run's step {single_compile:.1f} s)"
  )
  print(
      f"  sweep step: {spread(times)}; {1000 * b * members / med:.1f} real "
      f"images/s over the members"
  )
  print(
      f"  one run's step: {spread(one)}; {members} separate runs "
      f"{members * one_med:.2f} ms; sweep / separate "
      f"{med / (members * one_med):.2f}, sweep / one run "
      f"{med / one_med:.2f}"
  )
  print(
      f"config={name} members={members} ms_per_step={med:.2f} "
      f"single_ms_per_step={one_med:.2f}"
  )


def bench_forward(name, config, steps, batch=1000, compile_only=False):
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
  if compile_only:
    print(f"config={name} sampling compiled in {compile_s:.1f} s", flush=True)
    return
  jax.block_until_ready(f(variables, z, c))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(f(variables, z, c))
    times.append(1000 * (time.perf_counter() - t))
  med = statistics.median(times)
  flops = batch * sum(f for _, f in layer_flops(config))
  print(
      f"{name}: sampling f(z, c) at batch {batch} ({config.compute_dtype}, "
      f"matmul_precision {config.matmul_precision}): {spread(times)}; "
      f"{1000 * batch / med:.0f} images/s, {flops / med / 1e9:.2f} TFLOP/s "
      f"(compile {compile_s:.1f} s)"
  )
  print(f"config={name} ms_per_forward={med:.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", help="a config file")
  parser.add_argument(
      "--all", action="store_true", help="the paper's four configs"
  )
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument(
      "--batch_size",
      type=int,
      default=0,
      help="override the config's batch size",
  )
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument(
      "--members",
      type=int,
      default=0,
      help="time a sweep's step of this many members (seeds)",
  )
  parser.add_argument(
      "--xla_convs",
      action="store_true",
      help="with --members: the sweep with XLA's convolutions",
  )
  parser.add_argument(
      "--forward_only",
      action="store_true",
      help="time sampling f(z, c) at batch 1000 instead",
  )
  parser.add_argument(
      "--forward_batch", type=int, default=1000, help="batch of --forward_only"
  )
  parser.add_argument(
      "--compute_dtype",
      default="",
      help="override config.compute_dtype (float32, " "bfloat16, float16)",
  )
  parser.add_argument(
      "--matmul_precision",
      default="",
      help="override config.matmul_precision (default, " "high, highest)",
  )
  parser.add_argument(
      "--passes",
      default="",
      help="override config.loss.passes (auto, sequential, " "batched)",
  )
  parser.add_argument(
      "--channel_conv",
      default="",
      help="override config.model.channel_conv (auto, " "concat, per_class)",
  )
  parser.add_argument(
      "--latent_dim",
      type=int,
      default=0,
      help="override config.model.latent_dim (rehearsals)",
  )
  parser.add_argument(
      "--intermediate_dim",
      type=int,
      default=0,
      help="override config.model.intermediate_dim",
  )
  parser.add_argument(
      "--torch_device",
      default="cpu",
      help="device of our PyTorch port (cpu, cuda)",
  )
  parser.add_argument(
      "--warmup", type=int, default=2, help="untimed steps after compiling"
  )
  parser.add_argument(
      "--compile_only",
      action="store_true",
      help="compile (filling --compilation_cache) and stop",
  )
  parser.add_argument(
      "--compilation_cache",
      default="",
      help="a persistent JAX compilation cache directory",
  )
  args = parser.parse_args()
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  import jax  # pylint: disable=g-import-not-at-top
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  if args.compilation_cache:
    from cign_jax import utils  # pylint: disable=g-import-not-at-top

    utils.enable_compilation_cache(args.compilation_cache)

  paths = (
      [os.path.join(ROOT, "configs", f"{n}.py") for n in PAPER_CONFIGS]
      if args.all
      else [args.config]
  )
  if not paths or paths[0] is None:
    parser.error("give --config=PATH or --all")
  print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
  print(
      f"# jax {jax.__version__} on {jax.devices()[0].device_kind} "
      f"({jax.default_backend()}), {os.cpu_count()} CPUs, "
      f"{platform.processor() or platform.machine()}, "
      f"{time.strftime('%Y-%m-%d')}"
  )
  if jax.default_backend() == "cpu":
    from cign_jax.kernels import native_conv  # pylint: disable=g-import-not-at-top

    print(
        "# CPU convolutions: "
        + (
            "C++ kernels (cign_jax.kernels.native_conv)"
            if native_conv.available()
            else f"XLA formulations ({native_conv.unavailable_reason()})"
        )
    )
  for path in paths:
    config = config_lib.load_config_file(path)
    config_overrides.apply(config, args)
    config = config_lib.validate(config)
    name = os.path.splitext(os.path.basename(path))[0]
    if args.members:
      bench_members(
          name,
          config,
          args.members,
          args.steps,
          warmup=args.warmup,
          xla_convs=args.xla_convs,
      )
    elif args.forward_only:
      bench_forward(
          name,
          config,
          args.steps,
          args.forward_batch,
          compile_only=args.compile_only,
      )
    else:
      bench_train(
          name,
          config,
          args.steps,
          use_torch=not args.no_torch,
          torch_device=args.torch_device,
          warmup=args.warmup,
          compile_only=args.compile_only,
      )


if __name__ == "__main__":
  main()
