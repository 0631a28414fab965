"""The training loop: data, sharded jitted steps, logging, checkpoints.

`train_and_evaluate(config, workdir)` trains for `config.num_train_steps`
steps (when > 0) or `config.num_epochs` epochs, resuming from the latest
checkpoint in `workdir`. A resumed run ends in the same state as an
uninterrupted one: batches are a function of (seed, step) and so is every
random number of a step.

Data parallelism: a mesh over all devices (and hosts, once
`jax.distributed.initialize()` has run) with a `data` axis; the global batch is
split over it, parameters and optimiser state are replicated, and the step is
jitted with these shardings. BatchNorm means are taken over the global batch
(XLA inserts the all-reduce), so N devices compute the same step as one.

Stopping early (`cign_jax.stopping`): on SIGTERM the loop finishes the step
in flight, saves a checkpoint of it and raises `stopping.StoppedBySignal`
(the train command prints its message and exits with 143);
`time_limit_seconds` stops the same way and returns. The compiled step comes
from `cign_jax.step_programs`, which keeps it for the process's next run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import metric_writers
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling
from cign_jax import sharding
from cign_jax import step_programs
from cign_jax import stopping
from cign_jax import train_step as train_step_lib
from cign_jax import validation
from cign_jax.data import reader

# Fields that may change when a run is resumed (how long / how often).
RESUMABLE_CHANGES = (
    "num_epochs",
    "num_train_steps",
    "log_every_steps",
    "sample_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "mesh_shape",
    "mesh_axis_names",
    "eval_every_epochs",
    "eval_every_steps",
)


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


def _check_resume_config(workdir: str, config: ml_collections.ConfigDict):
  path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not os.path.isfile(path):
    ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir) and any(
        name.isdigit() for name in os.listdir(ckpt_dir)
    ):
      raise ValueError(
          f"{workdir} holds checkpoints but no {checkpoints.CONFIG_FILE}, so "
          "it cannot be checked that they fit this config; restore its "
          f"{checkpoints.CONFIG_FILE} (the config the checkpoints were "
          "trained with), or use a new run directory"
      )
    return
  previous = checkpoints.load_config(workdir)
  old = _leaves(json.loads(previous.to_json()))
  new = _leaves(json.loads(config.to_json()))
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_CHANGES:
      continue
    if old.get(key) != new.get(key):
      from_data = key in ("data.class_names",) + tuple(
          f"model.{k}" for k in config_lib.FROM_DATA
      )
      raise ValueError(
          f"config.{key.split('.')[0]} differs from the run in {workdir}: "
          f"config.{key} is {old.get(key)} there, {new.get(key)} now"
          + (" (the data differ from the run's)" if from_data else "")
          + "; use a new run directory or the same config and data"
      )


def _leaves(tree, prefix=""):
  """{'model.image_size': 28, ...}: a config's values by dotted name."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _check_samples_finite(config, model, state, step, mngr, workdir):
  """Refuses to checkpoint a state whose evaluation-time samples are not
  finite (finite but huge weights or BatchNorm statistics can overflow the
  running-statistics forward pass that the training step never takes)."""
  k = model.num_classes if model.conditioning != "none" else 1
  z = sampling.model_prior_noise(
      jax.random.key(config.samples_noise_seed),
      model,
      k,
      config.model.clip_prior,
  )
  out = sampling.apply_repeatedly(
      model,
      train_step_lib.eval_variables(state),
      z,
      np.arange(k, dtype=np.int32),
  )
  if not np.all(np.isfinite(out)):
    raise NonFiniteLossError(
        f"the state after step {step} samples non-finite images (its weights "
        f"or BatchNorm statistics overflow); it was not checkpointed and "
        f"training stopped. {_last_good(mngr, workdir)}; lower the "
        "learning rate or check the data"
    )


def _last_good(mngr, workdir) -> str:
  latest = mngr.latest_step()
  if latest is None:
    return f"No checkpoint was saved in {workdir}"
  return f"The last good checkpoint (step {latest}) in {workdir} is kept"


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Optional[Any] = None,
    evaluator: Optional[Callable[..., Dict[str, float]]] = None,
    time_limit_seconds: Optional[float] = None,
) -> train_step_lib.TrainState:
  """Trains (or resumes) the run in `workdir`.

  Args:
    config: a validated config (`cign_jax.config`); on resume only the fields
      of `RESUMABLE_CHANGES` may differ from the run's `config.json`.
    workdir: the run directory: checkpoints, TensorBoard events, sample
      grids; resumed from its latest checkpoint when there is one.
    dataset: optional data instead of the config's tfds dataset (notebooks,
      tests, machines without tensorflow-datasets): (images uint8
      (N, H, W, C), labels) to train on, without validation; or
      {'train': (images, labels), 'test': (images, labels)}, the test split
      giving the validation loss.
    evaluator: in-loop evaluation, called as evaluator(model, variables,
      step) at every evaluation point, returning {metric: value}
      (`cign_jax.evaluation.in_loop`; needed when the config asks for
      label accuracy or FID during training).
    time_limit_seconds: stop cleanly (latest checkpoint saved, resumable)
      after the first step that ends this long after the start.

  Returns:
    The final TrainState (replicated over the mesh).

  Raises:
    NonFiniteLossError: a NaN or Inf loss; the last good checkpoint is kept.
    stopping.StoppedBySignal: SIGTERM came (while this call ran in the main
      thread, or before it within an open `run_dir.noting_sigterm()` block):
      the step in flight was finished and saved.
    ValueError: a config that does not fit the run or the devices.
  """

  t_begin = time.time()
  config = config_lib.validate(config)
  if config_lib.is_sweep(config):
    raise ValueError(
        f"config.sweep varies {', '.join(config_lib.swept_settings(config))}"
        ": a sweep trains its members together with cign_jax.sweeps."
        "training.train_and_evaluate (what `python -m cign_jax.main` runs)"
    )
  # Every check comes before the first write to the run directory, so a
  # refused start leaves it as it was.
  config, images, labels, val_split = load_training_data(
      config, dataset, evaluator
  )
  _check_resume_config(workdir, config)
  mesh = sharding.create_mesh(config)
  sharding.check_batch_divides(config, mesh)
  batches = reader.TrainBatches(images, labels, config.batch_size, config.seed)
  total_steps = train_step_lib.total_train_steps(config, batches.num_examples)

  # One writer per run: held until this function returns (or the process
  # ends, when the OS drops it).
  lock = run_dir.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    with run_dir.noting_sigterm():
      return _train(
          config,
          workdir,
          mesh,
          batches,
          total_steps,
          val_split,
          evaluator,
          t_begin,
          time_limit_seconds,
      )
  finally:
    if lock is not None:
      lock.release()


def load_training_data(config, dataset, evaluator):
  """(config, training images, labels, validation split or None) of a run
  (see `train_and_evaluate` for `dataset`): the config with its unset image
  shape and class count taken from the data, checked against what it asks
  for."""
  data = reader.load_training_data(config, dataset)
  (images, labels), test = data.train, data.test
  config = config_lib.fit_to_data(
      config, images.shape[1:], data.num_classes, data.class_names
  )
  val_split = validation.validation_split(config, test)
  if config.best_metric == "val_loss" and val_split is None:
    others = [
        repr(m) for m in config_lib.computed_metrics(config) if m != "val_loss"
    ]
    raise ValueError(
        "config.best_metric is 'val_loss' but the run has no validation "
        "split: pass dataset={'train': (images, labels), 'test': (images, "
        "labels)}, or set config.best_metric to "
        + " or ".join(others + ["'' (no best checkpoint)"])
    )
  if config_lib.needs_evaluator(config) and evaluator is None:
    raise ValueError(
        f"config.eval_samples_per_label = {config.eval_samples_per_label} "
        "asks for evaluation during training, which lives in "
        "cign_jax.evaluation: call cign_jax.evaluation.in_loop."
        "train_and_evaluate (what `python -m cign_jax.main` does) or pass "
        "evaluator="
    )
  _check_labels_fit(config, labels)
  return config, images, labels, val_split


def _check_labels_fit(config, labels):
  """Labels the model cannot represent (outside 0..num_classes-1) are an
  error before training, not a NaN at step 1."""
  if config.model.conditioning == "none":
    return
  labels = np.asarray(labels)
  if labels.size == 0:
    return
  low, high = int(labels.min()), int(labels.max())
  if low < 0 or high >= config.model.num_classes:
    raise ValueError(
        f"the training labels span {low}..{high}, but config.model."
        f"num_classes={config.model.num_classes} represents only 0.."
        f"{config.model.num_classes - 1}; set config.model.num_classes="
        f"{high + 1} (or more) for this dataset"
    )


class _FiniteChecks:
  """The steps' `finite` flags, read on the host one step late so that the
  loop never waits for the step in flight."""

  def __init__(self, mngr, workdir: str):
    self._pending = []  # (step, metrics) not yet checked on the host
    self._mngr, self._workdir = mngr, workdir

  def add(self, step: int, metrics):
    self._pending.append((step, metrics))

  def check(self):
    for step_done, metrics in self._pending:
      if not bool(jax.device_get(metrics["finite"])):
        raise NonFiniteLossError(
            f"non-finite loss, gradient, parameters or BatchNorm statistics "
            f"at step {step_done} (that step was not applied); training "
            f"stopped. {_last_good(self._mngr, self._workdir)}; lower the "
            "learning rate or check the data"
        )
    self._pending = []


class _ThroughputLog:
  """The loss, images per second and time left, every log_every_steps."""

  def __init__(self, writer, total_steps: int, start: int):
    self._writer, self._total_steps = writer, total_steps
    self._t, self._images, self._last = time.time(), 0, start

  def count(self, images: int):
    self._images += images

  def log(self, done: int, metrics):
    scalars = {
        k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"
    }
    now = time.time()
    ips = self._images / max(now - self._t, 1e-9)
    steps_per_s = (done - self._last) / max(now - self._t, 1e-9)
    eta = (self._total_steps - done) / max(steps_per_s, 1e-9)
    scalars["images_per_second"] = ips
    self._writer.write_scalars(done, scalars)
    logging.info(
        "step %d/%d | loss %.4f | %.1f images/s | ETA %s",
        done,
        self._total_steps,
        scalars["loss"],
        ips,
        _format_eta(eta),
    )
    self._t, self._images, self._last = now, 0, done


def _summary_scalars(metrics) -> Dict[str, float]:
  """An evaluation point's numbers under their TensorBoard names: the
  validation losses under val/, the evaluator's metrics under eval/."""
  return {
      (k.replace("val_", "val/", 1) if k.startswith("val_") else f"eval/{k}"): v
      for k, v in metrics.items()
      if isinstance(v, (int, float)) and v is not None
  }


def _evaluation_line(config, metrics, best, improved: bool) -> str:
  """The log line's numbers: the validation losses, the metrics the config
  names, and the best checkpoint so far."""
  parts = [
      f"{k} {v:.4f}"
      for k, v in metrics.items()
      if k != "epoch"
      and isinstance(v, float)
      and (k.startswith("val_loss") or k in config.eval_metrics)
  ]
  if best is not None:
    parts.append(
        f"best {config.best_metric} {best[config.best_metric]:.4f}"
        f" at step {best['step']}{' (new)' if improved else ''}"
    )
  return " | ".join(parts)


def _evaluate_point(
    config,
    model,
    state,
    done,
    steps_per_epoch,
    val_split,
    evaluator,
    evaluations,
    writer,
):
  """The validation loss and the evaluator's metrics after step `done`,
  recorded (the best checkpoint), written and logged."""
  variables = train_step_lib.eval_variables(state)
  metrics = {"epoch": done / steps_per_epoch}
  if val_split is not None:
    metrics.update(
        validation.validation_loss(
            model, variables, *val_split, config, done // steps_per_epoch
        )
    )
  if evaluator is not None:
    metrics.update(evaluator(model, variables, done))
  improved = evaluations.record(state, metrics)
  writer.write_scalars(done, _summary_scalars(metrics))
  logging.info(
      "evaluation at step %d (epoch %.2f) | %s",
      done,
      metrics["epoch"],
      _evaluation_line(config, metrics, evaluations.best, improved),
  )


def _restore(config, workdir, program, total_steps):
  """The run's state (restored from its latest checkpoint, if any) and its
  checkpoint manager."""
  state = train_step_lib.create_train_state(
      config, model=program.model, tx=program.tx
  )
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoints.restore(mngr, state)
    logging.info(
        "Resumed from the checkpoint of step %d in %s", int(state.step), workdir
    )
  resumed_at = int(jax.device_get(state.step))
  if resumed_at > total_steps:
    logging.warning(
        "The run in %s is at step %d, past the %d steps asked for: nothing "
        "to do (config.json is left as it was); give a larger "
        "config.num_train_steps to train further",
        workdir,
        resumed_at,
        total_steps,
    )
  return state, mngr


def _open_records(config, workdir, start):
  """What a run writes beside its checkpoints: config.json, the best
  checkpoint's record (`validation.BestCheckpoint`, resumed at `start`) and
  the TensorBoard writer."""
  if jax.process_index() == 0:
    checkpoints.save_config(workdir, config)
  evaluations = validation.BestCheckpoint(workdir, config.best_metric)
  evaluations.resume(start)
  if evaluations.best is not None:
    logging.info(
        "Best so far: step %d, %s = %.6g",
        evaluations.best["step"],
        config.best_metric,
        evaluations.best[config.best_metric],
    )
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False
  )
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()})
  return evaluations, writer


def _train(
    config,
    workdir,
    mesh,
    batches,
    total_steps,
    val_split,
    evaluator,
    t_begin,
    time_limit_seconds,
):
  """The training loop of `train_and_evaluate`, once every check passed and
  the run's lock is held."""
  program = step_programs.get(config, mesh, total_steps)
  model = program.model
  state, mngr = _restore(config, workdir, program, total_steps)
  start = int(jax.device_get(state.step))
  if start > total_steps:
    mngr.close()
    return state
  evaluations, writer = _open_records(config, workdir, start)
  state = sharding.put_replicated(state, mesh)
  base_key = sharding.put_replicated(jax.random.key(config.seed), mesh)
  batch_sharding = sharding.data_sharding(mesh)
  logging.info(
      "Training %s for %d steps (%d per epoch), from step %d, on %d "
      "device(s); %d parameters",
      config.model.conditioning,
      total_steps,
      batches.steps_per_epoch,
      start,
      mesh.size,
      models.count_parameters(state.params),
  )
  finite = _FiniteChecks(mngr, workdir)
  throughput = _ThroughputLog(writer, total_steps, start)
  t_start = time.time()

  stops = stopping.StopAgreement(mesh)
  # A signal that came before the loop (while restoring or loading): stop
  # before running a step, the restored checkpoint (if any) being the one
  # to resume from.
  stopped = stops.now(
      stopping.SIGTERM if run_dir.sigterm_received() else stopping.GO_ON
  )
  if stopped == stopping.SIGTERM:
    writer.flush()
    evaluations.close()
    latest = mngr.latest_step()
    mngr.close()
    raise stopping.StoppedBySignal(None if latest is None else start)
  done = start
  for step in range(start, total_steps):
    x, c = batches.batch(step)
    state, metrics = program.step_fn(
        state,
        sharding.put_global_batch(x, batch_sharding),
        sharding.put_global_batch(c, batch_sharding),
        base_key,
    )
    # Check the previous step while this one runs (no pipeline stall).
    finite.check()
    finite.add(step + 1, metrics)
    throughput.count(config.batch_size)
    done = step + 1

    if done % config.log_every_steps == 0 or done == total_steps:
      finite.check()
      throughput.log(done, metrics)

    if done % config.sample_every_steps == 0 or done == total_steps:
      grid = sampling.write_sample_grid(
          config, model, train_step_lib.eval_variables(state)
      )
      writer.write_images(
          done,
          {"samples": grid[None] if grid.ndim == 3 else grid[None, ..., None]},
      )

    at_evaluation = (
        val_split is not None or evaluator is not None
    ) and validation.is_evaluation_point(
        done, total_steps, batches.steps_per_epoch, config
    )
    if at_evaluation:
      finite.check()
      _evaluate_point(
          config,
          model,
          state,
          done,
          batches.steps_per_epoch,
          val_split,
          evaluator,
          evaluations,
          writer,
      )
    # Every process takes part in the agreement at every step, the last
    # included, so that they dispatch the same collectives.
    stopped = stops.after_step(stopping.wish(t_begin, time_limit_seconds))
    if done == total_steps:
      stopped = stopping.GO_ON  # the run is finished: nothing to stop
    if (
        done % config.checkpoint_every_steps == 0
        or done == total_steps
        or at_evaluation
        or stopped
    ):
      finite.check()
      _check_samples_finite(config, model, state, done, mngr, workdir)
      checkpoints.save(mngr, state)
      evaluations.commit()
    if stopped == stopping.OUT_OF_TIME:
      logging.info(
          "Time limit of %.0f s reached: stopped after step %d of "
          "%d; the same command resumes from here",
          time_limit_seconds,
          done,
          total_steps,
      )
    if stopped:
      break

  finite.check()
  writer.flush()
  evaluations.close()
  _end(config, workdir, model, state, mngr, stopped, done, total_steps, t_start)
  return state


def _end(
    config, workdir, model, state, mngr, stopped, done, total_steps, t_start
):
  """After the loop: SIGTERM raises `stopping.StoppedBySignal`; a finished
  run writes its final sample grid (samples.png)."""
  if stopped == stopping.SIGTERM:
    mngr.close()
    logging.info(
        "SIGTERM: stopped after step %d of %d, its checkpoint " "saved",
        done,
        total_steps,
    )
    raise stopping.StoppedBySignal(done)
  if stopped:
    mngr.close()
    return
  path = os.path.join(workdir, "samples.png")
  if jax.process_index() == 0:
    sampling.write_sample_grid(
        config, model, train_step_lib.eval_variables(state), path
    )
  mngr.close()
  logging.info(
      "Done: %d steps in %s; samples in %s",
      total_steps,
      _format_eta(time.time() - t_start),
      path,
  )


def _flat(config, prefix="") -> Dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = (
          str(value) if isinstance(value, (tuple, list)) else value
      )
  return out
