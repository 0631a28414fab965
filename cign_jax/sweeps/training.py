"""The training loop of a sweep: K members in one jitted step.

`train_and_evaluate(config, workdir)` trains every member of
`config.sweep` (`config.sweep_members`) for the config's steps, resuming
from their checkpoints. Member k is a run of its own in
WORKDIR/members/<k>/: its config.json holds its own settings (no sweep),
and it has its checkpoints, best checkpoint, validation and in-loop
evaluation records, TensorBoard events and samples.png, so that `sample`,
`evaluate` and `checkpoints.load_model` read it as any run. It trains as the
single run of its config would: its data order (`reader.TrainBatches` of its
seed), its keys (from its seed) and its settings (`sweeps.step`).
WORKDIR/config.json holds the sweep's config and WORKDIR/sweep.json the
members, their settings, and the members stopped by a non-finite step.

A member whose step is not finite (or whose state samples non-finite
images) is stopped: it is neither evaluated nor checkpointed again, its last
good checkpoint is kept, sweep.json says why, and the others go on (its
slice of the stacked state is still computed, as the program is shared).
When every member has stopped, `train.NonFiniteLossError` is raised.

Stopping (SIGTERM, time_limit_seconds) saves every member's checkpoint of
the step reached, as a single run does; the same command resumes all
members from the latest step every running member has a checkpoint of.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling
from cign_jax import sharding
from cign_jax import stopping
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import validation
from cign_jax.data import reader
from cign_jax.sweeps import step as step_lib

MEMBERS_DIR = "members"
SWEEP_FILE = "sweep.json"


def member_dir(workdir: str, k: int) -> str:
  """Member k's run directory in the sweep's WORKDIR."""
  return os.path.join(workdir, MEMBERS_DIR, str(k))


def read_sweep(workdir: str) -> Optional[Dict[str, Any]]:
  """WORKDIR/sweep.json (None when there is none): {'members': [{'index',
  'dir', 'settings'}], 'swept': [names], 'product': bool, 'stopped':
  {k: {'step', 'reason', 'last_checkpoint'}}}."""
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_sweep(workdir, config, settings, stopped):
  record = {
      "swept": list(config_lib.swept_settings(config)),
      "product": bool(config.sweep.product),
      "members": [
          {
              "index": k,
              "dir": os.path.join(MEMBERS_DIR, str(k)),
              "settings": s,
          }
          for k, s in enumerate(settings)
      ],
      "stopped": {str(k): v for k, v in sorted(stopped.items())},
  }
  run_dir.atomic_write_text(
      os.path.join(workdir, SWEEP_FILE), json.dumps(record, indent=2)
  )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Optional[Any] = None,
    evaluator: Optional[Callable[..., Dict[str, float]]] = None,
    time_limit_seconds: Optional[float] = None,
) -> train_step_lib.TrainState:
  """Trains (or resumes) the sweep of `config` in `workdir`; the arguments
  are `train.train_and_evaluate`'s (one evaluator serves every member: what
  it computes is not swept). Returns the members' states, stacked."""
  t_begin = time.time()
  config = config_lib.validate(config)
  if not config_lib.is_sweep(config):
    raise ValueError(
        "config.sweep is empty: a single run trains with "
        "cign_jax.train.train_and_evaluate"
    )
  # Every check before the first write (a refused start changes nothing).
  # The data first: their image shape and classes fill the config's unset
  # fields, which every member inherits.
  config, images, labels, val_split = train.load_training_data(
      config, dataset, evaluator
  )
  settings = config_lib.sweep_members(config)
  members = [config_lib.member_config(config, s) for s in settings]
  train._check_resume_config(workdir, config)  # pylint: disable=protected-access
  for k, member in enumerate(members):
    train._check_resume_config(member_dir(workdir, k), member)  # pylint: disable=protected-access
  mesh = sharding.create_mesh(config)
  step_lib.check_fits(config, len(members), mesh)
  if jax.process_count() > 1:
    raise ValueError(
        "a sweep trains in one process (its devices may be several); "
        "train its members as separate runs on several hosts"
    )
  batches = [
      reader.TrainBatches(images, labels, config.batch_size, m.seed)
      for m in members
  ]
  total_steps = train_step_lib.total_train_steps(
      config, batches[0].num_examples
  )
  lock = run_dir.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    with run_dir.noting_sigterm():
      return _Sweep(
          config, workdir, members, settings, mesh, total_steps, val_split
      ).train(batches, evaluator, t_begin, time_limit_seconds)
  finally:
    if lock is not None:
      lock.release()


def _member_state(states, k):
  """Member k's state on the host: its slice may live on any device of the
  mesh (members along its 'members' axis), and what reads it (sampling,
  evaluation, checkpoints) places it where it computes."""
  return jax.device_get(step_lib.member(states, k))


class _Member:
  """One member's run directory: config, checkpoints, records, writer."""

  def __init__(self, k, config, workdir):
    self.k, self.config, self.workdir = k, config, workdir
    self.mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
    self.evaluations = self.writer = None

  def open(self, start):
    self.evaluations, self.writer = train._open_records(  # pylint: disable=protected-access
        self.config, self.workdir, start
    )

  def save(self, state):
    step = int(jax.device_get(state.step))
    # A step saved before a stop that came while the members were saved
    # (resumed from an earlier common step) holds the same state: kept.
    if step not in self.mngr.all_steps():
      checkpoints.save(self.mngr, state)
    self.evaluations.commit()

  def close(self):
    if self.writer is not None:
      self.writer.flush()
      self.evaluations.close()
    self.mngr.close()


class _Sweep:
  """The sweep's loop (`train_and_evaluate`), once the checks passed."""

  def __init__(
      self, config, workdir, members, settings, mesh, total_steps, val_split
  ):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.members, self.settings = members, settings
    self.total_steps, self.val_split = total_steps, val_split
    self.names = list(config_lib.swept_settings(config))
    previous = read_sweep(workdir) or {}
    self.stopped = {
        int(k): v for k, v in (previous.get("stopped") or {}).items()
    }
    self.program = step_lib.get(members, self.names, mesh, total_steps)
    self.runs = [
        _Member(k, m, member_dir(workdir, k)) for k, m in enumerate(members)
    ]

  def active(self) -> List[int]:
    return [k for k in range(len(self.members)) if k not in self.stopped]

  def _restore(self):
    """The members' states at the latest step every running member has a
    checkpoint of (step 0 when there is none), stopped members at their
    last checkpoint."""
    common = None
    for k in self.active():
      steps = set(self.runs[k].mngr.all_steps())
      common = steps if common is None else common & steps
    start = max(common) if common else None
    states = []
    for k, (member, run) in enumerate(zip(self.members, self.runs)):
      state = train_step_lib.create_train_state(
          member, model=self.program.model, tx=self.program.tx
      )
      step = start if k not in self.stopped else run.mngr.latest_step()
      if step is not None:
        state = checkpoints.restore(run.mngr, state, step)
      states.append(state)
    if start is not None:
      logging.info(
          "Resumed the %d members from their checkpoints of step %d in %s",
          len(self.members),
          start,
          self.workdir,
      )
    return step_lib.stack(states), start or 0

  def _stop_member(self, k, step, reason):
    """Stops member k (its last good checkpoint kept) and records why;
    raises when no member is left."""
    last = self.runs[k].mngr.latest_step()
    self.stopped[k] = {"step": step, "reason": reason, "last_checkpoint": last}
    logging.warning(
        "Member %d (%s) stopped at step %d: %s; its last good checkpoint "
        "(%s) is kept, the other members go on",
        k,
        self.settings[k],
        step,
        reason,
        "none" if last is None else f"step {last}",
    )
    if jax.process_index() == 0:
      _write_sweep(self.workdir, self.config, self.settings, self.stopped)
    if not self.active():
      raise train.NonFiniteLossError(
          f"every member of the sweep in {self.workdir} stopped on a "
          f"non-finite step ({SWEEP_FILE} says where and why); lower the "
          "learning rates or check the data"
      )

  def _check_finite(self, pending):
    for step_done, metrics in pending:
      finite = np.asarray(jax.device_get(metrics["finite"]))
      for k in self.active():
        if not finite[k]:
          self._stop_member(
              k,
              step_done,
              "non-finite loss, gradient, parameters or BatchNorm statistics "
              f"at step {step_done} (that step was not applied)",
          )
    pending.clear()

  def _log(self, done, metrics, t_last, images):
    values = jax.device_get(metrics)
    now = time.time()
    ips = images / max(now - t_last, 1e-9)
    for k in self.active():
      scalars = {
          name: float(v[k]) for name, v in values.items() if name != "finite"
      }
      scalars["images_per_second"] = ips
      self.runs[k].writer.write_scalars(done, scalars)
    logging.info(
        "step %d/%d | loss %s | %.1f images/s",
        done,
        self.total_steps,
        " ".join(
            f"[{k}] {float(values['loss'][k]):.4f}"
            if k in self.active()
            else f"[{k}] stopped"
            for k in range(len(self.members))
        ),
        ips,
    )

  def train(self, batches, evaluator, t_begin, time_limit_seconds):
    config, model = self.config, self.program.model
    states, start = self._restore()
    if start > self.total_steps:
      for run in self.runs:
        run.close()
      return states
    if jax.process_index() == 0:
      checkpoints.save_config(self.workdir, config)
      _write_sweep(self.workdir, config, self.settings, self.stopped)
    for run in self.runs:
      run.open(start)
    states = step_lib.put_members(states, self.mesh)
    keys = step_lib.put_members(
        step_lib.member_keys([m.seed for m in self.members]), self.mesh
    )
    numbers = step_lib.put_members(
        step_lib.member_numbers(self.members, self.names), self.mesh
    )
    batch_sharding = step_lib.member_batch_sharding(self.mesh)
    logging.info(
        "Training a sweep of %d members (%s) for %d steps, from step %d, on "
        "%d device(s); %d parameters each",
        len(self.members),
        ", ".join(self.names),
        self.total_steps,
        start,
        self.mesh.size,
        models.count_parameters(step_lib.member(states.params, 0)),
    )
    stops = stopping.StopAgreement(self.mesh)
    stopped = stops.now(
        stopping.SIGTERM if run_dir.sigterm_received() else stopping.GO_ON
    )
    if stopped == stopping.SIGTERM:
      for run in self.runs:
        run.close()
      raise stopping.StoppedBySignal(start if start else None)
    pending, t_start = [], time.time()
    t_log, images_done = t_start, 0
    steps_per_epoch = batches[0].steps_per_epoch
    done = start
    try:
      for step in range(start, self.total_steps):
        member_batches = [b.batch(step) for b in batches]
        x = np.stack([xb for xb, _ in member_batches])
        c = np.stack([cb for _, cb in member_batches])
        states, metrics = self.program.step_fn(
            states,
            sharding.put_global_batch(x, batch_sharding),
            sharding.put_global_batch(c, batch_sharding),
            keys,
            numbers,
        )
        self._check_finite(pending)  # the previous step, while this runs
        pending.append((step + 1, metrics))
        images_done += config.batch_size * len(self.members)
        done = step + 1
        if done % config.log_every_steps == 0 or done == self.total_steps:
          self._check_finite(pending)
          self._log(done, metrics, t_log, images_done)
          t_log, images_done = time.time(), 0
        if done % config.sample_every_steps == 0 or done == self.total_steps:
          for k in self.active():
            grid = sampling.write_sample_grid(
                self.members[k],
                model,
                train_step_lib.eval_variables(_member_state(states, k)),
            )
            # (H, W) grey or (H, W, 3) RGB, as one image of a batch.
            self.runs[k].writer.write_images(
                done,
                {
                    "samples": (
                        grid[None] if grid.ndim == 3 else grid[None, ..., None]
                    )
                },
            )
        at_evaluation = (
            self.val_split is not None or evaluator is not None
        ) and validation.is_evaluation_point(
            done, self.total_steps, steps_per_epoch, config
        )
        if at_evaluation:
          self._check_finite(pending)
          for k in self.active():
            train._evaluate_point(  # pylint: disable=protected-access
                self.members[k],
                model,
                _member_state(states, k),
                done,
                steps_per_epoch,
                self.val_split,
                evaluator,
                self.runs[k].evaluations,
                self.runs[k].writer,
            )
        stopped = stops.after_step(stopping.wish(t_begin, time_limit_seconds))
        if done == self.total_steps:
          stopped = stopping.GO_ON
        if (
            done % config.checkpoint_every_steps == 0
            or done == self.total_steps
            or at_evaluation
            or stopped
        ):
          self._check_finite(pending)
          self._save(states, done)
        if stopped == stopping.OUT_OF_TIME:
          logging.info(
              "Time limit of %.0f s reached: stopped the sweep after step %d "
              "of %d; the same command resumes from here",
              time_limit_seconds,
              done,
              self.total_steps,
          )
        if stopped:
          break
      self._check_finite(pending)
    finally:
      for run in self.runs:
        run.close()
    if stopped == stopping.SIGTERM:
      logging.info(
          "SIGTERM: stopped the sweep after step %d of %d, its checkpoints "
          "saved",
          done,
          self.total_steps,
      )
      raise stopping.StoppedBySignal(done)
    if not stopped and jax.process_index() == 0:
      for k in self.active():
        sampling.write_sample_grid(
            self.members[k],
            model,
            train_step_lib.eval_variables(_member_state(states, k)),
            os.path.join(self.runs[k].workdir, "samples.png"),
        )
      logging.info(
          "Done: %d members, %d steps in %.0f s; their runs in %s",
          len(self.members),
          self.total_steps,
          time.time() - t_start,
          os.path.join(self.workdir, MEMBERS_DIR),
      )
    return states

  def _save(self, states, done):
    for k in self.active():
      state = _member_state(states, k)
      try:
        train._check_samples_finite(  # pylint: disable=protected-access
            self.members[k],
            self.program.model,
            state,
            done,
            self.runs[k].mngr,
            self.runs[k].workdir,
        )
      except train.NonFiniteLossError as e:
        self._stop_member(k, done, str(e))
        continue
      self.runs[k].save(state)
