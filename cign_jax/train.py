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
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

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
from cign_jax import train_step as train_step_lib
from cign_jax.data import reader

# Fields that may change when a run is resumed (how long / how often).
RESUMABLE_CHANGES = ("num_epochs", "num_train_steps", "log_every_steps",
                     "sample_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "mesh_shape", "mesh_axis_names")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


def compile_train_step(config, mesh):
  """The jitted step with the mesh's shardings; the state is donated."""
  step = train_step_lib.make_train_step(config)
  repl, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, batch, batch, repl),
                 out_shardings=(repl, repl), donate_argnums=(0,))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[Any] = None
                       ) -> train_step_lib.TrainState:
  """Trains (or resumes) the run in `workdir`.

  Args:
    config: a validated config (`cign_jax.config`); on resume only the fields
      of `RESUMABLE_CHANGES` may differ from the run's `config.json`.
    workdir: the run directory: checkpoints, TensorBoard events, sample
      grids; resumed from its latest checkpoint when there is one.
    dataset: optional (images uint8 (N, 28, 28, 1), labels) to train on
      instead of the config's tfds dataset (notebooks, tests).

  Returns:
    The final TrainState (replicated over the mesh).

  Raises:
    NonFiniteLossError: a NaN or Inf loss; the last good checkpoint is kept.
    ValueError: a config that does not fit the run or the devices.
  """

  config = config_lib.validate(config)
  # Every check comes before the first write to the run directory, so a
  # refused start leaves it as it was.
  _check_resume_config(workdir, config)
  mesh = sharding.create_mesh(config)
  sharding.check_batch_divides(config, mesh)

  if dataset is None:
    images, labels = reader.load_split(config.data.dataset, "train",
                                         config.data.data_dir)
  else:
    images, labels = dataset
  batches = reader.TrainBatches(images, labels, config.batch_size,
                                  config.seed)
  _check_labels_fit(config, labels)
  total_steps = train_step_lib.total_train_steps(config, batches.num_examples)

  # One writer per run: held until this function returns (or the process
  # ends, when the OS drops it).
  lock = run_dir.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    return _train(config, workdir, mesh, batches, total_steps)
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


def _train(config, workdir, mesh, batches, total_steps):
  """The training loop of `train_and_evaluate`, once every check passed and
  the run's lock is held."""
  model = models.model_from_config(config)
  state = train_step_lib.create_train_state(config, model=model,
                                           total_steps=total_steps)
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
  state = sharding.put_replicated(state, mesh)
  base_key = sharding.put_replicated(jax.random.key(config.seed), mesh)
  step_fn = compile_train_step(config, mesh)
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

    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      check_pending()
      _check_samples_finite(config, model, state, done, mngr, workdir)
      checkpoints.save(mngr, state)

  check_pending()
  writer.flush()
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
