"""Stopping a training before its last step: on SIGTERM or a time limit.

On SIGTERM (what preemptible VMs and SLURM's time limit send before
SIGKILL) the loop finishes the step in flight, saves a checkpoint of it and
raises `StoppedBySignal`; a time limit stops the same way and returns. With
several processes, every one stops after the same step (`StopAgreement`).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import run_dir
from cign_jax import sharding


class StoppedBySignal(Exception):
  """Training stopped on SIGTERM, its last step saved; the same call (or
  command) resumes from there.

  Attributes:
    step: the step of the checkpoint to resume from; None when the signal
      came before the first step of a run without a checkpoint.
    exit_code: 143 (128 + SIGTERM), the exit status of a process ended by
      SIGTERM, which schedulers read as "preempted" (SLURM requeues on it
      with --requeue); the train command exits with it.
  """

  exit_code = 143

  def __init__(self, step: Optional[int]):
    self.step = step
    if step is None:
      message = (
          "stopped by SIGTERM before the first step; nothing to save; "
          "run the same command to start"
      )
    else:
      message = (
          f"stopped by SIGTERM at step {step}; checkpoint saved; run "
          "the same command to resume"
      )
    super().__init__(message)


# Why the loop stops before its last step, ordered: SIGTERM outranks the
# time limit when processes disagree.
GO_ON, OUT_OF_TIME, SIGTERM = 0, 1, 2


def wish(t_begin: float, time_limit_seconds: Optional[float]) -> int:
  """This process's wish after a step: SIGTERM when the signal came (within
  `run_dir.noting_sigterm`), OUT_OF_TIME past the time limit, else GO_ON."""
  if run_dir.sigterm_received():
    return SIGTERM
  if (
      time_limit_seconds is not None
      and time.time() - t_begin >= time_limit_seconds
  ):
    return OUT_OF_TIME
  return GO_ON


class StopAgreement:
  """Whether to stop, decided alike by every process.

  Each process sees its own signals and clock; were one to stop while
  another runs the next step, the other would wait forever in that step's
  collectives. So with several processes the decision is the maximum of
  every process's wish, taken by a one-number all-reduce over the mesh
  that is dispatched after a step and read after the next one (it runs
  behind the step in flight, so reading it does not wait for that step,
  and the loop keeps one step queued): they stop one step after the wish,
  all after the same step. A single process decides at once, at no cost.
  """

  def __init__(self, mesh):
    self._mesh = mesh
    self._several = jax.process_count() > 1
    self._in_flight = None
    if self._several:
      self._max = jax.jit(jnp.max, out_shardings=sharding.replicated(mesh))

  def _reduce(self, wish_now: int):
    # One value per device; each process fills its own devices' with its
    # wish.
    local = np.full((self._mesh.size,), wish_now, np.int32)
    return self._max(
        sharding.put_global_batch(local, sharding.data_sharding(self._mesh))
    )

  @staticmethod
  def _read(value) -> int:
    return int(np.asarray(value.addressable_data(0)))

  def now(self, wish_now: int) -> int:
    """Everyone's decision on `wish_now`, waiting for the all-reduce (used
    before the first step, when no step is queued)."""
    return self._read(self._reduce(wish_now)) if self._several else wish_now

  def after_step(self, wish_now: int) -> int:
    """The decision after a step: the wish itself (one process), or
    everyone's wishes given after the previous step (several)."""
    if not self._several:
      return wish_now
    previous, self._in_flight = self._in_flight, self._reduce(wish_now)
    return GO_ON if previous is None else self._read(previous)
