"""The device mesh and where arrays live on it (data parallelism).

A mesh with one axis, `data`, over every device of every process (once
`initialize_distributed` has run); parameters and optimiser state are
replicated, the global batch is split over the devices. Every host computes
the same global batch and places only the rows of its own devices
(`put_global_batch`).
"""

from __future__ import annotations

import math
import os

# The environment is the command line's: a bad value is a usage error.
from absl import app
from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np


def initialize_distributed(multihost=None, environ=None) -> bool:
  """`jax.distributed.initialize()` when asked for; True if it ran.

  Must run before JAX touches a device (so before the imports of cign_jax's
  training modules, which may create arrays).
  """
  environ = os.environ if environ is None else environ
  if multihost is None:
    multihost = bool(environ.get("JAX_COORDINATOR_ADDRESS"))
  if not multihost:
    return False
  kwargs = {}
  for key, name in (
      ("num_processes", "JAX_NUM_PROCESSES"),
      ("process_id", "JAX_PROCESS_ID"),
  ):
    value = environ.get(name, "")
    if value:
      try:
        kwargs[key] = int(value)
      except ValueError:
        raise app.UsageError(
            f"{name} must be an integer, got {value!r}"
        ) from None
  coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  jax.distributed.initialize(**kwargs)
  logging.info(
      "jax.distributed: process %d of %d, %d local and %d global " "devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
  return True


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of `config.mesh_shape` (-1: all devices)."""
  devices = jax.devices()
  shape = list(config.mesh_shape)
  if shape.count(-1) > 1:
    raise ValueError("config.mesh_shape: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"config.mesh_shape {tuple(config.mesh_shape)} does not "
        f"cover the {len(devices)} devices"
    )
  names = tuple(config.mesh_axis_names)
  try:
    return jax.make_mesh(
        tuple(shape),
        names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
    )
  except (AttributeError, TypeError):  # older JAX without axis_types
    return jax.sharding.Mesh(np.array(devices).reshape(shape), names)


def data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divides(config, mesh):
  n = mesh.size
  if config.batch_size % n:
    raise ValueError(
        f"config.batch_size {config.batch_size} does not divide "
        f"by the {n} devices of the mesh; choose a multiple of "
        f"{n}"
    )


def put_global_batch(array: np.ndarray, sharding: NamedSharding):
  """Places a global batch (the same numpy array on every host) sharded."""
  return jax.make_array_from_callback(
      array.shape, sharding, lambda index: array[index]
  )


def put_replicated(tree, mesh):
  """Places `tree` (the same values in every process) replicated over the
  mesh. With several processes the values go through host memory: JAX does
  not device_put an array committed to one local device onto the devices of
  other processes, but does place host (numpy) values on them."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(leaf):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    ):
      return jax.random.wrap_key_data(
          put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf)
      )
    return jax.device_put(np.asarray(jax.device_get(leaf)), sharding)

  return jax.tree_util.tree_map(put, tree)
