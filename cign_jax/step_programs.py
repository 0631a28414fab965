"""The compiled train steps a process keeps, one per step configuration.

jax.jit keeps a traced and compiled step per argument structure, and the
train state's structure holds the network's `apply` and the optimiser,
which compare by identity; a new run builds new ones, so without this it
would trace its step again and load it from the persistent compilation
cache, several times slower to start (docs/performance.md, "The test
suite"). So a second run in the same process (a notebook's resumed run, runs
over seeds, the tests) starts its first step at once.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any, NamedTuple

import jax

from cign_jax import models
from cign_jax import sharding
from cign_jax import train_step as train_step_lib
from cign_jax.kernels import native_conv


def compile_train_step(config, mesh):
  """The jitted step with the mesh's shardings; the state is donated."""
  step = train_step_lib.make_train_step(config)
  repl, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(
      step,
      in_shardings=(repl, batch, batch, repl),
      out_shardings=(repl, repl),
      donate_argnums=(0,),
  )


class StepProgram(NamedTuple):
  """The network, optimiser and jitted step of a run (`get`)."""

  model: Any
  tx: Any
  step_fn: Any


# The step programs of this process's runs, most recently used last; a lock,
# since runs may start from several threads.
_PROGRAMS: "collections.OrderedDict[Any, StepProgram]" = (
    collections.OrderedDict()
)
_KEPT = 4
_LOCK = threading.Lock()


def signature(config, mesh, total_steps: int):
  """Everything the compiled train step depends on: the network, the loss,
  the optimiser (and the run's length, which a cosine schedule reads), the
  training noise, the parameter average, the batch, the precision, the mesh,
  and whether the C++ conv kernels are used (chosen when the step is
  traced). Not the seed (the step's key is an argument), nor how long or
  how often a run logs, samples, evaluates or saves."""
  parts = {
      "model": config.model.to_dict(),
      "loss": config.loss.to_dict(),
      "optimizer": config.optimizer.to_dict(),
      "schedule_steps": (
          None
          if config.optimizer.lr_schedule == "constant"
          else int(total_steps)
      ),
      "train_noise_std": config.data.train_noise_std,
      "ema_decay": config.ema_decay,
      "batch_size": config.batch_size,
      "compute_dtype": config.compute_dtype,
      "matmul_precision": config.matmul_precision,
  }
  # The kernels are asked about only where the step's convolutions would use
  # them (`ops`: CPU), so that a GPU run does not build them.
  native = native_conv.available() if jax.default_backend() == "cpu" else None
  return json.dumps(parts, sort_keys=True, default=repr), mesh, native


def get(config, mesh, total_steps: int) -> StepProgram:
  """The model, optimiser and jitted step for `config` on `mesh`, the same
  objects for every run of this process with the same `signature`. The
  last few programs are kept, with their compiled executables; `forget`
  drops them."""
  key = signature(config, mesh, total_steps)
  with _LOCK:
    program = _PROGRAMS.get(key)
    if program is None:
      program = StepProgram(
          model=models.model_from_config(config),
          tx=train_step_lib.make_optimizer(config, total_steps),
          step_fn=compile_train_step(config, mesh),
      )
      _PROGRAMS[key] = program
      while len(_PROGRAMS) > _KEPT:
        _PROGRAMS.popitem(last=False)
    _PROGRAMS.move_to_end(key)
    return program


def forget():
  """Drops the step programs `get` keeps, so that the next run builds its
  network, optimiser and step from the code as it is now (after a module
  was reloaded or patched in a running process)."""
  with _LOCK:
    _PROGRAMS.clear()
