"""Multi-device checks, run in fresh processes with simulated CPU devices.

  python tests/multidevice_worker.py OUT_DIR
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
      python tests/multidevice_worker.py --multihost OUT_DIR [REFERENCE_NPZ]
      # i = 0, 1; with REFERENCE_NPZ, also 2 steps of the training loop

JAX fixes its device count when it initialises, and the pytest process has
already done so with one device, so `tests/test_multidevice.py` runs this
script in subprocesses. The XLA flag below gives the first form 4 CPU
devices; "1 device" there is a mesh over the first of them, which runs the
same programs as a one-device process (the test also restores a 4-device
checkpoint in its own process). The second form is one of two processes with
2 CPU devices each, joined by `jax.distributed` as two hosts would be.

Every check runs even when an earlier one fails; OUT_DIR/results.json (or
multihost_<i>.json) maps a check's name to {"ok": bool, "detail": str} for
the test to report, and OUT_DIR holds the arrays and checkpoints the test
compares with its own.
"""

import os
import sys

MULTIHOST = "--multihost" in sys.argv[1:2]
NUM_DEVICES = 2 if MULTIHOST else 4  # per process


def _configure_xla():
  """Before JAX initialises: the device count and faster CPU compiles."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    flags += f" --xla_force_host_platform_device_count={NUM_DEVICES}"
  os.environ["XLA_FLAGS"] = flags.strip()
  # Compiling the step dominates these checks' time: the test processes'
  # flags (tests/fast_compile.py), already set when pytest starts this, so
  # that a one-device step compiled here is a persistent-cache hit there and
  # back (the device count is not part of the cache key). The HLO, and so
  # the sharding these checks are about, is the same.
  fast_compile.apply()
  os.environ["JAX_PLATFORMS"] = "cpu"  # the simulated devices are CPU ones


if __name__ == "__main__":
  sys.path.insert(
      0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  import fast_compile  # tests/fast_compile.py, beside this script

  _configure_xla()

# pylint: disable=g-import-not-at-top,wrong-import-position
import concurrent.futures
import json
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import losses
from cign_jax import models
from cign_jax import sharding as sharding_lib
from cign_jax.kernels import native_conv
from cign_jax import step_programs
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.configs import quick
import synthetic  # tests/synthetic.py, beside this script

# The loss terms, in the order of `losses.LOSS_TERMS`.
TERMS = losses.LOSS_TERMS

# 1 device vs 4 is the same float32 computation with its batch reductions
# (BatchNorm means, loss means, gradient sums) split into per-device partial
# sums and all-reduced, so the two differ by float32 rounding only, amplified
# by the network's conditioning. Measured at these sizes: losses and
# BatchNorm statistics ~1e-7 relative, gradients (read from AdamW's moments)
# up to ~1e-4 of their leaf's largest element, parameters ~1e-7 after a first
# step and ~2e-6 after a second (AdamW divides by sqrt(nu), which magnifies
# the differences of elements with small second moments); the filter
# network's output up to 2.1e-5 of its largest element and its gradient up
# to 2.2e-4 of a leaf's. (At
# latent_dim 2 / intermediate_dim 4, BatchNorm over 8 near-equal values
# amplifies the rounding to ~1e-3 of the gradients and flips AdamW steps;
# hence 4 / 8.) The tolerances leave >= 4x headroom and stay far below what
# a sharding error causes: other dropout masks (or noise) change the losses
# by ~1-6% and the gradients by more than their own size.
LOSS_RTOL = 1e-5  # relative, per loss term
OUTPUT_RTOL = 1e-4  # of the largest |value| (a network's output)
STATS_RTOL = 1e-5  # of the leaf's largest |value| (batch_stats)
GRAD_RTOL = 1e-3  # of the leaf's largest |value| (AdamW's mu and nu)
PARAM_ATOL = 1e-5  # absolute: 1% of an AdamW step (~lr = 1e-3)


def tiny_config(conditioning="channel", **overrides):
  config = quick.get_config("tiny")
  config.model.conditioning = conditioning
  config.update_from_flattened_dict(overrides)
  return config_lib.validate(config)


def mesh_of(devices):
  """A 1-axis 'data' mesh over `devices` (as sharding.create_mesh builds)."""
  names = ("data",)
  try:
    return jax.sharding.Mesh(
        np.array(devices), names, axis_types=(jax.sharding.AxisType.Auto,)
    )
  except (AttributeError, TypeError):
    return jax.sharding.Mesh(np.array(devices), names)


def fixed_batch(batch_size, seed=0):
  """Smooth image-like inputs in [-1, 1] and labels (deterministic)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:28, 0:28] / 27.0
  images = []
  for _ in range(batch_size):
    cy, cx, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.15, 0.3)]
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    images.append(2.0 * blob - 1.0 + 0.05 * rng.standard_normal((28, 28)))
  images = np.clip(np.stack(images)[..., None], -1, 1).astype(np.float32)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  return images, labels


def host(tree):
  """A host (numpy) copy: device buffers are donated to the jitted step."""
  return jax.device_get(tree)


def flat(tree, prefix=""):
  """{path: numpy array} of a state's arrays (or any pytree)."""
  if isinstance(tree, train_step_lib.TrainState):
    tree = checkpoints.state_tree(tree)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _excess(a, b, tol):
  return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) - tol


def compare(name, got, want, rtol=0.0, atol=0.0, leaf_scale=False):
  """Raises AssertionError naming the worst leaf of two {path: array} dicts:
  |got - want| <= atol + rtol * (max |want| of the leaf if leaf_scale, else
  |want| elementwise)."""
  assert sorted(got) == sorted(want), f"{name}: different keys"
  for key in want:
    b = np.asarray(want[key], np.float64)
    assert np.shape(got[key]) == b.shape, f"{name}{key}: shape mismatch"
    scale = np.max(np.abs(b), initial=0.0) if leaf_scale else np.abs(b)
    excess = _excess(got[key], b, atol + rtol * scale)
    if np.any(excess > 0):
      i = np.unravel_index(np.argmax(excess), b.shape)
      raise AssertionError(
          f"{name}{key}{list(i)}: {np.asarray(got[key])[i]!r} vs {b[i]!r} "
          f"(atol {atol}, rtol {rtol}{' of the leaf max' if leaf_scale else ''})"
      )


def compare_states(name, got, want, optimizer):
  """Train states (flat dicts) after the same step from the same state.

  The optimiser's first moments agree to GRAD_RTOL of their leaf's largest
  element (the second moments, squares, to twice that), the BatchNorm
  statistics to STATS_RTOL. The parameters agree to PARAM_ATOL plus what those moment differences move AdamW's update
  u = lr m^ / (sqrt(v^) + eps) by: lr (dm^ + m^ dv^ / (2 sqrt(v^) (sqrt(v^)
  + eps))) / (sqrt(v^) + eps). That is tiny where the gradient is large,
  and unbounded where it is at rounding level, whose update direction
  (lr g / |g| at step 1) rounding decides.
  """
  part = lambda prefix: {k: v for k, v in want.items() if k.startswith(prefix)}
  sub = lambda d, keys: {k: d[k] for k in keys}
  stats = part("['batch_stats']")
  compare(name, sub(got, stats), stats, STATS_RTOL, 1e-9, leaf_scale=True)
  # nu holds squared gradients: a relative error e in a gradient is about
  # 2e in its square, so nu gets twice the moments' tolerance.
  opt = part("['opt_state']")
  nu = {k: v for k, v in opt.items() if ".nu[" in k}
  mu = {k: v for k, v in opt.items() if k not in nu}
  compare(name, sub(got, mu), mu, GRAD_RTOL, 1e-12, leaf_scale=True)
  compare(name, sub(got, nu), nu, 2 * GRAD_RTOL, 1e-12, leaf_scale=True)
  t = int(want["['step']"])
  assert int(got["['step']"]) == t
  o = optimizer
  for key in part("['params']"):
    mu, nu = (
        np.asarray(
            want[key.replace("['params']", f"['opt_state'][0].{m}", 1)],
            np.float64,
        )
        for m in ("mu", "nu")
    )
    c1, c2 = 1 - o.b1**t, 1 - o.b2**t
    m_hat, v_hat = np.abs(mu) / c1, nu / c2
    dm_hat = GRAD_RTOL * np.max(np.abs(mu)) / c1
    dv_hat = 2 * GRAD_RTOL * np.max(nu) / c2
    root = np.sqrt(v_hat)
    denominator = root + o.eps
    with np.errstate(divide="ignore", invalid="ignore"):
      sensitivity = (
          dm_hat + m_hat * dv_hat / (2 * root * denominator)
      ) / denominator
    tol = PARAM_ATOL + o.learning_rate * np.nan_to_num(sensitivity, nan=np.inf)
    excess = _excess(got[key], want[key], tol)
    if np.any(excess > 0):
      i = np.unravel_index(np.argmax(excess), excess.shape)
      raise AssertionError(
          f"{name}{key}{list(i)}: {got[key][i]!r} vs "
          f"{want[key][i]!r} (tolerance {tol[i]:.3g})"
      )


def max_rel_diff(got, want):
  out = 0.0
  for key in want:
    a, b = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
    scale = max(np.max(np.abs(b), initial=0.0), 1e-30)
    out = max(out, float(np.max(np.abs(a - b), initial=0.0) / scale))
  return out


class Runner:
  """Compiled steps (one per config and mesh) on fixed data."""

  def __init__(self):
    devices = jax.devices()
    if len(devices) != NUM_DEVICES:
      raise RuntimeError(
          f"expected {NUM_DEVICES} simulated CPU devices, got "
          f"{len(devices)}; was JAX initialised before "
          "XLA_FLAGS was set?"
      )
    self.mesh1 = mesh_of(devices[:1])
    self.mesh4 = mesh_of(devices)
    self._steps = {}

  def place(self, config, mesh, state_host, batch):
    sharding = sharding_lib.data_sharding(mesh)
    return (
        sharding_lib.put_replicated(state_host, mesh),
        sharding_lib.put_global_batch(batch[0], sharding),
        sharding_lib.put_global_batch(batch[1], sharding),
        sharding_lib.put_replicated(jax.random.key(config.seed), mesh),
    )

  def _lower(self, config, mesh, state_host, batch):
    args = self.place(config, mesh, state_host, batch)
    return step_programs.compile_train_step(config, mesh).lower(*args)

  def compiled(self, config, mesh, state_host, batch):
    """`step_programs.compile_train_step`, compiled ahead of time (once per
    config and mesh: compiling dominates these tests' time)."""
    key = (config.to_json(), mesh.size)
    if key not in self._steps:
      self._steps[key] = self._lower(config, mesh, state_host, batch).compile()
    return self._steps[key]

  def precompile(self, jobs, log=lambda message: None):
    """Compiles the steps of [(config, mesh, state_host, batch)] at once, on
    as many threads as there are cores (XLA releases the GIL)."""
    lowered = {}
    for config, mesh, state_host, batch in jobs:
      key = (config.to_json(), mesh.size)
      if key not in self._steps and key not in lowered:
        lowered[key] = self._lower(config, mesh, state_host, batch)
    log(f"lowered {len(lowered)} steps")
    workers = max(1, min(len(lowered), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for key, exe in zip(
          lowered, pool.map(lambda l: l.compile(), lowered.values())
      ):
        self._steps[key] = exe

  def run(self, config, mesh, state_host, batches):
    """Steps from a host state over `batches`; returns (state, [metrics])."""
    fn = self.compiled(config, mesh, state_host, batches[0])
    state, metrics = None, []
    for batch in batches:
      placed, *args = self.place(config, mesh, state_host, batch)
      state, m = fn(placed if state is None else state, *args)
      metrics.append(host(m))
    return state, metrics


RESULTS = {}
OUT_DIR = "."
RESULTS_FILE = "results.json"


def check(fn):
  """Runs a check now and records its outcome instead of stopping."""
  t0 = time.time()
  try:
    detail = fn() or ""
    RESULTS[fn.__name__] = {"ok": True, "detail": str(detail)}
  except Exception as e:  # pylint: disable=broad-except
    RESULTS[fn.__name__] = {
        "ok": False,
        "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}",
    }
  RESULTS[fn.__name__]["seconds"] = round(time.time() - t0, 1)
  print(
      f"{fn.__name__}: {'ok' if RESULTS[fn.__name__]['ok'] else 'FAILED'} "
      f"({RESULTS[fn.__name__]['seconds']} s)",
      flush=True,
  )
  with open(os.path.join(OUT_DIR, RESULTS_FILE), "w") as f:
    json.dump(RESULTS, f, indent=1)
  return fn


def main(out_dir):
  global OUT_DIR
  OUT_DIR = out_dir
  os.makedirs(out_dir, exist_ok=True)
  utils.enable_compilation_cache()
  runner = Runner()
  batches = [fixed_batch(8, seed=s) for s in (0, 1)]
  # (conditioning, compute dtype) -> (config, host state at step 0). The
  # state carries the model (apply_fn), so each dtype needs its own.
  states = {}
  for conditioning in ("channel", "filter"):
    for dtype in ("float32", "bfloat16"):
      config = tiny_config(conditioning, compute_dtype=dtype)
      states[conditioning, dtype] = (
          config,
          host(train_step_lib.create_train_state(config)),
      )
  t0 = time.time()
  # The train steps these checks run: channel conditioning's in float32 on
  # 1 and 4 devices and in bfloat16 on 4. (Filter conditioning's sharding
  # is checked on its network's forward and backward pass, a program a
  # fraction of a step's size: compiling steps is most of this script's
  # time.)
  jobs = [
      (c, m, st, batches[0])
      for (cond, dtype), (c, st) in states.items()
      if cond == "channel"
      for m in (
          (runner.mesh1, runner.mesh4)
          if dtype == "float32"
          else (runner.mesh4,)
      )
  ]
  try:
    runner.precompile(
        jobs, log=lambda m: print(f"{m} after " f"{time.time() - t0:.1f} s")
    )
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()  # each check compiles (and reports) its own
  print(f"compiled {len(jobs)} steps in {time.time() - t0:.1f} s", flush=True)

  @check
  def dropout_masks_sharding_invariant():
    """The dropout masks of a batch sharded over 4 devices equal those drawn
    on 1 device (counters are global element indices), and every device
    computes only its own shard's bits."""
    x = np.ones((8, 7, 7, 3), np.float32)
    layer = models.Dropout(0.15)

    def masks(x, key):
      y = layer.apply({}, x, deterministic=False, rngs={"dropout": key})
      return y != 0

    out = {}
    for mesh in (runner.mesh1, runner.mesh4):
      fn = jax.jit(
          masks,
          in_shardings=(
              sharding_lib.data_sharding(mesh),
              sharding_lib.replicated(mesh),
          ),
          out_shardings=sharding_lib.data_sharding(mesh),
      )
      args = (
          sharding_lib.put_global_batch(x, sharding_lib.data_sharding(mesh)),
          sharding_lib.put_replicated(jax.random.key(7), mesh),
      )
      out[mesh.size] = np.asarray(fn(*args))
      if mesh.size > 1:
        hlo = fn.lower(*args).compile().as_text()
    differ = int(np.sum(out[1] != out[NUM_DEVICES]))
    assert differ == 0, (
        f"{differ} of {out[1].size} mask entries differ "
        "between 1 and 4 devices"
    )
    kept = float(out[1].mean())
    global_bits = f"u32[{x.shape[0]},{x.shape[1]},{x.shape[2]}" in hlo
    assert not global_bits, "a device computes bits for the global batch"
    return f"identical; kept {kept:.3f}; only local bits per device"

  def one_vs_four(conditioning):
    config, state0 = states[conditioning, "float32"]
    s1, m1 = runner.run(config, runner.mesh1, state0, batches[:1])
    s4, m4 = runner.run(config, runner.mesh4, state0, batches[:1])
    # The 4-device step really is data parallel: its program all-reduces.
    hlo = runner.compiled(config, runner.mesh4, state0, batches[0]).as_text()
    assert "all-reduce" in hlo, "the 4-device step has no all-reduce"
    f1, f4 = flat(host(s1)), flat(host(s4))
    assert int(f1["['step']"]) == int(f4["['step']"]) == 1
    compare_states(f"{conditioning} state", f4, f1, config.optimizer)
    assert m4[0]["finite"] == m1[0]["finite"] == 1.0, "not finite"
    compare(
        f"{conditioning} metrics ",
        {k: m4[0][k] for k in TERMS + ("loss",)},
        {k: m1[0][k] for k in TERMS + ("loss",)},
        LOSS_RTOL,
    )
    np.savez(os.path.join(out_dir, f"{conditioning}_1dev.npz"), **f1)
    np.savez(os.path.join(out_dir, f"{conditioning}_4dev.npz"), **f4)
    return (
        f"max relative difference: state "
        f"{max_rel_diff(f4, f1):.2g}, losses "
        f"{max_rel_diff(m4[-1], m1[-1]):.2g}"
    )

  @check
  def channel_one_vs_four_devices():
    return one_vs_four("channel")

  @check
  def filter_network_one_vs_four_devices():
    """The filter-conditioned network in training mode (per-sample filters
    from the labels, BatchNorm over the global batch, dropout) and the
    gradient of a loss of its output on 4 devices equal 1 device's: what
    filter conditioning adds to the sharding of the step checked above."""
    config, state0 = states["filter", "float32"]
    model = models.model_from_config(config)
    x, c = batches[0]

    def loss_and_grad(params, batch_stats, x, c, key):
      def loss(p):
        y, updated = model.apply(
            {"params": p, "batch_stats": batch_stats},
            x,
            c,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return jnp.mean(jnp.abs(y - x)), (y, updated["batch_stats"])

      (value, (y, stats)), grads = jax.value_and_grad(loss, has_aux=True)(
          params
      )
      return value, y, stats, grads

    out, hlo = {}, ""
    for mesh in (runner.mesh1, runner.mesh4):
      repl = sharding_lib.replicated(mesh)
      data = sharding_lib.data_sharding(mesh)
      fn = jax.jit(
          loss_and_grad,
          in_shardings=(repl, repl, data, data, repl),
          out_shardings=(repl, data, repl, repl),
      )
      args = (
          sharding_lib.put_replicated(state0.params, mesh),
          sharding_lib.put_replicated(state0.batch_stats, mesh),
          sharding_lib.put_global_batch(x, data),
          sharding_lib.put_global_batch(c, data),
          sharding_lib.put_replicated(jax.random.key(config.seed), mesh),
      )
      compiled = fn.lower(*args).compile()
      if mesh.size > 1:
        hlo = compiled.as_text()
      out[mesh.size] = host(compiled(*args))
    assert "all-reduce" in hlo, "the 4-device program has no all-reduce"
    (l1, y1, s1, g1), (l4, y4, s4, g4) = out[1], out[NUM_DEVICES]
    compare("filter loss ", {"": l4}, {"": l1}, LOSS_RTOL)
    compare(
        "filter output ", {"": y4}, {"": y1}, OUTPUT_RTOL, 1e-9, leaf_scale=True
    )
    compare(
        "filter batch_stats",
        flat(s4),
        flat(s1),
        STATS_RTOL,
        1e-9,
        leaf_scale=True,
    )
    compare(
        "filter gradient", flat(g4), flat(g1), GRAD_RTOL, 1e-12, leaf_scale=True
    )
    return (
        f"max relative difference: gradient "
        f"{max_rel_diff(flat(g4), flat(g1)):.2g}, output "
        f"{max_rel_diff({'': y4}, {'': y1}):.2g}"
    )

  @check
  def checkpoints_across_device_counts():
    """Save on 4 devices -> restore on 1 (and 1 -> 4), continue a step: the
    same as continuing where it was saved. Also leaves the 4-device
    checkpoint and its continuation for the test's own 1-device process."""
    config, state0 = states["channel", "float32"]
    notes = []
    for src, dst in (
        (runner.mesh4, runner.mesh1),
        (runner.mesh1, runner.mesh4),
    ):
      tag = f"{src.size}to{dst.size}"
      workdir = os.path.join(out_dir, f"ckpt_{tag}")
      s_src, _ = runner.run(config, src, state0, batches[:1])
      mngr = checkpoints.manager(workdir)
      checkpoints.save(mngr, s_src)
      saved = flat(host(s_src))
      cont_src, m_src = runner.run(config, src, host(s_src), batches[1:])
      template = sharding_lib.put_replicated(state0, dst)  # values from step 0
      restored = checkpoints.restore(mngr, template)
      mngr.close()
      for leaf in jax.tree_util.tree_leaves(checkpoints.state_tree(restored)):
        assert (
            len(leaf.sharding.device_set) == dst.size
        ), f"{tag}: restored leaf on {leaf.sharding}"
      got = flat(host(restored))
      for key in saved:  # a checkpoint round trip is exact
        np.testing.assert_array_equal(got[key], saved[key], err_msg=tag + key)
      cont_dst, m_dst = runner.run(config, dst, host(restored), batches[1:])
      compare_states(
          f"{tag} continued state",
          flat(host(cont_dst)),
          flat(host(cont_src)),
          config.optimizer,
      )
      compare(
          f"{tag} continued metrics",
          {k: m_dst[0][k] for k in TERMS},
          {k: m_src[0][k] for k in TERMS},
          LOSS_RTOL,
      )
      if tag == "4to1":
        np.savez(os.path.join(out_dir, "ckpt_4to1_saved.npz"), **saved)
        np.savez(
            os.path.join(out_dir, "ckpt_4to1_continued.npz"),
            **flat(host(cont_src)),
        )
      notes.append(f"{tag}: exact restore, continued step matches")
    return "; ".join(notes)

  @check
  def batch_not_divisible():
    config = tiny_config(batch_size=6)
    mesh = sharding_lib.create_mesh(config)
    assert mesh.size == NUM_DEVICES, mesh
    messages = []
    for call in (
        lambda: sharding_lib.check_batch_divides(config, mesh),
        lambda: train.train_and_evaluate(
            tiny_config(batch_size=6, num_train_steps=1),
            os.path.join(out_dir, "run_bad_batch"),
            dataset=in_memory_dataset(),
        ),
    ):
      try:
        call()
      except ValueError as e:
        messages.append(str(e))
      else:
        raise AssertionError("a batch of 6 on 4 devices was accepted")
    for m in messages:
      assert "batch_size 6" in m and "4 devices" in m, m
    return messages[-1]

  @check
  def train_and_evaluate_on_four_devices():
    """The whole loop on 4 devices (sharded batches, checkpoint, samples)."""
    config = tiny_config(
        num_train_steps=2,
        log_every_steps=1,
        checkpoint_every_steps=2,
        sample_every_steps=1000,
    )
    workdir = os.path.join(out_dir, "run_4dev")
    state = train.train_and_evaluate(
        config, workdir, dataset=in_memory_dataset()
    )
    assert int(state.step) == 2
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    assert len(leaf.sharding.device_set) == NUM_DEVICES, leaf.sharding
    assert os.path.isfile(os.path.join(workdir, "samples.png"))
    np.savez(os.path.join(out_dir, "run_4dev.npz"), **flat(host(state)))
    return f"2 steps; checkpoint steps {sorted(os.listdir(os.path.join(workdir, 'checkpoints')))}"

  @check
  def bfloat16_step():
    return mixed_precision_checks(runner, states, batches)


def in_memory_dataset(n=32):
  return synthetic.dataset(n, seed=3)  # tests/synthetic.py


def _walk_eqns(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside its equations."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _walk_eqns(inner)


def _products_not_in(config, state, x, c, dtype):
  """The matrix products and convolutions on activations (an operand of rank
  >= 3: im2col patches, channel mixers, transposed-conv columns, and their
  gradients) in the train step's jaxpr, and those of them with an operand
  not of `dtype`."""
  step = train_step_lib.make_train_step(config)
  jaxpr = jax.make_jaxpr(step)(state, x, c, jax.random.key(0))
  on_activations = [
      e
      for e in _walk_eqns(jaxpr.jaxpr)
      if e.primitive.name in ("dot_general", "conv_general_dilated")
      and max(len(v.aval.shape) for v in e.invars) >= 3
  ]
  wrong = [
      (e.primitive.name, [str(v.aval) for v in e.invars])
      for e in on_activations
      if any(v.aval.dtype != dtype for v in e.invars)
  ]
  return on_activations, wrong


def _vector(tree):
  return np.concatenate([np.ravel(v) for v in flat(tree).values()])


def _rounded_to(dtype, tree):
  return jax.tree_util.tree_map(
      lambda v: np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32)),
      tree,
  )


def mixed_precision_checks(runner, states, batches):
  """compute_dtype='bfloat16': float32 parameters, optimiser state and
  losses; bfloat16 activations and matrix products; close to float32."""
  notes = []
  x, c = batches[0]
  for conditioning in ("channel", "filter"):
    config32, state0 = states[conditioning, "float32"]
    config16, state16_0 = states[conditioning, "bfloat16"]
    compare("bfloat16 init ", flat(state16_0), flat(state0))  # the same init

    # The network computes in bfloat16: every matrix product and convolution
    # on activations in the step's jaxpr takes bfloat16 operands ...
    model16 = models.model_from_config(config16)
    on_activations, wrong = _products_not_in(
        config16, state16_0, x, c, jnp.bfloat16
    )
    assert on_activations, "no matrix products on activations found"
    assert not wrong, f"{conditioning}: float32 products: {wrong[:3]}"
    # (the same scan of the float32 step finds all of them float32: the
    # check can fail) ...
    # (with the float32 step's convolutions in XLA's formulations, as the
    # bfloat16 step's are: the C++ kernels are float32-only custom calls)
    with native_conv.disabled():
      _, wrong32 = _products_not_in(config32, state0, x, c, jnp.bfloat16)
    assert len(wrong32) == len(on_activations), (
        len(wrong32),
        len(on_activations),
    )
    # ... and the layers return bfloat16 (BatchNorm normalises in float32
    # and returns bfloat16); the network's output is float32.
    layer_types = (
        models.Conv,
        models.FilterConditionedConv,
        models.TorchBatchNorm,
        models.Dropout,
    )
    # (shapes and dtypes only: jax.eval_shape computes nothing)
    out, inter = jax.eval_shape(
        lambda v: model16.apply(
            v,
            x,
            c,
            train=True,
            rngs={"dropout": jax.random.key(1)},
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda m, _: isinstance(m, layer_types),
        ),
        {"params": state16_0.params, "batch_stats": state16_0.batch_stats},
    )
    dtypes = {
        jax.tree_util.keystr(k): v.dtype
        for k, v in jax.tree_util.tree_flatten_with_path(
            inter["intermediates"]
        )[0]
    }
    assert len(dtypes) >= 10, dtypes
    not16 = {k: str(v) for k, v in dtypes.items() if v != jnp.bfloat16}
    assert not not16, f"{conditioning}: layers not in bfloat16: {not16}"
    assert out.dtype == jnp.float32, out.dtype
    notes.append(
        f"{conditioning}: {len(on_activations)} products on "
        f"activations, all bfloat16"
    )

  # One step (4 devices) in bfloat16 against float32, channel conditioning
  # (compiling a step is what these tests' time goes to).
  config32, state0 = states["channel", "float32"]
  config16, state16_0 = states["channel", "bfloat16"]
  mesh = runner.mesh4
  s32, m32 = runner.run(config32, mesh, state0, batches[:1])
  s16, m16 = runner.run(config16, mesh, state16_0, batches[:1])
  s16, m16, s32, m32 = host(s16), m16[0], host(s32), m32[0]
  # Storage stays float32 (int32 step counters aside), losses are float32.
  for path, leaf in flat(s16).items():
    if "count" not in path and path != "['step']":
      assert leaf.dtype == np.float32, f"{path} is {leaf.dtype}"
  for k in TERMS + ("loss",):
    assert m16[k].dtype == np.float32, f"{k} is {m16[k].dtype}"
  assert m16["finite"] == 1.0, "the bfloat16 step is not finite"

  # How close is close. bfloat16 keeps 8 significant bits (rounding 2^-9 ~
  # 0.2% relative). The loss terms are means of L1 distances over thousands
  # of pixels, so rounding errors average out: measured <= 0.15% per term;
  # 1% leaves headroom and still catches a wrong cast or term (O(1) change).
  # The gradients of this tiny, freshly initialised network are far more
  # sensitive: merely rounding the float32 step's parameters to bfloat16
  # (0.2%) moves its gradient by ~35% in L2 norm (cosine ~0.95), so the
  # bfloat16 step's gradient (read from AdamW's first moment, mu = (1 - b1)
  # g) is held to that baseline, computed here: its error may be at most
  # twice the baseline's. AdamW's first update is lr * g / |g| per element,
  # so the update directions are compared weighted by |g|: they agree on >=
  # 90% of the gradient's mass (measured ~96%; an unrelated gradient, e.g.
  # from other dropout masks, agrees on ~50%).
  rel = {
      k: abs(float(m16[k]) - float(m32[k])) / abs(float(m32[k])) for k in TERMS
  }
  g32 = _vector(s32.opt_state[0].mu)
  g16 = _vector(s16.opt_state[0].mu)
  rounded = state0.replace(params=_rounded_to(jnp.bfloat16, state0.params))
  s_base, _ = runner.run(config32, mesh, rounded, batches[:1])
  g_base = _vector(host(s_base).opt_state[0].mu)
  err = lambda g: float(np.linalg.norm(g - g32) / np.linalg.norm(g32))
  p0 = _vector(state0.params)
  u16, u32 = _vector(s16.params) - p0, _vector(s32.params) - p0
  agree = float(
      np.sum(np.abs(g32) * (np.sign(u16) == np.sign(u32))) / np.sum(np.abs(g32))
  )
  numbers = (
      f"loss terms rel. diff max {max(rel.values()):.2g}, gradient "
      f"rel. error {err(g16):.3g} (baseline {err(g_base):.3g}), "
      f"update directions agree on {agree:.1%} of |g|"
  )
  assert max(rel.values()) < 0.01, f"{numbers}; {rel}"
  assert err(g16) <= 2 * err(g_base) + 0.02, numbers
  assert agree >= 0.9, numbers
  notes.append("channel step: " + numbers)
  return "; ".join(notes)


def multihost_main(out_dir, reference=None):
  """One of two processes, as on two hosts: `cign_jax.main`'s
  initialisation from the environment, the global mesh, and the training
  loop's data placement and reductions across the processes."""
  global OUT_DIR
  os.makedirs(out_dir, exist_ok=True)
  try:  # cross-process collectives on CPU
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except
    pass  # (newer JAX: the default)
  started = sharding_lib.initialize_distributed(None)  # JAX_COORDINATOR_ADDRESS
  pid = jax.process_index()
  OUT_DIR = out_dir
  global RESULTS_FILE
  RESULTS_FILE = f"multihost_{pid}.json"
  config = tiny_config("channel")
  x, c = fixed_batch(config.batch_size)

  @check
  def multihost_processes_and_mesh():
    assert started, "initialize_distributed did not run"
    assert jax.process_count() == 2, jax.process_count()
    assert jax.local_device_count() == NUM_DEVICES
    assert jax.device_count() == 2 * NUM_DEVICES
    mesh = sharding_lib.create_mesh(config)
    assert mesh.size == jax.device_count(), mesh
    assert {d.process_index for d in mesh.devices.flat} == {0, 1}
    sharding_lib.check_batch_divides(config, mesh)
    try:
      sharding_lib.check_batch_divides(tiny_config(batch_size=6), mesh)
    except ValueError as e:
      assert "4 devices" in str(e), e
    else:
      raise AssertionError("a batch of 6 on 4 devices was accepted")
    return f"process {pid} of 2, devices {jax.device_count()}"

  @check
  def multihost_global_batch():
    """Each process places its own devices' rows of the same global batch,
    and a jitted global reduction (as BatchNorm's) sees all of them."""
    mesh = sharding_lib.create_mesh(config)
    images = sharding_lib.put_global_batch(x, sharding_lib.data_sharding(mesh))
    labels = sharding_lib.put_global_batch(c, sharding_lib.data_sharding(mesh))
    assert images.shape == x.shape and not images.is_fully_addressable
    rows = []
    for shard in images.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
      rows.extend(range(*shard.index[0].indices(x.shape[0])))
    per_device = x.shape[0] // jax.device_count()
    assert len(rows) == per_device * NUM_DEVICES, rows
    weights = sharding_lib.put_replicated(
        np.arange(1.0, 11.0, dtype=np.float32), mesh
    )
    fn = jax.jit(
        lambda v, l, w: (v.mean(axis=0), (w[l] * v.sum((1, 2, 3))).sum()),
        out_shardings=sharding_lib.replicated(mesh),
    )
    mean, weighted = fn(images, labels, weights)
    np.testing.assert_allclose(
        np.asarray(mean), x.mean(axis=0), rtol=1e-5, atol=1e-6
    )
    want = float((np.arange(1.0, 11.0)[c] * x.sum((1, 2, 3))).sum())
    np.testing.assert_allclose(float(weighted), want, rtol=1e-5)
    # Arrays committed to a local device, PRNG keys included (the train
    # state, the base key), replicate over both processes' devices.
    placed = sharding_lib.put_replicated(
        {"key": jax.random.key(3), "w": jax.device_put(jnp.arange(3.0))}, mesh
    )
    for leaf in jax.tree_util.tree_leaves(placed):
      assert leaf.sharding.is_fully_replicated
      assert len(leaf.sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(placed["key"])),
        np.asarray(jax.random.key_data(jax.random.key(3))),
    )
    np.testing.assert_array_equal(np.asarray(placed["w"]), np.arange(3.0))
    return f"process {pid} holds rows {sorted(rows)}"

  if reference:

    @check
    def multihost_train_and_evaluate():
      """The training loop on 2 processes x 2 devices ends where the
      4-device single-process run (`reference`, its final state) ended."""
      run_config = tiny_config(
          num_train_steps=2,
          log_every_steps=1,
          checkpoint_every_steps=2,
          sample_every_steps=1000,
      )
      workdir = os.path.join(out_dir, "run_2hosts")
      state = train.train_and_evaluate(
          run_config, workdir, dataset=in_memory_dataset()
      )
      got = flat(host(state))
      want = dict(np.load(reference))
      compare_states("2 processes vs 1 ", got, want, run_config.optimizer)
      return (
          f"process {pid}: state after 2 steps matches the 4-device run "
          f"(max relative difference {max_rel_diff(got, want):.2g})"
      )

  jax.distributed.shutdown()


if __name__ == "__main__":
  args = [a for a in sys.argv[1:] if a != "--multihost"]
  if MULTIHOST and len(args) in (1, 2):
    multihost_main(*args)
  elif not MULTIHOST and len(args) == 1:
    main(args[0])
  else:
    sys.exit(__doc__)
