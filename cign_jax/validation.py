"""Validation as the original does it, and the run's best checkpoint.

Validation loss: the five loss terms of `cign_jax.losses` and their total
on the test split in eval mode (running BatchNorm statistics, no dropout,
no training-image noise), in batches of `config.batch_size` (the last one
partial), averaged weighted by batch size, as PyTorch Lightning averages the
original's `validation_step`. The prior noise and the mismatch labels of
validation depend only on (config.seed, epoch).

Evaluation points: every `config.eval_every_epochs` epochs, every
`config.eval_every_steps` steps and the last step. At each the loop computes
the validation loss and any in-loop metric (`cign_jax.evaluation.in_loop`,
passed to the loop as an evaluator), records them in
WORKDIR/evaluations.json, keeps the best checkpoint by `config.best_metric`
in WORKDIR/best/ (orbax, the same format as WORKDIR/checkpoints/) with
WORKDIR/best.json naming its step, metric and value, and then saves the
latest checkpoint.

Order of the writes at an evaluation point of step S, so that a run killed
anywhere resumes to the same best checkpoint: (1) if S is better, S is saved
to best/ beside the previous best; (2) evaluations.json and best.json are
rewritten with S's record; (3) the latest checkpoint of S is saved; (4) the
older best is deleted. Resuming from the latest checkpoint R keeps the
records of steps <= R, takes the best among them (its checkpoint is in
best/: it is deleted only after a later latest checkpoint exists) and deletes
anything newer from best/.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, List, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cign_jax import checkpoints
from cign_jax import losses
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.data import reader

EVALUATIONS_FILE = "evaluations.json"
# Folded into the seed so validation's draws differ from training's.
_VALIDATION_STREAM = 0x7A11D
# {metric: lower is better (True / False), or None: ranks nothing}, as the
# metric modules of cign_jax.evaluation declare them (`declare_directions`,
# called by its registry when it loads them).
_DIRECTIONS: Dict[str, Optional[bool]] = {}


def declare_directions(directions: Dict[str, Optional[bool]]) -> None:
  """Records which way each named metric is better (the evaluation's
  registry declares its metrics here; the core does not import it)."""
  _DIRECTIONS.update(directions)


def lower_is_better(metric: str) -> bool:
  """The validation losses and declared lower-better metrics: True; any
  other metric (one of an evaluator of your own) counts as higher-better."""
  if metric.startswith("val_loss"):
    return True
  return bool(_DIRECTIONS.get(metric, False))


def is_better(metric: str, value: float, best: Optional[float]) -> bool:
  """Strictly better than `best` (None: anything is); NaN never is."""
  if value is None or not np.isfinite(value):
    return False
  if best is None:
    return True
  return value < best if lower_is_better(metric) else value > best


def is_evaluation_point(
    done: int,
    total_steps: int,
    steps_per_epoch: int,
    config: ml_collections.ConfigDict,
) -> bool:
  """Whether the loop evaluates after `done` steps."""
  if done == total_steps:
    return True
  if config.eval_every_steps > 0 and done % config.eval_every_steps == 0:
    return True
  every = int(config.eval_every_epochs)
  return (
      every > 0
      and done % steps_per_epoch == 0
      and (done // steps_per_epoch) % every == 0
  )


def validation_key(seed: int, epoch: int):
  """The key of validation's draws at `epoch`: a function of (seed, epoch)."""
  key = jax.random.fold_in(jax.random.key(seed), _VALIDATION_STREAM)
  return jax.random.fold_in(key, epoch)


def _eval_mode(apply_fn):
  """`apply_fn` in the calling convention `losses.idempotent_loss` uses for
  training, run in eval mode: running BatchNorm statistics (left unchanged)
  and no dropout."""

  def apply(variables, x, labels, train=True, rngs=None, mutable=()):
    del train, rngs, mutable
    return (
        apply_fn(variables, x, labels, train=False),
        {"batch_stats": variables["batch_stats"]},
    )

  return apply


@functools.partial(jax.jit, static_argnames=("model", "loss_cfg"))
def _batch_loss(model, loss_cfg, variables, images, labels, key):
  total, (terms, _) = losses.idempotent_loss(
      _eval_mode(model.apply),
      variables["params"],
      variables["batch_stats"],
      images,
      labels,
      key,
      loss_cfg,
  )
  return dict(terms, loss=total)


def validation_loss(
    model,
    variables: Dict[str, Any],
    images_u8,
    labels,
    config: ml_collections.ConfigDict,
    epoch: int,
) -> Dict[str, float]:
  """The five weighted loss terms and their total on a split, in eval mode.

  Args:
    model: the `IdempotentNetwork`.
    variables: {'params', 'batch_stats'} (`train_step.eval_variables`).
    images_u8: uint8 images (N, H, W, C) (the test split).
    labels: their labels (N,).
    config: the run's config (loss weights, batch size, seed).
    epoch: the epoch the draws are keyed by.

  Returns:
    {'val_loss', 'val_loss_rec', 'val_loss_idem_noise', ...}: batch means
    averaged weighted by batch size.
  """
  images_u8 = np.asarray(images_u8)
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  if n == 0:
    raise ValueError("validation needs at least one test image")
  loss_cfg = losses.LossConfig.from_config(config)
  key = validation_key(int(config.seed), int(epoch))
  bs = int(config.batch_size)
  sums: Dict[str, float] = {}
  for i, start in enumerate(range(0, n, bs)):
    x = reader.to_model_range(images_u8[start : start + bs])
    c = labels[start : start + bs]
    out = jax.device_get(
        _batch_loss(
            model,
            loss_cfg,
            variables,
            jnp.asarray(x),
            jnp.asarray(c),
            jax.random.fold_in(key, i),
        )
    )
    for name, value in out.items():
      sums[name] = sums.get(name, 0.0) + float(value) * len(c)
  return {f"val_{name}": value / n for name, value in sums.items()}


def validation_split(config: ml_collections.ConfigDict, test):
  """The first `config.eval_num_examples` of `test` ((images, labels)), or
  None when the run computes no validation loss."""
  if config.eval_num_examples == 0 or test is None:
    return None
  images, labels = test
  if config.eval_num_examples > 0:
    images = images[: config.eval_num_examples]
    labels = labels[: config.eval_num_examples]
  return np.asarray(images), np.asarray(labels)


# --- The record of evaluations and the best checkpoint ----------------------


class BestCheckpoint:
  """The run's evaluation record and its best checkpoint (see the module
  docstring for the files and the order they are written in)."""

  def __init__(self, workdir: str, metric: str):
    self.workdir = workdir
    self.metric = metric
    self.history: List[Dict[str, Any]] = []
    self.best: Optional[Dict[str, Any]] = None
    self._mngr = None
    self._stale: List[int] = []
    path = os.path.join(workdir, EVALUATIONS_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        saved = json.load(f)
      if saved.get("best_metric", metric) != metric:
        raise ValueError(
            f"{path} ranks checkpoints by {saved.get('best_metric')!r}, the "
            f"config by {metric!r}; use a new run directory or the same "
            "config.best_metric"
        )
      self.history = list(saved.get("history", []))
    if metric:
      self._mngr = checkpoints.best_manager(workdir)

  def resume(self, step: int):
    """Forgets records after `step` (the restored checkpoint) and brings
    best/ back to the best record up to it."""
    dropped = [r["step"] for r in self.history if r["step"] > step]
    if dropped:
      logging.info(
          "Evaluations after step %d (%s) are dropped: the run "
          "resumes from step %d and will redo them",
          step,
          dropped,
          step,
      )
    self.history = [r for r in self.history if r["step"] <= step]
    self.best = self._best_record()
    if self._mngr is None:
      return
    stored = list(self._mngr.all_steps())
    keep = self.best["step"] if self.best else None
    for s in stored:
      if s != keep:
        self._mngr.delete(s)
    if keep is not None and keep not in stored:
      logging.warning(
          "The best checkpoint (step %d by %s) is missing from "
          "%s; it is kept again from the next better evaluation",
          keep,
          self.metric,
          checkpoints.best_dir(self.workdir),
      )
      self.best = None
    self._write()

  def _best_record(self):
    best = None
    for record in self.history:
      value = record.get(self.metric)
      if self.metric and is_better(
          self.metric, value, None if best is None else best[self.metric]
      ):
        best = record
    return best

  def record(
      self, state: train_step_lib.TrainState, metrics: Dict[str, Any]
  ) -> bool:
    """Records an evaluation of `state`; saves it to best/ when better.
    Returns whether it became the best. Call `commit()` after the latest
    checkpoint of the same step is saved."""
    step = int(jax.device_get(state.step))
    record = {"step": step, **{k: v for k, v in metrics.items()}}
    improved = False
    if self._mngr is not None and is_better(
        self.metric,
        record.get(self.metric),
        None if self.best is None else self.best[self.metric],
    ):
      if step in self._mngr.all_steps():
        self._mngr.delete(step)
      checkpoints.save(self._mngr, state)
      self._stale = [s for s in self._mngr.all_steps() if s != step]
      self.best = record
      improved = True
    self.history = [r for r in self.history if r["step"] != step] + [record]
    if jax.process_index() == 0:
      self._write()
    return improved

  def commit(self):
    """Deletes the previous best once a later latest checkpoint exists."""
    for s in self._stale:
      self._mngr.delete(s)
    self._stale = []

  def _write(self):
    if jax.process_index() != 0:
      return
    payload = {
        "best_metric": self.metric,
        "lower_is_better": bool(self.metric and lower_is_better(self.metric)),
        "best": self.best,
        "history": self.history,
    }
    _write_json(os.path.join(self.workdir, EVALUATIONS_FILE), payload)
    if self.metric:
      best_path = os.path.join(self.workdir, checkpoints.BEST_FILE)
      if self.best is None:
        if os.path.exists(best_path):
          os.remove(best_path)
      else:
        _write_json(
            best_path,
            {
                "step": self.best["step"],
                "metric": self.metric,
                "value": self.best[self.metric],
            },
        )

  def close(self):
    if self._mngr is not None:
      self._mngr.close()


def _write_json(path: str, payload):
  with utils.atomic_write(path, "w") as f:
    json.dump(payload, f, indent=2)
