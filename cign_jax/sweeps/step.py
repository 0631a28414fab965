"""The train step of a sweep: `train_step.train_step` vmapped over members.

The members' states are stacked on a leading axis (`stack`); the settings
they differ in (config.SWEEPABLE) enter the step as per-member arrays
(`member_numbers`), so one compiled program serves every member: the loss
weights and the smooth clamp's scale in the loss's arithmetic, the
optimiser's numbers in an optimiser built inside the step from them, the
training noise's scale, the average's decay, and the dropout rate as the
mask's integer threshold and the kept elements' divisor (computed on the
host as a single run computes its constants, so that a member's masks are
the single run's). Settings a sweep does not vary stay the single run's
Python constants, so a member's step does the single run's arithmetic.

The C++ CPU conv kernels (`cign_jax.kernels.native_conv`) declare
`vmap_method='sequential'`: under vmap each kernel call runs once per
member, in a loop, with each member's arrays, so a member's convolutions
are a single run's. XLA's convolutions (float64, other backends) are
batched over the members instead.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
from typing import Any, Dict, List, NamedTuple, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import losses
from cign_jax import models
from cign_jax import step_programs
from cign_jax import train_step as train_step_lib

# The swept settings the loss reads, by their LossConfig names.
_LOSS_FIELDS = {
    "loss.rec_weight": "rec_weight",
    "loss.idem_noise_weight": "idem_noise_weight",
    "loss.tight_noise_weight": "tight_noise_weight",
    "loss.idem_mismatch_weight": "idem_mismatch_weight",
    "loss.tight_mismatch_weight": "tight_mismatch_weight",
    "loss.tightness_clamp_a": "tightness_clamp_a",
}
_OPTIMIZER_FIELDS = ("learning_rate", "b1", "b2", "eps", "weight_decay")
_DROPOUT_THRESHOLD, _DROPOUT_KEEP = "dropout_threshold", "dropout_keep"


def member_numbers(
    members: Sequence[ml_collections.ConfigDict], names: Sequence[str]
) -> Dict[str, np.ndarray]:
  """{name: (K,) array} of the swept settings `names` the step reads (the
  seed is not one: it makes the members' keys and initial states). Floats
  in JAX's default float type (float64 when x64 is enabled)."""
  dtype = jnp.result_type(float)
  out = {}
  for name in names:
    if name == "seed":
      continue
    values = [_get(m, name) for m in members]
    if name in config_lib.SWEPT_ZERO_OR_POSITIVE and not any(values):
      continue  # all 0: that part of the step is off, as in a single run
    if name == "model.dropout_rate":
      out[_DROPOUT_THRESHOLD] = np.asarray(
          [dropout_lib.keep_threshold(1.0 - r) for r in values], np.uint32
      )
      out[_DROPOUT_KEEP] = np.asarray([1.0 - r for r in values], dtype)
    else:
      out[name] = np.asarray(values, dtype)
  return out


def _get(config, name: str):
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def sweep_train_step(
    states: train_step_lib.TrainState,
    images,
    labels,
    base_keys,
    numbers: Dict[str, Any],
    *,
    config: ml_collections.ConfigDict,
    total_steps: int,
):
  """One step of every member: `train_step.train_step` vmapped over the
  leading axis of the states, batches (K, B, ...), keys (K,) and per-member
  numbers (`member_numbers`). `config` gives what the members share (any
  member's config). Returns the new states and the metrics, each (K,)."""
  loss_cfg = losses.LossConfig.from_config(config)
  o = config.optimizer

  def one(state, x, c, key, h):
    cfg = loss_cfg._replace(
        **{field: h[name] for name, field in _LOSS_FIELDS.items() if name in h}
    )
    opt = {k: h.get(f"optimizer.{k}", o[k]) for k in _OPTIMIZER_FIELDS}
    tx = train_step_lib.optimizer(
        o.get("name", "adamw"),
        train_step_lib.schedule(
            opt["learning_rate"], o.lr_schedule, total_steps
        ),
        b1=opt["b1"],
        b2=opt["b2"],
        eps=opt["eps"],
        weight_decay=opt["weight_decay"],
    )
    rate = (
        dropout_lib.per_member_rate(h[_DROPOUT_THRESHOLD], h[_DROPOUT_KEEP])
        if _DROPOUT_THRESHOLD in h
        else contextlib.nullcontext()
    )
    with rate:
      new, metrics = train_step_lib.train_step(
          state.replace(tx=tx),
          x,
          c,
          key,
          cfg,
          h.get("data.train_noise_std", float(config.data.train_noise_std)),
          h.get("ema_decay", float(config.ema_decay)),
      )
    # The member's optimiser closes over traced numbers: the state leaves
    # with the shared one (only its arrays differ between members).
    return new.replace(tx=state.tx), metrics

  return jax.vmap(one)(states, images, labels, base_keys, numbers)


# The mesh axis that members may be laid along (`config.mesh_axis_names`):
# each device then holds its members' states, and the other axes split each
# member's batch (data parallelism within a member).
MEMBERS_AXIS = "members"


def _member_axis(mesh):
  return MEMBERS_AXIS if MEMBERS_AXIS in mesh.axis_names else None


def _data_axes(mesh):
  return tuple(n for n in mesh.axis_names if n != MEMBERS_AXIS)


def member_sharding(mesh) -> NamedSharding:
  """The members' states, keys and numbers (leading axis K): split along
  the mesh's 'members' axis when it has one, else on every device."""
  return NamedSharding(mesh, P(_member_axis(mesh)))


def member_batch_sharding(mesh) -> NamedSharding:
  """The members' batches (K, B, ...): members along the 'members' axis
  (if any), each member's batch split over the other axes."""
  data = _data_axes(mesh)
  return NamedSharding(mesh, P(_member_axis(mesh), data if data else None))


def check_fits(config, num_members: int, mesh):
  """The members divide over the 'members' axis and each member's batch
  over the others, or a ValueError saying what would."""
  shape = dict(zip(mesh.axis_names, mesh.devices.shape))
  along = shape.get(MEMBERS_AXIS, 1)
  if num_members % along:
    raise ValueError(
        f"the sweep's {num_members} members do not divide over the "
        f"{along} devices of the mesh's '{MEMBERS_AXIS}' axis; give a "
        f"multiple of {along} members or another config.mesh_shape"
    )
  per_member = mesh.size // along
  if config.batch_size % per_member:
    raise ValueError(
        f"config.batch_size {config.batch_size} does not divide by the "
        f"{per_member} devices a member's batch is split over; choose a "
        f"multiple of {per_member}"
    )


def put_members(tree, mesh):
  """Places the members' stacked pytree (one process) as
  `member_sharding`."""
  return jax.device_put(tree, member_sharding(mesh))


def stack(trees: Sequence[Any]) -> Any:
  """The members' pytrees (one structure) stacked on a leading axis."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: Any, k: int) -> Any:
  """Member k's slice of a stacked pytree."""
  return jax.tree_util.tree_map(lambda a: a[k], tree)


def member_keys(seeds: Sequence[int]):
  """The members' step keys, jax.random.key(seed) of each, stacked (K,)."""
  return jax.random.wrap_key_data(
      jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
  )


class SweepProgram(NamedTuple):
  """The network, shared optimiser (its structure; the step builds each
  member's from its numbers) and jitted step of a sweep (`get`)."""

  model: Any
  tx: Any
  step_fn: Any


_PROGRAMS: "collections.OrderedDict[Any, SweepProgram]" = (
    collections.OrderedDict()
)
_KEPT = 2
_LOCK = threading.Lock()


def get(
    members: List[ml_collections.ConfigDict],
    names: Sequence[str],
    mesh,
    total_steps: int,
) -> SweepProgram:
  """The sweep's model, optimiser and jitted step (the states, keys,
  numbers and metrics as `member_sharding`, the batches as
  `member_batch_sharding`, the states
  donated), the same objects for the process's next sweep of the same
  program (`step_programs.signature` of the first member, the swept names
  and the number of members)."""
  first = members[0]
  key = (
      step_programs.signature(first, mesh, total_steps),
      tuple(names),
      len(members),
  )
  with _LOCK:
    program = _PROGRAMS.get(key)
    if program is None:
      step = functools.partial(
          sweep_train_step, config=first, total_steps=total_steps
      )
      members_, batch = member_sharding(mesh), member_batch_sharding(mesh)
      program = SweepProgram(
          model=models.model_from_config(first),
          tx=train_step_lib.make_optimizer(first, total_steps),
          step_fn=jax.jit(
              step,
              in_shardings=(members_, batch, batch, members_, members_),
              out_shardings=(members_, members_),
              donate_argnums=(0,),
          ),
      )
      _PROGRAMS[key] = program
      while len(_PROGRAMS) > _KEPT:
        _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return program


def forget():
  """Drops the kept sweep programs (`step_programs.forget`'s twin)."""
  with _LOCK:
    _PROGRAMS.clear()
