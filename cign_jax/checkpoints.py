"""Checkpoints of a run directory (orbax), and loading a model from one.

Layout of a run directory (`--workdir`):

  WORKDIR/config.json          the run's config (every field)
  WORKDIR/checkpoints/<step>/  orbax checkpoints of {step, params,
                               batch_stats, opt_state}, the last few kept

Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a process killed while saving leaves the earlier checkpoints
intact; unfinished temporaries are cleaned on the next start. The same format
is written by training and by `cign_jax.interop.convert` (PyTorch import, fresh
optimiser state, step 0), and read by `sample` and `evaluate`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

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


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt or does not match the config."""


def save_config(workdir: str, config: ml_collections.ConfigDict):
  os.makedirs(workdir, exist_ok=True)
  run_dir.atomic_write_text(os.path.join(workdir, CONFIG_FILE),
                            config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(f"no {CONFIG_FILE} in {workdir}: not a cign_jax run "
                          "directory (train with cign_jax.main or import with "
                          "cign_jax.interop.convert)")
  try:
    with open(path) as f:
      raw = json.load(f)
  except ValueError as e:
    raise CheckpointError(
        f"{path} is damaged (not valid JSON: {e}); restore it from a copy, "
        "or write it again from the run's config file with the same "
        "settings") from None
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


def manager(workdir: str, keep: int = 3, create: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
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
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  if read_only:
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, cleanup_tmp_directories=False,
        max_to_keep=None, save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def state_tree(state: train_step_lib.TrainState) -> Dict[str, Any]:
  """What a checkpoint holds: the state's arrays, no functions (and the
  parameters' moving average when the run keeps one)."""
  tree = {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "opt_state": state.opt_state}
  if state.ema_params is not None:
    tree["ema_params"] = state.ema_params
  return tree


def save(mngr: ocp.CheckpointManager, state: train_step_lib.TrainState,
         wait: bool = True):
  step = int(jax.device_get(state.step))
  tree = state_tree(state)
  mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
  if wait:
    mngr.wait_until_finished()
    # The digest of what was saved, recorded once the step is complete;
    # `restore` compares it with what it reads back.
    if jax.process_index() == 0:
      run_dir.write_digest(_step_dir(mngr, step), run_dir.tree_digest(tree))


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _verified(mngr: ocp.CheckpointManager, step: int, target) -> Any:
  """Restores `step` onto `target` and checks it against its recorded
  digest; raises on an unreadable or altered step."""
  tree = mngr.restore(step, args=ocp.args.StandardRestore(target))
  recorded = run_dir.read_digest(_step_dir(mngr, step))
  if recorded is not None and recorded != run_dir.tree_digest(tree):
    raise CheckpointError(
        "its tensors do not match the checksum recorded when it was saved "
        f"({run_dir.CHECKSUM_FILE})")
  return tree


def _corrupt_step_error(mngr, step: int, target, cause: Exception
                        ) -> CheckpointError:
  """One message for a corrupt step: which, why, the good steps, the fix."""
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
  reason = str(cause) if isinstance(cause, CheckpointError) else \
      f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
  if good:
    fix = (f"good steps there: {', '.join(map(str, sorted(good)))}. To go "
           f"on from step {good[0]}, move {path} out of the checkpoint "
           f"directory (training then resumes from step {good[0]}), or read "
           f"it with --step={good[0]} (sample)")
  else:
    fix = "no other step there restores; train again in a new --workdir"
  return CheckpointError(f"checkpoint of step {step} ({path}) is corrupt: "
                         f"{reason}; {fix}")


def _describe_mismatch(stored, target) -> Optional[str]:
  """The first key whose presence or shape differs, or None."""
  flat_stored = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(stored)[0]}
  flat_target = {jax.tree_util.keystr(k): v for k, v in
                 jax.tree_util.tree_flatten_with_path(target)[0]}
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
      return f"key {key} has shape {s_shape} in the checkpoint, {t_shape} " \
             "expected by the config"
  return None


def restore(mngr: ocp.CheckpointManager, state: train_step_lib.TrainState,
            step: Optional[int] = None) -> train_step_lib.TrainState:
  """Restores `step` (default: latest) into the structure, shapes and
  shardings of `state`; clear errors for a corrupt or mismatched one."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {mngr.directory}")
  if step not in mngr.all_steps():
    steps = ", ".join(str(s) for s in sorted(mngr.all_steps())) or "none"
    raise CheckpointError(f"no checkpoint of step {step} in {mngr.directory}; "
                          f"the steps there: {steps}")
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
    stored = mngr.item_metadata(step)
  except Exception as e:  # pylint: disable=broad-except
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
      problem = _describe_mismatch({part: stored_tree[part]},
                                   {part: target[part]})
      if problem:
        break
    if not problem and "ema_params" in stored_tree and \
        "ema_params" not in target:
      problem = ("the checkpoint holds a parameter average (ema_params) "
                 "but the config's ema_decay is 0")
    if problem:
      raise CheckpointError(f"checkpoint {path} does not match the config: "
                            f"{problem}")
  try:
    tree = _verified(mngr, step, target)
  except Exception as e:  # pylint: disable=broad-except
    raise _corrupt_step_error(mngr, step, target, e) from None
  return state.replace(step=tree["step"], params=tree["params"],
                       batch_stats=tree["batch_stats"],
                       opt_state=tree["opt_state"],
                       ema_params=tree.get("ema_params"))


def load_model(workdir: str, step: Optional[int] = None
               ) -> Tuple[ml_collections.ConfigDict, models.IdempotentNetwork,
                          Dict[str, Any], int]:
  """Loads a run directory's model for sampling or evaluation.

  Args:
    workdir: a run directory written by training or by `convert`.
    step: the checkpoint step; None for the latest.

  Returns:
    (config, model, variables, step): the run's config, the
    `IdempotentNetwork` it describes, its variables for evaluation
    ({'params', 'batch_stats'}; the moving-average parameters when the run
    keeps them) and the step they are from.
  """
  config = load_config(workdir)
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise CheckpointError(f"no checkpoints in {workdir}")
  model = models.model_from_config(config)
  # Only the structure and shapes are needed: no initialisation is run.
  state = jax.eval_shape(
      lambda: train_step_lib.create_train_state(config, model=model))
  mngr = manager(workdir, read_only=True)
  state = restore(mngr, state, step)
  mngr.close()
  return (config, model, train_step_lib.eval_variables(state),
          int(np.asarray(state.step)))
