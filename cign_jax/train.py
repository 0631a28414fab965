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

Stopping early: on SIGTERM (what preemptible VMs and SLURM's time limit send
before SIGKILL) the loop finishes the step in flight, saves a checkpoint of
it and raises `StoppedBySignal` (the train command prints its message and
exits with 143); `time_limit_seconds` stops the same way and returns. With
several processes, every one stops after the same step (`_StopAgreement`).
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import metric_writers
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling
from cign_jax import sharding
from cign_jax import train_step as train_step_lib
from cign_jax import validation
from cign_jax.data import reader
from cign_jax.kernels import native_conv

# Fields that may change when a run is resumed (how long / how often).
RESUMABLE_CHANGES = ("num_epochs", "num_train_steps", "log_every_steps",
                     "sample_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "mesh_shape", "mesh_axis_names",
                     "eval_every_epochs", "eval_every_steps")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


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
      message = ("stopped by SIGTERM before the first step; nothing to save; "
                 "run the same command to start")
    else:
      message = (f"stopped by SIGTERM at step {step}; checkpoint saved; run "
                 "the same command to resume")
    super().__init__(message)


# Why the loop stops before its last step, ordered: SIGTERM outranks the
# time limit when processes disagree.
_GO_ON, _OUT_OF_TIME, _SIGTERM = 0, 1, 2


class _StopAgreement:
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

  def _reduce(self, wish: int):
    # One value per device; each process fills its own devices' with its
    # wish.
    local = np.full((self._mesh.size,), wish, np.int32)
    return self._max(sharding.put_global_batch(
        local, sharding.data_sharding(self._mesh)))

  @staticmethod
  def _read(value) -> int:
    return int(np.asarray(value.addressable_data(0)))

  def now(self, wish: int) -> int:
    """Everyone's decision on `wish`, waiting for the all-reduce (used
    before the first step, when no step is queued)."""
    return self._read(self._reduce(wish)) if self._several else wish

  def after_step(self, wish: int) -> int:
    """The decision after a step: the wish itself (one process), or
    everyone's wishes given after the previous step (several)."""
    if not self._several:
      return wish
    previous, self._in_flight = self._in_flight, self._reduce(wish)
    return _GO_ON if previous is None else self._read(previous)


def compile_train_step(config, mesh):
  """The jitted step with the mesh's shardings; the state is donated."""
  step = train_step_lib.make_train_step(config)
  repl, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, batch, batch, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


class StepProgram(NamedTuple):
  """The network, optimiser and jitted step of a run (`step_program`)."""
  model: Any
  tx: Any
  step_fn: Any


# The step programs of this process's runs, most recently used last.
_STEP_PROGRAMS: "collections.OrderedDict[Any, StepProgram]" = (
    collections.OrderedDict())
_STEP_PROGRAMS_KEPT = 4
_STEP_PROGRAMS_LOCK = threading.Lock()


def step_signature(config, mesh, total_steps: int):
  """Everything the compiled train step depends on: the network, the loss,
  the optimiser (and the run's length, which a cosine schedule reads), the
  training noise, the parameter average, the batch, the precision, the mesh,
  and whether the C++ conv kernels are used (chosen when the step is
  traced). Not the seed (the step's key is an argument), nor how long or
  how often a run logs, samples, evaluates or saves."""
  parts = {
      "model": config.model.to_dict(), "loss": config.loss.to_dict(),
      "optimizer": config.optimizer.to_dict(),
      "schedule_steps": (None if config.optimizer.lr_schedule == "constant"
                         else int(total_steps)),
      "train_noise_std": config.data.train_noise_std,
      "ema_decay": config.ema_decay, "batch_size": config.batch_size,
      "compute_dtype": config.compute_dtype,
      "matmul_precision": config.matmul_precision,
  }
  # The kernels are asked about only where the step's convolutions would use
  # them (`ops`: CPU), so that a GPU run does not build them.
  native = (native_conv.available() if jax.default_backend() == "cpu"
            else None)
  return json.dumps(parts, sort_keys=True, default=repr), mesh, native


def step_program(config, mesh, total_steps: int) -> StepProgram:
  """The model, optimiser and jitted step for `config` on `mesh`, the same
  objects for every run of this process with the same `step_signature`.

  jax.jit keeps a traced and compiled step per argument structure, and the
  train state's structure holds the network's `apply` and the optimiser,
  which compare by identity; a new run builds new ones, so without this it
  would trace its step again and load it from the persistent compilation
  cache, several times slower to start (docs/performance.md, "The test
  suite"). So a second run in
  the same process (a notebook's resumed run, runs over seeds, the tests)
  starts its first step at once. The last few programs are kept, with
  their compiled executables. `forget_step_programs` drops them.
  """
  key = step_signature(config, mesh, total_steps)
  with _STEP_PROGRAMS_LOCK:
    program = _STEP_PROGRAMS.get(key)
    if program is None:
      program = StepProgram(
          model=models.model_from_config(config),
          tx=train_step_lib.make_optimizer(config, total_steps),
          step_fn=compile_train_step(config, mesh))
      _STEP_PROGRAMS[key] = program
      while len(_STEP_PROGRAMS) > _STEP_PROGRAMS_KEPT:
        _STEP_PROGRAMS.popitem(last=False)
    _STEP_PROGRAMS.move_to_end(key)
    return program


def forget_step_programs():
  """Drops the step programs `step_program` keeps, so that the next run
  builds its network, optimiser and step from the code as it is now (after
  a module was reloaded or patched in a running process)."""
  with _STEP_PROGRAMS_LOCK:
    _STEP_PROGRAMS.clear()


def _check_resume_config(workdir: str, config: ml_collections.ConfigDict):
  path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not os.path.isfile(path):
    ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir) and any(
        name.isdigit() for name in os.listdir(ckpt_dir)):
      raise ValueError(
          f"{workdir} holds checkpoints but no {checkpoints.CONFIG_FILE}, so "
          "it cannot be checked that they fit this config; restore its "
          f"{checkpoints.CONFIG_FILE} (the config the checkpoints were "
          "trained with), or use a new --workdir")
    return
  previous = checkpoints.load_config(workdir)
  old = json.loads(previous.to_json())
  new = json.loads(config.to_json())
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_CHANGES:
      continue
    if old.get(key) != new.get(key):
      raise ValueError(
          f"config.{key} differs from the run in {workdir} ({old.get(key)} "
          f"there, {new.get(key)} now); use a new --workdir or the same config")


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def write_sample_grid(config, model, variables, path: Optional[str] = None,
                      num_per_label: int = 10):
  """The paper's figure: a row per label, the same noise in every row."""
  rows = sampling.label_grid(model, variables,
                             jax.random.key(config.samples_noise_seed),
                             num_per_label=num_per_label,
                             clip=config.model.clip_prior)
  grid = sampling.grid_image(rows)
  if path:
    sampling.save_png(grid, path)
  return grid


def _check_samples_finite(config, model, state, step, mngr, workdir):
  """Refuses to checkpoint a state whose evaluation-time samples are not
  finite (finite but huge weights or BatchNorm statistics can overflow the
  running-statistics forward pass that the training step never takes)."""
  k = model.num_classes if model.conditioning != "none" else 1
  z = sampling.prior_noise(jax.random.key(config.samples_noise_seed), k,
                           model.image_channels, config.model.clip_prior)
  out = sampling.apply_repeatedly(model, train_step_lib.eval_variables(state),
                                  z, np.arange(k, dtype=np.int32))
  if not np.all(np.isfinite(out)):
    raise NonFiniteLossError(
        f"the state after step {step} samples non-finite images (its weights "
        f"or BatchNorm statistics overflow); it was not checkpointed and "
        f"training stopped. {_last_good(mngr, workdir)}; lower the "
        "learning rate or check the data")


def _last_good(mngr, workdir) -> str:
  latest = mngr.latest_step()
  if latest is None:
    return f"No checkpoint was saved in {workdir}"
  return f"The last good checkpoint (step {latest}) in {workdir} is kept"
def split_dataset(dataset) -> Tuple[Any, Any]:
  """`train_and_evaluate`'s dataset argument as ((images, labels) of the
  training split, (images, labels) of the test split or None)."""
  if isinstance(dataset, dict):
    unknown = sorted(set(dataset) - {"train", "test"})
    if unknown or "train" not in dataset:
      raise ValueError(f"dataset: expected a dict with 'train' and optionally "
                       f"'test', each (images uint8, labels); got keys "
                       f"{sorted(dataset)}")
    return tuple(dataset["train"]), (None if dataset.get("test") is None
                                     else tuple(dataset["test"]))
  if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
    return tuple(dataset), None
  raise ValueError("dataset: expected (images uint8, labels) of the training "
                   "split or {'train': (images, labels), 'test': (images, "
                   f"labels)}}, got {type(dataset).__name__}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[Any] = None,
                       evaluator: Optional[Callable[..., Dict[str, float]]]
                       = None,
                       time_limit_seconds: Optional[float] = None
                       ) -> train_step_lib.TrainState:
  """Trains (or resumes) the run in `workdir`.

  Args:
    config: a validated config (`cign_jax.config`); on resume only the fields
      of `RESUMABLE_CHANGES` may differ from the run's `config.json`.
    workdir: the run directory: checkpoints, TensorBoard events, sample
      grids; resumed from its latest checkpoint when there is one.
    dataset: optional data instead of the config's tfds dataset (notebooks,
      tests, machines without tensorflow-datasets): (images uint8
      (N, 28, 28, 1), labels) to train on, without validation; or
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
    StoppedBySignal: SIGTERM came (while this call ran in the main thread,
      or before it within an open `run_dir.noting_sigterm()` block): the
      step in flight was finished and saved.
    ValueError: a config that does not fit the run or the devices.
  """

  t_begin = time.time()
  config = config_lib.validate(config)
  # Every check comes before the first write to the run directory, so a
  # refused start leaves it as it was.
  _check_resume_config(workdir, config)
  mesh = sharding.create_mesh(config)
  sharding.check_batch_divides(config, mesh)

  if dataset is None:
    images, labels = reader.load_split(config.data.dataset, "train",
                                         config.data.data_dir)
    test = None
    if config.eval_num_examples != 0:
      test = reader.load_split(config.data.dataset, "test",
                               config.data.data_dir)
  else:
    (images, labels), test = split_dataset(dataset)
  val_split = validation.validation_split(config, test)
  if config.best_metric == "val_loss" and val_split is None:
    others = [repr(m) for m in config_lib.computed_metrics(config)
              if m != "val_loss"]
    raise ValueError(
        "config.best_metric is 'val_loss' but the run has no validation "
        "split: pass dataset={'train': (images, labels), 'test': (images, "
        "labels)}, or set config.best_metric to "
        + " or ".join(others + ["'' (no best checkpoint)"]))
  if config_lib.needs_evaluator(config) and evaluator is None:
    raise ValueError(
        f"config.eval_samples_per_label = {config.eval_samples_per_label} "
        "asks for evaluation during training, which lives in "
        "cign_jax.evaluation: call cign_jax.evaluation.in_loop."
        "train_and_evaluate (what `python -m cign_jax.main` does) or pass "
        "evaluator=")
  batches = reader.TrainBatches(images, labels, config.batch_size,
                                  config.seed)
  _check_labels_fit(config, labels)
  total_steps = train_step_lib.total_train_steps(config, batches.num_examples)

  # One writer per run: held until this function returns (or the process
  # ends, when the OS drops it).
  lock = run_dir.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    with run_dir.noting_sigterm():
      return _train(config, workdir, mesh, batches, total_steps, val_split,
                    evaluator, t_begin, time_limit_seconds)
  finally:
    if lock is not None:
      lock.release()


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
        f"{config.model.num_classes - 1}; set --config.model.num_classes="
        f"{high + 1} (or more) for this dataset")


def _train(config, workdir, mesh, batches, total_steps, val_split,
           evaluator, t_begin, time_limit_seconds):
  """The training loop of `train_and_evaluate`, once every check passed and
  the run's lock is held."""
  program = step_program(config, mesh, total_steps)
  model = program.model
  state = train_step_lib.create_train_state(config, model=model,
                                           tx=program.tx)
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  if mngr.latest_step() is not None:
    state = checkpoints.restore(mngr, state)
    logging.info("Resumed from the checkpoint of step %d in %s",
                 int(state.step), workdir)
  resumed_at = int(jax.device_get(state.step))
  if resumed_at > total_steps:
    logging.warning(
        "The run in %s is at step %d, past the %d steps asked for: nothing "
        "to do (config.json is left as it was); give a larger "
        "--config.num_train_steps to train further", workdir, resumed_at,
        total_steps)
    mngr.close()
    return state
  if jax.process_index() == 0:
    checkpoints.save_config(workdir, config)
  evaluations = validation.BestCheckpoint(workdir, config.best_metric)
  evaluations.resume(int(jax.device_get(state.step)))
  if evaluations.best is not None:
    logging.info("Best so far: step %d, %s = %.6g", evaluations.best["step"],
                 config.best_metric, evaluations.best[config.best_metric])
  state = sharding.put_replicated(state, mesh)
  base_key = sharding.put_replicated(jax.random.key(config.seed), mesh)
  step_fn = program.step_fn
  batch_sharding = sharding.data_sharding(mesh)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  start = int(jax.device_get(state.step))
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config).items()})
  logging.info("Training %s for %d steps (%d per epoch), from step %d, on %d "
               "device(s); %d parameters", config.model.conditioning,
               total_steps, batches.steps_per_epoch, start, mesh.size,
               models.count_parameters(state.params))

  pending = []  # (step, metrics) not yet checked on the host
  last_checked = start
  t_log, n_images = time.time(), 0
  t_start = time.time()

  def check_pending():
    nonlocal pending
    for step_done, metrics in pending:
      if not bool(jax.device_get(metrics["finite"])):
        raise NonFiniteLossError(
            f"non-finite loss, gradient, parameters or BatchNorm statistics "
            f"at step {step_done} (that step was not applied); training "
            f"stopped. {_last_good(mngr, workdir)}; lower the learning rate "
            "or check the data")
    pending = []

  def evaluate_point(done):
    variables = train_step_lib.eval_variables(state)
    epoch = done // batches.steps_per_epoch
    metrics = {"epoch": done / batches.steps_per_epoch}
    if val_split is not None:
      metrics.update(validation.validation_loss(model, variables, *val_split,
                                                config, epoch))
    if evaluator is not None:
      metrics.update(evaluator(model, variables, done))
    improved = evaluations.record(state, metrics)
    writer.write_scalars(done, {
        (k.replace("val_", "val/", 1) if k.startswith("val_") else
         f"eval/{k}"): v for k, v in metrics.items()
        if isinstance(v, (int, float)) and v is not None})
    parts = [f"{k} {v:.4f}" for k, v in metrics.items()
             if k != "epoch" and isinstance(v, float)
             and (k.startswith("val_loss") or k in config.eval_metrics)]
    best = evaluations.best
    if best is not None:
      parts.append(f"best {config.best_metric} {best[config.best_metric]:.4f}"
                   f" at step {best['step']}{' (new)' if improved else ''}")
    logging.info("evaluation at step %d (epoch %.2f) | %s", done,
                 metrics["epoch"], " | ".join(parts))

  stops = _StopAgreement(mesh)
  # A signal that came before the loop (while restoring or loading): stop
  # before running a step, the restored checkpoint (if any) being the one
  # to resume from.
  stopped = stops.now(_SIGTERM if run_dir.sigterm_received() else _GO_ON)
  if stopped == _SIGTERM:
    writer.flush()
    evaluations.close()
    latest = mngr.latest_step()
    mngr.close()
    raise StoppedBySignal(None if latest is None else start)
  done = start
  for step in range(start, total_steps):
    x, c = batches.batch(step)
    state, metrics = step_fn(state, sharding.put_global_batch(x, batch_sharding),
                             sharding.put_global_batch(c, batch_sharding), base_key)
    # Check the previous step while this one runs (no pipeline stall).
    check_pending()
    pending.append((step + 1, metrics))
    n_images += config.batch_size
    done = step + 1

    if done % config.log_every_steps == 0 or done == total_steps:
      check_pending()
      scalars = {k: float(v) for k, v in jax.device_get(metrics).items()
                 if k != "finite"}
      now = time.time()
      ips = n_images / max(now - t_log, 1e-9)
      steps_per_s = (done - last_checked) / max(now - t_log, 1e-9)
      eta = (total_steps - done) / max(steps_per_s, 1e-9)
      scalars["images_per_second"] = ips
      writer.write_scalars(done, scalars)
      logging.info("step %d/%d | loss %.4f | %.1f images/s | ETA %s", done,
                   total_steps, scalars["loss"], ips, _format_eta(eta))
      t_log, n_images, last_checked = now, 0, done

    if done % config.sample_every_steps == 0 or done == total_steps:
      grid = write_sample_grid(config, model,
                               train_step_lib.eval_variables(state))
      writer.write_images(done, {"samples": grid[None, :, :, None]})

    at_evaluation = (
        (val_split is not None or evaluator is not None) and
        validation.is_evaluation_point(done, total_steps,
                                       batches.steps_per_epoch, config))
    if at_evaluation:
      check_pending()
      evaluate_point(done)
    if run_dir.sigterm_received():
      wish = _SIGTERM
    elif (time_limit_seconds is not None and
          time.time() - t_begin >= time_limit_seconds):
      wish = _OUT_OF_TIME
    else:
      wish = _GO_ON
    # Every process takes part in the agreement at every step, the last
    # included, so that they dispatch the same collectives.
    stopped = stops.after_step(wish)
    if done == total_steps:
      stopped = _GO_ON  # the run is finished: nothing to stop
    if (done % config.checkpoint_every_steps == 0 or done == total_steps or
        at_evaluation or stopped):
      check_pending()
      _check_samples_finite(config, model, state, done, mngr, workdir)
      checkpoints.save(mngr, state)
      evaluations.commit()
    if stopped == _OUT_OF_TIME:
      logging.info("Time limit of %.0f s reached: stopped after step %d of "
                   "%d; the same command resumes from here",
                   time_limit_seconds, done, total_steps)
    if stopped:
      break

  check_pending()
  writer.flush()
  evaluations.close()
  if stopped == _SIGTERM:
    mngr.close()
    logging.info("SIGTERM: stopped after step %d of %d, its checkpoint "
                 "saved", done, total_steps)
    raise StoppedBySignal(done)
  if stopped:
    mngr.close()
    return state
  if jax.process_index() == 0:
    write_sample_grid(config, model, train_step_lib.eval_variables(state),
                      os.path.join(workdir, "samples.png"))
  mngr.close()
  logging.info("Done: %d steps in %s; samples in %s", total_steps,
               _format_eta(time.time() - t_start),
               os.path.join(workdir, "samples.png"))
  return state


def _flat(config, prefix="") -> Dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = str(value) if isinstance(value, (tuple, list)) \
          else value
  return out
