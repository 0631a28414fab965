"""Checkpoints of a run directory (orbax), and loading a model from one.

Layout of a run directory (the commands' `--workdir`):

  WORKDIR/config.json          the run's config (every field)
  WORKDIR/checkpoints/<step>/  orbax checkpoints of {step, params,
                               batch_stats, opt_state} (item `default`) and
                               the SHA-256 of those tensors (item
                               `checksum`), the last few kept
  WORKDIR/best/<step>/         the best checkpoint by config.best_metric
                               (same format; cign_jax.validation)
  WORKDIR/best.json            its step, metric and value
  WORKDIR/evaluations.json     every evaluation point's metrics

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a process killed while saving leaves the earlier checkpoints
intact; unfinished temporaries are cleaned on the next start. The checksum is
an item of the same save, so it is committed with the tensors: a step without
one (left by earlier versions, which wrote it after the commit, when stopped
between the two) is incomplete and is not restored. The same format
is written by training and by `cign_jax.interop.convert` (PyTorch import, fresh
optimiser state, step 0), and read by `sample` and `evaluate`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import run_dir
from cign_jax import train_step as train_step_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
BEST_FILE = "best.json"


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt or does not match the config."""


def save_config(workdir: str, config: ml_collections.ConfigDict):
  os.makedirs(workdir, exist_ok=True)
  run_dir.atomic_write_text(
      os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2)
  )


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"no {CONFIG_FILE} in {workdir}: not a cign_jax run "
        "directory (train with cign_jax.main or import with "
        "cign_jax.interop.convert)"
    )
  try:
    with open(path) as f:
      raw = json.load(f)
  except ValueError as e:
    raise CheckpointError(
        f"{path} is damaged (not valid JSON: {e}); restore it from a copy, "
        "or write it again from the run's config file with the same "
        "settings"
    ) from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{path} does not hold a config (a JSON object)")
  config = config_lib.base_config()

  def fill(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise CheckpointError(f"{path}: unknown config key {prefix}{key}")
      if isinstance(node[key], ml_collections.ConfigDict):
        fill(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(value, list) else value

  fill(config, raw, "")
  return config_lib.validate(config)


# The orbax items of a step: the tensors and their digest, saved together.
# The tensors keep orbax's name for a single item, under which earlier
# versions saved them, so that their steps still read.
STATE_ITEM = "default"


def _item_handlers():
  return {
      STATE_ITEM: ocp.StandardCheckpointHandler(),
      run_dir.CHECKSUM_ITEM: ocp.JsonCheckpointHandler(
          filename=run_dir.CHECKSUM_FILE
      ),
  }


def _manager(
    directory: str, keep: Optional[int], create: bool, read_only: bool
) -> ocp.CheckpointManager:
  if read_only:
    options = ocp.CheckpointManagerOptions(
        read_only=True,
        create=False,
        cleanup_tmp_directories=False,
        max_to_keep=None,
        save_interval_steps=0,
    )
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, cleanup_tmp_directories=True
    )
  return ocp.CheckpointManager(
      directory, options=options, item_handlers=_item_handlers()
  )


def manager(
    workdir: str, keep: int = 3, create: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The run's checkpoint manager.

  Args:
    workdir: the run directory.
    keep: how many checkpoints a writer keeps.
    create: create the checkpoint directory when missing (writers).
    read_only: for readers (sampling, evaluation, `load_model`): nothing is
      created, deleted or cleaned, so a training that is saving beside the
      reader keeps its unfinished temporary directory.

  Returns:
    An orbax CheckpointManager.
  """
  return _manager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
      keep,
      create,
      read_only,
  )


def state_tree(state: train_step_lib.TrainState) -> Dict[str, Any]:
  """What a checkpoint holds: the state's arrays, no functions (and the
  parameters' moving average when the run keeps one)."""
  tree = {
      "step": state.step,
      "params": state.params,
      "batch_stats": state.batch_stats,
      "opt_state": state.opt_state,
  }
  if state.ema_params is not None:
    tree["ema_params"] = state.ema_params
  return tree


def save(
    mngr: ocp.CheckpointManager,
    state: train_step_lib.TrainState,
    wait: bool = True,
):
  """Saves `state` as the step it holds, with the digest of its tensors.

  The digest is a second item of the same orbax save, so it is written into
  the step's temporary directory and committed with the tensors by the
  same rename: a step either has both or is not there (`restore` compares
  the digest with what it reads back).

  Args:
    mngr: a writer's manager (`manager`, `best_manager`).
    state: the state to save.
    wait: wait until the step is committed (else it is committed in the
      background; `mngr.wait_until_finished()` waits for it).
  """
  step = int(jax.device_get(state.step))
  tree = state_tree(state)
  mngr.save(
      step,
      args=ocp.args.Composite(
          **{
              STATE_ITEM: ocp.args.StandardSave(tree),
              run_dir.CHECKSUM_ITEM: ocp.args.JsonSave(
                  {"sha256": run_dir.tree_digest(tree)}
              ),
          }
      ),
      force=True,
  )
  if wait:
    mngr.wait_until_finished()


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


class _IncompleteStep(CheckpointError):
  """A step without its checksum: its save did not finish."""


def _check_complete(mngr: ocp.CheckpointManager, step: int) -> str:
  """The recorded digest of `step`; raises `_IncompleteStep` when there is
  none."""
  recorded = run_dir.read_digest(_step_dir(mngr, step))
  if recorded is None:
    raise _IncompleteStep(
        f"it has no checksum ({run_dir.CHECKSUM_FILE}), which is saved "
        "together with the tensors: its save did not finish (an earlier "
        "cign_jax wrote the checksum after the tensors, and a run stopped "
        "between the two leaves such a step), so it is not restored"
    )
  return recorded


def _verified(mngr: ocp.CheckpointManager, step: int, target) -> Any:
  """Restores `step` onto `target` and checks it against its recorded
  digest; raises on an incomplete, unreadable or altered step."""
  recorded = _check_complete(mngr, step)
  if recorded == "unreadable":
    raise CheckpointError(
        f"its checksum file ({run_dir.CHECKSUM_FILE}) is " "damaged"
    )
  tree = mngr.restore(
      step,
      args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}),
  )[STATE_ITEM]
  if recorded != run_dir.tree_digest(tree):
    raise CheckpointError(
        "its tensors do not match the checksum recorded when it was saved "
        f"({run_dir.CHECKSUM_FILE})"
    )
  return tree


def _corrupt_step_error(
    mngr, step: int, target, cause: Exception
) -> CheckpointError:
  """One message for a corrupt or incomplete step: which, why, the good
  steps, the fix."""
  good = []
  for other in sorted(mngr.all_steps(), reverse=True):
    if other == step:
      continue
    try:
      _verified(mngr, other, target)
      good.append(other)
    except Exception:  # pylint: disable=broad-except
      pass
  path = _step_dir(mngr, step)
  reason = (
      str(cause)
      if isinstance(cause, CheckpointError)
      else f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
  )
  if good:
    fix = (
        f"good steps there: {', '.join(map(str, sorted(good)))}. To go "
        f"on from step {good[0]}, move {path} out of the checkpoint "
        f"directory (training then resumes from step {good[0]}), or "
        f"read that step with checkpoint={good[0]}"
    )
  else:
    fix = (
        f"no other step there restores; move {path} out of the "
        "checkpoint directory to train from the start, or train again in "
        "a new run directory"
    )
  kind = "incomplete" if isinstance(cause, _IncompleteStep) else "corrupt"
  return CheckpointError(
      f"checkpoint of step {step} ({path}) is {kind}: " f"{reason}; {fix}"
  )


def _describe_mismatch(stored, target) -> Optional[str]:
  """The first key whose presence or shape differs, or None."""
  flat_stored = {
      jax.tree_util.keystr(k): v
      for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]
  }
  flat_target = {
      jax.tree_util.keystr(k): v
      for k, v in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  for key in sorted(flat_target):
    if key not in flat_stored:
      return f"missing key {key}"
  for key in sorted(flat_stored):
    if key not in flat_target:
      return f"unexpected key {key}"
  for key in sorted(flat_target):
    s_shape = tuple(getattr(flat_stored[key], "shape", ()) or ())
    t_shape = tuple(getattr(flat_target[key], "shape", ()) or ())
    if s_shape != t_shape:
      return (
          f"key {key} has shape {s_shape} in the checkpoint, {t_shape} "
          "expected by the config"
      )
  return None


class CheckpointGoneError(CheckpointError):
  """A step that was deleted while it was read: a training beside the
  reader keeps only its latest steps, and replaces its best."""


def _raise_if_gone(path: str, step: int) -> None:
  """Raises `CheckpointGoneError` when a step whose read failed is no longer
  there: then the failure says nothing of the checkpoint's health."""
  if not os.path.isdir(path):
    raise CheckpointGoneError(
        f"checkpoint of step {step} ({path}) was deleted while it was read "
        "(the training keeps only its latest steps and its best); read "
        "again, or choose a step that is kept"
    ) from None


def restore(
    mngr: ocp.CheckpointManager,
    state: train_step_lib.TrainState,
    step: Optional[int] = None,
) -> train_step_lib.TrainState:
  """Restores `step` (default: latest) into the structure, shapes and
  shardings of `state`; clear errors for a corrupt or mismatched one."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {mngr.directory}")
  if step not in mngr.all_steps():
    steps = ", ".join(str(s) for s in sorted(mngr.all_steps())) or "none"
    raise CheckpointError(
        f"no checkpoint of step {step} in {mngr.directory}; "
        f"the steps there: {steps}"
    )
  path = os.path.join(str(mngr.directory), str(step))
  # A shape-only target (jax.eval_shape) has no sharding; orbax would then
  # restore onto the devices the checkpoint was saved from, which may not
  # exist here (a 4-device run read on 1): use the first local device.
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def to_target(leaf):
    if isinstance(leaf, (int, float)):  # TrainState.create's step is an int
      leaf = np.asarray(leaf)
    leaf = ocp.utils.to_shape_dtype_struct(leaf)
    if getattr(leaf, "sharding", None) is None:
      leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=local)
    return leaf

  target = jax.tree_util.tree_map(to_target, state_tree(state))
  try:
    _check_complete(mngr, step)
    stored = mngr.item_metadata(step)[STATE_ITEM]
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_gone(path, step)
    raise _corrupt_step_error(mngr, step, target, e) from None
  stored_tree = getattr(stored, "tree", stored)
  if isinstance(stored_tree, dict):
    problem = None
    for part in ("params", "batch_stats", "ema_params"):
      if part not in target:
        continue
      if part not in stored_tree:
        problem = f"missing key ['{part}']"
        break
      problem = _describe_mismatch(
          {part: stored_tree[part]}, {part: target[part]}
      )
      if problem:
        break
    if (
        not problem
        and "ema_params" in stored_tree
        and "ema_params" not in target
    ):
      problem = (
          "the checkpoint holds a parameter average (ema_params) "
          "but the config's ema_decay is 0"
      )
    if problem:
      raise CheckpointError(
          f"checkpoint {path} does not match the config: " f"{problem}"
      )
  try:
    tree = _verified(mngr, step, target)
  except Exception as e:  # pylint: disable=broad-except
    _raise_if_gone(path, step)
    raise _corrupt_step_error(mngr, step, target, e) from None
  return state.replace(
      step=tree["step"],
      params=tree["params"],
      batch_stats=tree["batch_stats"],
      opt_state=tree["opt_state"],
      ema_params=tree.get("ema_params"),
  )


def load_model(
    workdir: str, step: Optional[int] = None, checkpoint: Optional[str] = None
) -> Tuple[
    ml_collections.ConfigDict, models.IdempotentNetwork, Dict[str, Any], int
]:
  """Loads a run directory's model for sampling or evaluation.

  Args:
    workdir: a run directory written by training or by `convert`.
    step: the checkpoint step (the same as checkpoint=str(step)).
    checkpoint: 'best', 'latest' or a step number; None: the best
      checkpoint when the run keeps one, else the latest
      (`resolve_checkpoint` says which and why).

  Returns:
    (config, model, variables, step): the run's config, the
    `IdempotentNetwork` it describes, its variables for evaluation
    ({'params', 'batch_stats'}; the moving-average parameters when the run
    keeps them) and the step they are from.
  """
  return load_chosen_model(
      workdir, step if checkpoint is None and step is not None else checkpoint
  )[1]


# How often a reader chooses again when a training deletes the checkpoint
# it chose while reading it (one save per step, a few kept, can do that
# more than once in a row on a loaded machine).
_READ_TRIES = 5


def load_chosen_model(workdir: str, checkpoint=None):
  """`load_model` that also says which checkpoint it read, and why.

  A checkpoint chosen by rule (best, latest, or the default) that the
  training deletes while it is read (it keeps only its latest steps and
  replaces its best) is chosen again, so that the reason and the weights
  returned are always of one checkpoint; a requested step is not replaced.

  Args:
    workdir: a run directory.
    checkpoint: as `resolve_checkpoint`'s (a `ChosenCheckpoint` too).

  Returns:
    (chosen, (config, model, variables, step)): the `ChosenCheckpoint` read
    and what `load_model` returns.
  """
  config = load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise CheckpointError(f"no checkpoints in {workdir}")
  by_rule = not isinstance(checkpoint, ChosenCheckpoint) and str(
      "" if checkpoint is None else checkpoint
  ).strip() in ("", "best", "latest")
  model = models.model_from_config(config)
  # Only the structure and shapes are needed: no initialisation is run.
  shapes = jax.eval_shape(
      lambda: train_step_lib.create_train_state(config, model=model)
  )
  for attempt in range(_READ_TRIES):
    chosen = resolve_checkpoint(workdir, checkpoint)
    if chosen.directory == BEST_DIR:
      mngr = best_manager(workdir, read_only=True)
    else:
      mngr = manager(workdir, read_only=True)
    try:
      state = restore(mngr, shapes, chosen.step)
    except CheckpointError:
      gone = not os.path.isdir(
          os.path.join(workdir, chosen.directory, str(chosen.step))
      )
      if not (by_rule and gone) or attempt == _READ_TRIES - 1:
        raise
      continue
    finally:
      mngr.close()
    return chosen, (
        config,
        model,
        train_step_lib.eval_variables(state),
        int(np.asarray(state.step)),
    )
  raise AssertionError("unreachable")


# --- The best checkpoint and choosing a checkpoint --------------------------


def best_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, BEST_DIR))


def best_manager(
    workdir: str, create: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """The manager of WORKDIR/best/ (cign_jax.validation deletes what it no
  longer needs, so that a killed run always keeps its best); `read_only` as
  in `manager`."""
  return _manager(best_dir(workdir), None, create, read_only)


def _stored_steps(directory: str) -> list:
  if not os.path.isdir(directory):
    return []
  return sorted(
      int(name)
      for name in os.listdir(directory)
      if name.isdigit() and os.path.isdir(os.path.join(directory, name))
  )


def read_best(workdir: str) -> Optional[Dict[str, Any]]:
  """WORKDIR/best.json ({'step', 'metric', 'value'}) when its checkpoint is
  in WORKDIR/best/, else None."""
  path = os.path.join(workdir, BEST_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      best = json.load(f)
    step = int(best["step"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is unreadable or corrupt: {e}") from e
  if step not in _stored_steps(best_dir(workdir)):
    return None
  return best


class ChosenCheckpoint(NamedTuple):
  """A checkpoint of a run: its step, where it is (CHECKPOINT_DIR or
  BEST_DIR) and why it was chosen, in words."""

  step: int
  directory: str
  reason: str


def resolve_checkpoint(workdir: str, checkpoint=None) -> ChosenCheckpoint:
  """Which checkpoint 'best', 'latest' or a step names in `workdir`.

  Args:
    workdir: a run directory.
    checkpoint: 'best', 'latest', a step (int or digits), or None for the
      best when the run keeps one, else the latest.

  Returns:
    A `ChosenCheckpoint` (step, directory, reason).

  Raises:
    CheckpointError: an unknown value, a step that is not stored, or 'best'
      in a run without a best checkpoint; the message lists what there is.
  """
  if isinstance(checkpoint, ChosenCheckpoint):
    return checkpoint
  latest = _stored_steps(os.path.join(workdir, CHECKPOINT_DIR))
  best = read_best(workdir)

  def available():
    parts = [f"latest (step {latest[-1]})" if latest else "no latest"]
    parts.append(
        f"best (step {best['step']} by {best['metric']})" if best else "no best"
    )
    steps = sorted(set(latest) | ({int(best["step"])} if best else set()))
    return (
        f"{', '.join(parts)}; steps there: "
        f"{', '.join(str(s) for s in steps) or 'none'}"
    )

  def from_best(why):
    return ChosenCheckpoint(
        int(best["step"]),
        BEST_DIR,
        f"best checkpoint by {best['metric']} = {best['value']:.6g} "
        f"({why})",
    )

  value = "" if checkpoint is None else str(checkpoint).strip()
  if value == "":
    if best is not None:
      return from_best("the default when the run keeps one")
    if not latest:
      raise CheckpointError(f"no checkpoint in {workdir}")
    return ChosenCheckpoint(
        latest[-1],
        CHECKPOINT_DIR,
        "latest checkpoint (the run keeps no best one)",
    )
  if value == "best":
    if best is None:
      raise CheckpointError(
          f"checkpoint=best: {workdir} has no best checkpoint (its "
          f"config.best_metric is '' or no evaluation point was reached); "
          f"available: {available()}"
      )
    return from_best("checkpoint=best")
  if value == "latest":
    if not latest:
      raise CheckpointError(
          f"checkpoint=latest: no checkpoint in " f"{workdir}"
      )
    return ChosenCheckpoint(
        latest[-1], CHECKPOINT_DIR, "latest checkpoint (checkpoint=latest)"
    )
  if not value.lstrip("-").isdigit():
    raise CheckpointError(
        f"unknown checkpoint value {checkpoint!r}: "
        f"expected best, latest or a step number; "
        f"available: {available()}"
    )
  step = int(value)
  if step in latest:
    return ChosenCheckpoint(
        step, CHECKPOINT_DIR, f"step {step} (checkpoint={step})"
    )
  if best is not None and step == int(best["step"]):
    return from_best(f"checkpoint={step}")
  raise CheckpointError(
      f"checkpoint={step}: no checkpoint of step {step} "
      f"in {workdir}; available: {available()}"
  )
