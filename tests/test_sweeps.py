"""Sweeps (`config.sweep`, `cign_jax.sweeps`): what may be swept, the
members' settings, and that member k of a sweep trains as the single run of
its settings does (the single run's step is the reference)."""

import logging
import os

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import losses
from cign_jax import models
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax.data import reader
from cign_jax.sweeps import step as step_lib
from cign_jax.sweeps import training as sweep_training
from conftest import tiny_config
import multidevice_worker  # the float32 tolerances of the multi-device checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(**swept):
  """The tiny config with config.sweep.NAME = values for each NAME__PATH
  keyword (dots written as '__')."""
  config = tiny_config()
  for name, values in swept.items():
    node = config.sweep
    *parents, leaf = name.split("__")
    for part in parents:
      node = node[part]
    node[leaf] = tuple(values)
  return config


def test_an_empty_sweep_is_a_single_run():
  config = tiny_config()
  assert not config_lib.is_sweep(config)
  assert config_lib.swept_settings(config) == {}


def test_members_zip_the_lists_or_cross_them():
  config = _sweep(seed=(0, 1, 2), optimizer__learning_rate=(1e-3, 2e-3, 3e-3))
  config_lib.validate(config)
  assert config_lib.sweep_members(config) == [
      {"seed": 0, "optimizer.learning_rate": 1e-3},
      {"seed": 1, "optimizer.learning_rate": 2e-3},
      {"seed": 2, "optimizer.learning_rate": 3e-3},
  ]
  config = _sweep(seed=(0, 1), loss__rec_weight=(20.0, 10.0, 5.0))
  with pytest.raises(ValueError, match="different numbers of values"):
    config_lib.validate(config)
  config.sweep.product = True
  members = config_lib.sweep_members(config_lib.validate(config))
  assert members == [
      {"seed": s, "loss.rec_weight": w} for s in (0, 1) for w in (20, 10, 5)
  ]


def test_a_member_config_holds_its_own_values_and_no_sweep():
  config = _sweep(seed=(3, 4), model__dropout_rate=(0.1, 0.2))
  member = config_lib.member_config(config, config_lib.sweep_members(config)[1])
  assert member.seed == 4 and member.model.dropout_rate == 0.2
  assert not config_lib.is_sweep(member)
  assert config.seed == 0  # the sweep's config is left as it was
  config_lib.validate(member)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("batch_size", "batch_size cannot be swept"),
        ("model__latent_dim", "model.latent_dim cannot be swept"),
        ("model__conditioning", "model.conditioning cannot be swept"),
        (
            "loss__num_mismatch_labels",
            "loss.num_mismatch_labels cannot be swept",
        ),
    ],
)
def test_what_changes_the_program_is_refused_by_name(setting, message):
  config = tiny_config()
  node = config.sweep
  *parents, leaf = setting.split("__")
  for part in parents:
    if part not in node:
      node[part] = type(config)()
    node = node[part]
  node[leaf] = (1, 2)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_bad_member_values_are_named():
  with pytest.raises(ValueError, match="member 1.*learning_rate: must be > 0"):
    config_lib.validate(_sweep(optimizer__learning_rate=(1e-3, -1.0)))
  with pytest.raises(ValueError, match="seed: 1.5 is not a valid value"):
    config_lib.validate(_sweep(seed=(0, 1.5)))
  with pytest.raises(ValueError, match="all be 0 or all be positive"):
    config_lib.validate(_sweep(ema_decay=(0.0, 0.9)))


def test_the_command_line_sets_a_sweep():
  """`--config.sweep.seed="(0, 1, 2, 3)"` as the train command parses it."""
  argv = [
      "main",
      f"--config={ROOT}/configs/channel_small.py",
      "--config.sweep.seed=(0, 1, 2, 3)",
      "--config.sweep.optimizer.learning_rate=(1e-3, 2e-3, 3e-3, 4e-3)",
  ]
  values = flags.FlagValues()
  # (The override flags are found in the arguments given here, as the
  # command finds them in sys.argv.)
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  config = config_lib.validate(values.config)
  assert [m["seed"] for m in config_lib.sweep_members(config)] == [0, 1, 2, 3]
  assert config_lib.sweep_members(config)[3]["optimizer.learning_rate"] == 4e-3


def test_the_command_line_names_what_cannot_be_swept():
  from cign_jax import commands  # pylint: disable=g-import-not-at-top

  line = commands._unknown_config_key(  # pylint: disable=protected-access
      ["main", "--config.sweep.model.latent_dim=(4, 8)"]
  )
  assert line.startswith("error: --config.sweep.model.latent_dim: ")
  assert "model.latent_dim cannot be swept" in line and "seed" in line
  # A typo outside the sweep keeps the general message.
  assert (
      "has no key 'batch_sise'"
      in commands._unknown_config_key(  # pylint: disable=protected-access
          ["main", "--config.batch_sise=8"]
      )
  )


def test_a_single_run_refuses_a_sweep(tmp_path, synthetic_dataset):
  with pytest.raises(ValueError, match="cign_jax.sweeps"):
    train.train_and_evaluate(
        _sweep(seed=(0, 1)), str(tmp_path), dataset=synthetic_dataset
    )


# The members of the exactness check: every kind of swept setting (the
# seed: initial state, data order, noise and dropout keys; the optimiser's
# numbers; the loss weights; the dropout rate; the average's decay; the
# training noise), three members. One wrong label per image keeps the
# mismatch batch small.
_SWEPT = dict(
    seed=(2, 0, 1),
    optimizer__learning_rate=(1e-3, 3e-3, 2e-3),
    optimizer__weight_decay=(0.01, 0.0, 0.1),
    optimizer__b1=(0.5, 0.9, 0.7),
    loss__rec_weight=(20.0, 7.0, 12.0),
    loss__tight_noise_weight=(2.5, 1.0, 4.0),
    loss__idem_mismatch_weight=(3.0, 1.0, 0.5),
    model__dropout_rate=(0.15, 0.05, 0.3),
    ema_decay=(0.9, 0.99, 0.5),
    data__train_noise_std=(0.15, 0.3, 0.05),
)
_NUM_STEPS = 3


def _exactness_sweep():
  config = _sweep(**_SWEPT)
  # The filter conditioning: its per-sample filters are the network's one
  # part that the members' axis maps over inside a convolution; the
  # channel-conditioned network is the float32 checks' below.
  config.model.conditioning = "filter"
  config.loss.num_mismatch_labels = 1
  config_lib.validate(config)
  members = [
      config_lib.member_config(config, s)
      for s in config_lib.sweep_members(config)
  ]
  return config, members


class _Float64Namespace(type(jnp)):
  """`jax.numpy` with `float32` meaning float64 (the modules cast BatchNorm
  statistics, outputs and L1 distances to float32)."""

  def __getattr__(self, name):
    return getattr(jnp, name)


@pytest.fixture
def float64(monkeypatch):
  """Float64 everywhere: x64 on, the modules' float32 casts float64."""
  namespace = _Float64Namespace("jax_numpy_float64")
  namespace.float32 = jnp.float64
  monkeypatch.setattr(models, "jnp", namespace)
  monkeypatch.setattr(losses, "jnp", namespace)
  monkeypatch.setattr(train_step_lib, "jnp", namespace)  # the average's decay

  class Linear64(models.Linear):
    dtype: object = jnp.float64

  monkeypatch.setattr(models, "Linear", Linear64)
  with jax.enable_x64(True):
    yield


def _flat(tree):
  return {
      jax.tree_util.keystr(k): np.asarray(v, np.float64)
      for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _states(members, model, dtype):
  """Each member's initial state, as its single run makes it, in dtype."""
  tx = train_step_lib.make_optimizer(members[0])
  cast = lambda t: jax.tree_util.tree_map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      t,
  )
  return [
      cast(train_step_lib.create_train_state(m, model=model, tx=tx))
      for m in members
  ]


def _batches(members, synthetic_dataset, step, dtype):
  images, labels = synthetic_dataset
  out = [
      reader.TrainBatches(images, labels, m.batch_size, m.seed).batch(step)
      for m in members
  ]
  return [(jnp.asarray(x, dtype), jnp.asarray(c)) for x, c in out]


@pytest.mark.slow
def test_members_train_as_single_runs_float64(float64, synthetic_dataset):
  """Three steps of the sweep against three steps of its last member's
  single run (its own jitted `train_step`), in float64: the loss terms,
  parameters, BatchNorm statistics, optimiser state and average agree to
  1e-10. (One member is compared, as each compiles its own single-run
  step; it is the last, whose settings all differ from the first's.)"""
  del float64
  config, members = _exactness_sweep()
  num_members = len(members)
  names = list(config_lib.swept_settings(config))
  model = models.model_from_config(members[0]).clone(dtype=jnp.float64)
  numbers = step_lib.member_numbers(members, names)
  assert all(
      v.dtype == (np.uint32 if k == "dropout_threshold" else np.float64)
      for k, v in numbers.items()
  )
  sweep_step = jax.jit(
      lambda s, x, c, k, h: step_lib.sweep_train_step(
          s, x, c, k, h, config=members[0], total_steps=_NUM_STEPS
      )
  )
  states = step_lib.stack(_states(members, model, jnp.float64))
  keys = step_lib.member_keys([m.seed for m in members])
  sweep_metrics = []
  for step in range(_NUM_STEPS):
    batches = _batches(members, synthetic_dataset, step, jnp.float64)
    states, metrics = sweep_step(
        states,
        jnp.stack([x for x, _ in batches]),
        jnp.stack([c for _, c in batches]),
        keys,
        numbers,
    )
    sweep_metrics.append(jax.device_get(metrics))
  k = num_members - 1
  member = members[k]
  single = jax.jit(train_step_lib.make_train_step(member))
  # The single run's own network (its dropout rate) and optimiser.
  own_model = models.model_from_config(member).clone(dtype=jnp.float64)
  state = _states([member], own_model, jnp.float64)[0]
  state = state.replace(tx=train_step_lib.make_optimizer(member))
  for step in range(_NUM_STEPS):
    ((x, c),) = _batches([member], synthetic_dataset, step, jnp.float64)
    state, metrics = single(state, x, c, jax.random.key(member.seed))
    for name in losses.LOSS_TERMS + ("loss",):
      want = float(metrics[name])
      got = float(sweep_metrics[step][name][k])
      assert abs(got - want) <= 1e-10 * abs(want), (step, name, got, want)
      # The other members train otherwise (their own settings and data).
      assert sweep_metrics[step]["loss"][0] != sweep_metrics[step]["loss"][k]
    assert np.all(sweep_metrics[step]["finite"] == 1.0)
  got = _flat(checkpoints.state_tree(step_lib.member(states, k)))
  want = _flat(checkpoints.state_tree(state))
  assert got.keys() == want.keys()
  for key in want:
    scale = max(np.max(np.abs(want[key])), 1e-300)
    err = np.max(np.abs(got[key] - want[key])) / scale
    assert err <= 1e-10, f"member {k} {key}: relative difference {err:.3g}"


# The sweep of the training-loop checks: two members, one compiled step.
_LOOP_SWEPT = dict(seed=(0, 1), optimizer__learning_rate=(1e-3, 2e-3))


def _member_leaves(workdir, k, step=None):
  """(step, leaves) of member k's checkpoint (default: the latest)."""
  mngr = checkpoints.manager(sweep_training.member_dir(workdir, k))
  try:
    template = train_step_lib.create_train_state(
        checkpoints.load_config(sweep_training.member_dir(workdir, k))
    )
    state = checkpoints.restore(mngr, template, step)
  finally:
    mngr.close()
  return int(state.step), [
      np.asarray(a)
      for a in jax.tree_util.tree_leaves(checkpoints.state_tree(state))
  ]


def _assert_same_leaves(a, b):
  assert a[0] == b[0]
  assert len(a[1]) == len(b[1])
  for x, y in zip(a[1], b[1]):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def uninterrupted_sweep(tmp_path_factory, synthetic_dataset):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  states = sweep_training.train_and_evaluate(
      _sweep(**_LOOP_SWEPT), workdir, dataset=synthetic_dataset
  )
  return workdir, jax.device_get(states)


def test_every_member_is_a_run_directory(uninterrupted_sweep):
  workdir, states = uninterrupted_sweep
  record = sweep_training.read_sweep(workdir)
  assert record["swept"] == ["seed", "optimizer.learning_rate"]
  assert [m["settings"] for m in record["members"]] == [
      {"seed": 0, "optimizer.learning_rate": 1e-3},
      {"seed": 1, "optimizer.learning_rate": 2e-3},
  ]
  assert record["stopped"] == {}
  assert config_lib.is_sweep(checkpoints.load_config(workdir))
  num_steps = tiny_config().num_train_steps
  for k, (seed, lr) in enumerate([(0, 1e-3), (1, 2e-3)]):
    run = sweep_training.member_dir(workdir, k)
    member = checkpoints.load_config(run)
    assert (member.seed, member.optimizer.learning_rate) == (seed, lr)
    assert not config_lib.is_sweep(member)
    files = os.listdir(run)
    assert "samples.png" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert sorted(
        int(s) for s in os.listdir(os.path.join(run, "checkpoints"))
    ) == [2, 4, 6]
    # The readers of a run read a member as they read any run.
    _, _, variables, step = checkpoints.load_model(run)
    assert step == num_steps
    want = step_lib.member(
        {"params": states.params, "batch_stats": states.batch_stats}, k
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(want)
    ):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Each member trained on its own: other seeds, other parameters.
  assert not np.array_equal(
      np.asarray(jax.tree_util.tree_leaves(states.params)[0][0]),
      np.asarray(jax.tree_util.tree_leaves(states.params)[0][1]),
  )


@pytest.fixture(scope="module")
def one_step_sweep(tmp_path_factory, synthetic_dataset):
  """The loop sweep's first step, on this process's one device: (config,
  stacked states on the host)."""
  config = _sweep(**_LOOP_SWEPT)
  config.num_train_steps = 1
  states = sweep_training.train_and_evaluate(
      config,
      str(tmp_path_factory.mktemp("one_step_sweep")),
      dataset=synthetic_dataset,
  )
  return config, jax.device_get(states)


def test_a_member_trains_as_its_single_run_float32(
    one_step_sweep, tmp_path, synthetic_dataset
):
  """Member 1's first step in the training loop (its initial state, data
  order, keys and learning rate) against its single run's, within the
  float32 tolerances of the multi-device checks
  (`multidevice_worker.compare_states`)."""
  config, states = one_step_sweep
  member = config_lib.member_config(config, config_lib.sweep_members(config)[1])
  single = train.train_and_evaluate(
      member, str(tmp_path / "single"), dataset=synthetic_dataset
  )
  got = multidevice_worker.flat(step_lib.member(states, 1))
  want = multidevice_worker.flat(jax.device_get(single))
  multidevice_worker.compare_states("member 1", got, want, member.optimizer)
  # Member 0 is another run (seed 0): far outside those tolerances.
  other = multidevice_worker.flat(step_lib.member(states, 0))
  with pytest.raises(AssertionError):
    multidevice_worker.compare_states("member 0", other, want, member.optimizer)


# The sweep's first step on 4 simulated CPU devices: a 2 x 2 mesh, the
# members along its 'members' axis (one on each row) and each member's batch
# split along its 'data' axis, as a single run's is (test_multidevice.py).
_MULTIDEVICE = """
import os, sys
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4"
)
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, {tests!r})
import fast_compile
fast_compile.apply()
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import synthetic
from cign_jax.configs import quick
from cign_jax.sweeps import training
config = quick.get_config("tiny")
config.sweep.seed = (0, 1)
config.sweep.optimizer.learning_rate = (1e-3, 2e-3)
config.num_train_steps = 1
config.mesh_shape = (2, 2)
config.mesh_axis_names = ("members", "data")
states = training.train_and_evaluate(
    config, {workdir!r}, dataset=synthetic.dataset()
)
leaf = jax.tree_util.tree_leaves(states.params)[0]
assert leaf.sharding.spec == P("members"), leaf.sharding
assert len(leaf.sharding.device_set) == 4
assert leaf.addressable_shards[0].data.shape[0] == 1  # one member each
from cign_jax import sharding
from cign_jax.sweeps import step
batch = step.member_batch_sharding(sharding.create_mesh(config))
assert batch.spec == P("members", ("data",)), batch.spec
np.savez({out!r}, **{{
    jax.tree_util.keystr(k): np.asarray(v)
    for k, v in jax.tree_util.tree_leaves_with_path(
        jax.device_get(states)
    )
}})
print("MEMBERS_ALONG_THE_MESH_OK")
"""


@pytest.mark.slow
def test_members_along_a_mesh_axis(one_step_sweep, tmp_path):
  """Members laid along the 'members' axis of a 2 x 2 mesh of simulated
  devices, each member's batch split over its 'data' axis, train as on one
  device, within the float32 tolerances of the multi-device checks (the
  split batch sums BatchNorm's gradients in another order)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "states.npz")
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = " ".join(
      f
      for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f
  )
  script = _MULTIDEVICE.format(
      tests=os.path.join(ROOT, "tests"),
      workdir=str(tmp_path / "sweep"),
      out=out,
  )
  proc = subprocess.run(
      [sys.executable, "-c", script],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert "MEMBERS_ALONG_THE_MESH_OK" in proc.stdout, proc.stderr[-3000:]
  config, states = one_step_sweep
  stored = np.load(out)
  for k in (0, 1):
    want = multidevice_worker.flat(step_lib.member(states, k))
    got = {key: stored[key][k] for key in _stacked_keys(states)}
    member = config_lib.member_config(
        config, config_lib.sweep_members(config)[k]
    )
    multidevice_worker.compare_states(
        f"member {k}", _as_state_keys(got, states), want, member.optimizer
    )


def _stacked_keys(states):
  return [
      jax.tree_util.keystr(k)
      for k, _ in jax.tree_util.tree_leaves_with_path(states)
  ]


def _as_state_keys(by_state_path, states):
  """{state-path: array} as `multidevice_worker.flat` names a state's
  arrays (its checkpoint tree's paths)."""
  tree = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(states),
      [by_state_path[k] for k in _stacked_keys(states)],
  )
  return multidevice_worker.flat(tree)


def test_a_stopped_sweep_resumes_as_the_uninterrupted_one(
    uninterrupted_sweep, tmp_path, synthetic_dataset
):
  """Stopped after its first step (time limit), then resumed by the same
  call, a sweep ends bit for bit where the uninterrupted one does; also
  when a member's last checkpoint is missing (a stop while the members were
  saved): the members resume from the last step they all have."""
  reference, _ = uninterrupted_sweep
  workdir = str(tmp_path / "sweep")
  config = _sweep(**_LOOP_SWEPT)
  sweep_training.train_and_evaluate(
      config, workdir, dataset=synthetic_dataset, time_limit_seconds=0
  )
  for k in (0, 1):
    assert _member_leaves(workdir, k)[0] == 1
  # As if stopped while member 1's checkpoint was written: none of its.
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(
      os.path.join(sweep_training.member_dir(workdir, 1), "checkpoints", "1")
  )
  sweep_training.train_and_evaluate(config, workdir, dataset=synthetic_dataset)
  for k in (0, 1):
    _assert_same_leaves(
        _member_leaves(workdir, k), _member_leaves(reference, k)
    )


def test_a_diverging_member_stops_and_the_others_go_on(
    uninterrupted_sweep, tmp_path, synthetic_dataset, caplog
):
  """A member whose learning rate blows it up is stopped and recorded in
  sweep.json, its last good checkpoint kept; the other member trains on to
  the end, as it does beside a member that does not diverge."""
  reference, _ = uninterrupted_sweep
  workdir = str(tmp_path / "sweep")
  # (At 2e3 the tiny network's step overflows after a few good steps; at
  # 1e4 and above the first step's state already samples non-finite
  # images, before any checkpoint.)
  config = _sweep(seed=(0, 1), optimizer__learning_rate=(1e-3, 2e3))
  config.checkpoint_every_steps = 1
  caplog.set_level(logging.INFO, logger="absl")
  sweep_training.train_and_evaluate(config, workdir, dataset=synthetic_dataset)
  stopped = sweep_training.read_sweep(workdir)["stopped"]
  # The progress lines show each member's loss, then the stopped member.
  progress = [
      r.getMessage() for r in caplog.records if "| loss [0]" in r.getMessage()
  ]
  assert progress and "[1] " in progress[0]
  assert "[1] stopped" in progress[-1] and "[0] stopped" not in progress[-1]
  assert list(stopped) == ["1"]
  run = sweep_training.member_dir(workdir, 1)
  steps = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")))
  assert steps and stopped["1"]["last_checkpoint"] == steps[-1]
  assert all(s < stopped["1"]["step"] for s in steps)
  assert "samples.png" not in os.listdir(run)
  assert "samples.png" in os.listdir(sweep_training.member_dir(workdir, 0))
  _assert_same_leaves(_member_leaves(workdir, 0), _member_leaves(reference, 0))
  # The same command again: the stopped member stays stopped, and the
  # finished one has nothing left to do.
  sweep_training.train_and_evaluate(config, workdir, dataset=synthetic_dataset)
  assert list(sweep_training.read_sweep(workdir)["stopped"]) == ["1"]


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_every_sweepable_setting_enters_one_step(optimizer):
  """A sweep of every setting of config.SWEEPABLE at once, with the cosine
  schedule, traces into one step (jax.eval_shape: no compile) whose
  outputs are the members' (K,) metrics and states."""
  config = tiny_config()
  config.optimizer.name = optimizer
  config.optimizer.lr_schedule = "cosine"
  base = config_lib.base_config()
  for name in config_lib.SWEEPABLE:
    *parents, leaf = name.split(".")
    node, ref = config.sweep, base
    for part in parents:
      node, ref = node[part], ref[part]
    value = ref[leaf]
    node[leaf] = (value, value + (1 if name == "seed" else 0.5 * value or 0.1))
  config.sweep.model.dropout_rate = (0.1, 0.2)
  config.sweep.ema_decay = (0.9, 0.99)
  config.sweep.optimizer.b1 = (0.5, 0.9)
  config.sweep.optimizer.b2 = (0.999, 0.99)
  config_lib.validate(config)
  members = [
      config_lib.member_config(config, s)
      for s in config_lib.sweep_members(config)
  ]
  names = list(config_lib.swept_settings(config))
  assert names == list(config_lib.SWEEPABLE)
  model = models.model_from_config(members[0])
  tx = train_step_lib.make_optimizer(members[0], 6)
  states = step_lib.stack(
      [
          train_step_lib.create_train_state(m, model=model, tx=tx)
          for m in members
      ]
  )
  x = jnp.zeros((2, config.batch_size, 28, 28, 1), jnp.float32)
  c = jnp.zeros((2, config.batch_size), jnp.int32)
  new, metrics = jax.eval_shape(
      lambda s, x, c, k, h: step_lib.sweep_train_step(
          s, x, c, k, h, config=members[0], total_steps=6
      ),
      states,
      x,
      c,
      step_lib.member_keys([m.seed for m in members]),
      step_lib.member_numbers(members, names),
  )
  assert metrics["loss"].shape == (2,)
  assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(
      states
  )
