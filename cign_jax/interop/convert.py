"""Imports a checkpoint of the author's PyTorch CIGN into a run directory.

  python -m cign_jax.convert --torch_checkpoint=PATH \
      --config=configs/channel_small.py --workdir=OUT [--config.x=y ...]

PATH is a PyTorch Lightning `.ckpt` of the original training (the weights
under `state_dict` with the prefix `model.`; the frozen copy `model_copy.*`
and the other entries are ignored) or a `torch.save`d state dict (keys with
or without `model.`). It is read with `cign_jax.interop.torch_archive`, so PyTorch is
not needed. The config must describe the checkpoint's architecture
(conditioning, latent/intermediate/embedding dims); a checkpoint that does
not match it (missing, unexpected or wrongly shaped keys) is refused with a
ValueError naming the first offending key.

OUT becomes a run directory of ours (`config.json` and an orbax checkpoint of
step 0 with fresh AdamW state), loadable with `checkpoints.load_model(OUT)`
and usable by `cign_jax.sample` / `cign_jax.evaluate`.

Mapping (original -> ours; our parameter names follow the original's
modules, see `cign_jax.models`):

  {half}.conv_i.weight          conv (Co, Ci, kh, kw) -> kernel (kh, kw, Ci, Co)
                                transposed conv (Ci, Co, kh, kw) -> the same
  {half}.linear_i.weight/bias   (out, in) -> kernel (in, out); bias as is;
                                in the filter model the outputs are permuted
                                from (Ci, kh, kw) to our (kh, kw, Ci) order
  {half}.channel_mixer_i.*      (out, in) -> kernel (in, out); bias as is
  {half}.label_embedder.weight  -> embedding
  {half}.batch_norm_j.weight/bias -> scale/bias; running_mean/var ->
                                batch_stats mean/var; num_batches_tracked is
                                ignored
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import train_step
from cign_jax.interop import torch_archive

# Our leaf name -> the original's parameter/buffer name.
_LEAF_NAMES = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_SUFFIX = ".num_batches_tracked"
_LIGHTNING_PREFIX = "model."
_COPY_PREFIX = "model_copy."


class _Entry:
  """One of our leaves and how it is made from the original's tensor."""

  def __init__(
      self,
      collection: str,
      path: Tuple[str, ...],
      torch_key: str,
      shape: Tuple[int, ...],
      kind: str,
      kernel_size: int = 0,
  ):
    self.collection = collection
    self.path = path
    self.torch_key = torch_key
    self.shape = tuple(shape)  # ours
    self.kind = kind
    self.kernel_size = kernel_size

  def torch_shape(self) -> Tuple[int, ...]:
    s = self.shape
    if self.kind == "conv":  # ours (kh, kw, Ci, Co), torch (Co, Ci, kh, kw)
      return (s[3], s[2], s[0], s[1])
    if self.kind == "conv_transpose":  # torch (Ci, Co, kh, kw)
      return (s[2], s[3], s[0], s[1])
    if self.kind in ("linear", "filter_linear"):  # ours (in, out)
      return (s[1], s[0])
    return s

  def to_ours(self, value: np.ndarray, dtype=np.float32) -> np.ndarray:
    v = np.asarray(value, dtype)
    if self.kind == "conv":
      return v.transpose(2, 3, 1, 0)
    if self.kind == "conv_transpose":
      return v.transpose(2, 3, 0, 1)
    if self.kind == "linear":
      return v.T
    if self.kind in ("filter_linear", "filter_bias"):
      k = self.kernel_size
      rows = v.shape[0]
      ci = rows // (k * k)
      # Outputs (rows) from the original's (Ci, kh, kw) to our (kh, kw, Ci).
      v = v.reshape((ci, k, k) + v.shape[1:])
      v = np.moveaxis(v, 0, 2).reshape((rows,) + v.shape[3:])
      return v.T if self.kind == "filter_linear" else v
    return v

  def from_ours(self, value: np.ndarray) -> np.ndarray:
    """The inverse of `to_ours` (our array -> the original's layout)."""
    v = np.asarray(value)
    if self.kind == "conv":
      return v.transpose(3, 2, 0, 1)
    if self.kind == "conv_transpose":
      return v.transpose(2, 3, 0, 1)
    if self.kind == "linear":
      return v.T
    if self.kind in ("filter_linear", "filter_bias"):
      k = self.kernel_size
      if self.kind == "filter_linear":
        v = v.T
      rows = v.shape[0]
      ci = rows // (k * k)
      v = v.reshape((k, k, ci) + v.shape[1:])
      return np.moveaxis(v, 2, 0).reshape((rows,) + v.shape[3:])
    return v


def _entries(config) -> List[_Entry]:
  """Our variables for `config`, each with its original key and layout."""
  architecture = config.model.get("architecture", "cign")
  if architecture != "cign":
    raise ValueError(
        f"config.model.architecture: only the CIGN network "
        f"('cign') has a checkpoint mapping, got "
        f"{architecture!r}"
    )
  model = models.model_from_config(config)
  shapes = jax.eval_shape(
      lambda k: models.init_variables(model, k), jax.random.key(0)
  )
  layouts = {
      "discriminator": models.DISCRIMINATOR_LAYOUT,
      "generator": models.GENERATOR_LAYOUT,
  }
  conditioning = config.model.conditioning
  entries = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(str(getattr(p, "key", p)) for p in path)
    collection, half, module, leaf_name = (
        names[0],
        names[1],
        names[-2],
        names[-1],
    )
    torch_key = f"{half}.{module}.{_LEAF_NAMES[leaf_name]}"
    kind, k = "plain", 0
    if module.startswith("conv_"):
      kind = "conv_transpose" if half == "generator" else "conv"
    elif module.startswith("channel_mixer_"):
      kind = "linear" if leaf_name == "kernel" else "plain"
    elif module.startswith("linear_"):
      if conditioning == "filter":
        k = layouts[half][int(module.split("_")[-1]) - 1][0]
        kind = "filter_linear" if leaf_name == "kernel" else "filter_bias"
      else:
        kind = "linear" if leaf_name == "kernel" else "plain"
    entries.append(
        _Entry(collection, names[1:], torch_key, leaf.shape, kind, k)
    )
  order = _torch_order(config)
  entries.sort(key=lambda e: order.get(e.torch_key, len(order)))
  return entries


def _torch_order(config) -> Dict[str, int]:
  """Rank of each key in the original's `state_dict()` order (conv_*,
  batch_norm_*, channel_mixer_*, label_embedder, linear_*; each half)."""
  keys = []
  for half, norms in (("discriminator", 4), ("generator", 5)):
    keys += [f"{half}.conv_{i}.weight" for i in range(1, 6)]
    for j in range(1, norms + 1):
      keys += [
          f"{half}.batch_norm_{j}.{n}"
          for n in ("weight", "bias", "running_mean", "running_var")
      ]
    for i in range(1, 6):
      keys += [
          f"{half}.channel_mixer_{i}.weight",
          f"{half}.channel_mixer_{i}.bias",
      ]
    keys.append(f"{half}.label_embedder.weight")
    for i in range(1, 6):
      keys += [f"{half}.linear_{i}.weight", f"{half}.linear_{i}.bias"]
  return {k: n for n, k in enumerate(keys)}


def _describe(config) -> str:
  m = config.model
  return (
      f"conditioning={m.conditioning!r}, latent_dim={m.latent_dim}, "
      f"intermediate_dim={m.intermediate_dim}, "
      f"embedding_dim={m.embedding_dim}"
  )


def expected_torch_shapes(config) -> Dict[str, Tuple[int, ...]]:
  """The original's state-dict keys and shapes for `config` (without
  num_batches_tracked), in the original's order."""
  return {e.torch_key: e.torch_shape() for e in _entries(config)}


def torch_state_dict_to_variables(
    state_dict: Mapping[str, np.ndarray], config, dtype=np.float32
) -> Dict[str, Any]:
  """The original's state dict (keys without prefix) -> our variables
  {'params': ..., 'batch_stats': ...} (nested dicts of numpy arrays of
  `dtype`; float32 unless a test asks for float64).

  Raises ValueError naming the first missing, wrongly shaped or unexpected
  key (`*.num_batches_tracked` buffers are ignored, present or not).

  Args:
    state_dict: the original's parameters and buffers by PyTorch name.
    config: the config of the model the checkpoint holds.
    dtype: the numpy dtype of the result.

  Returns:
    {'params': ..., 'batch_stats': ...} for `models.IdempotentNetwork`.
  """
  entries = _entries(config)
  wanted = {e.torch_key for e in entries}
  out: Dict[str, Any] = {}
  for e in entries:
    if e.torch_key not in state_dict:
      raise ValueError(
          f"missing key {e.torch_key!r} (expected shape {e.torch_shape()}) "
          f"in the checkpoint for a model with {_describe(config)}"
      )
    value = np.asarray(state_dict[e.torch_key])
    if tuple(value.shape) != e.torch_shape():
      raise ValueError(
          f"key {e.torch_key!r} has shape {tuple(value.shape)} in the "
          f"checkpoint, expected {e.torch_shape()} for a model with "
          f"{_describe(config)}"
      )
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(
          f"key {e.torch_key!r} has dtype {value.dtype}, "
          "expected a floating-point tensor"
      )
    node = out.setdefault(e.collection, {})
    for name in e.path[:-1]:
      node = node.setdefault(name, {})
    node[e.path[-1]] = e.to_ours(value, dtype)
  for key in state_dict:
    if key not in wanted and not key.endswith(_IGNORED_SUFFIX):
      raise ValueError(
          f"unexpected key {key!r} (shape "
          f"{tuple(np.shape(state_dict[key]))}) in the checkpoint: not part "
          f"of a model with {_describe(config)}"
      )
  out.setdefault("batch_stats", {})
  return out


def variables_to_torch_state_dict(
    variables: Mapping[str, Any], config
) -> Dict[str, np.ndarray]:
  """The inverse mapping: our variables -> the original's state dict.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of our model.
    config: the config of that model.

  Returns:
    The original's state dict (without num_batches_tracked), numpy arrays.
  """
  result = {}
  for e in _entries(config):
    node = variables[e.collection]
    for name in e.path:
      node = node[name]
    result[e.torch_key] = e.from_ours(np.asarray(node))
  return result


def select_model_state_dict(
    flat: Mapping[str, np.ndarray],
) -> Dict[str, np.ndarray]:
  """The model's weights of a loaded checkpoint: keys under `model.` (the
  Lightning module's model; `model_copy.*` dropped) when there are any, else
  the dict itself."""
  if any(k.startswith(_LIGHTNING_PREFIX) for k in flat):
    n = len(_LIGHTNING_PREFIX)
    return {
        (k[n:] if k.startswith(_LIGHTNING_PREFIX) else k): v
        for k, v in flat.items()
        if not k.startswith(_COPY_PREFIX)
    }
  return dict(flat)


def load_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads a Lightning .ckpt or a saved state dict without PyTorch."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such checkpoint file: {path}")
  return select_model_state_dict(torch_archive.state_dict_from(path))


def convert(torch_checkpoint: str, config, workdir: str):
  """Imports an original checkpoint as a new run directory.

  Args:
    torch_checkpoint: a Lightning .ckpt or a saved state dict of the
      original PyTorch code (read without PyTorch).
    config: the config of the model it holds (validated here).
    workdir: a new or empty run directory; afterwards `sample`, `evaluate`
      and resumed training read it like a training run's.

  Returns:
    The TrainState that was saved (step 0).

  Raises:
    ValueError: `workdir` holds checkpoints, or the checkpoint does not match
      `config` (the message names the first offending key).
  """

  config = config_lib.validate(config)
  ckpt_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise ValueError(
        f"{workdir} already holds checkpoints ({ckpt_dir}); "
        "convert into a new or empty run directory"
    )
  state_dict = load_torch_state_dict(torch_checkpoint)
  try:
    variables = torch_state_dict_to_variables(state_dict, config)
  except ValueError as e:
    raise ValueError(f"{torch_checkpoint}: {e}") from None
  params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
  batch_stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])
  # The structure of a fresh train state, without running the (slow on CPU,
  # and here useless) random initialisation: every array is replaced.
  abstract = jax.eval_shape(lambda: train_step.create_train_state(config))
  state = abstract.replace(
      step=jnp.zeros(abstract.step.shape, abstract.step.dtype),
      params=params,
      batch_stats=batch_stats,
      opt_state=abstract.tx.init(params),
      ema_params=None if abstract.ema_params is None else params,
  )
  for part in ("params", "batch_stats", "opt_state"):
    want = jax.tree_util.tree_structure(getattr(abstract, part))
    got = jax.tree_util.tree_structure(getattr(state, part))
    if want != got:  # a bug of the mapping, not of the checkpoint
      raise AssertionError(
          f"converted {part} do not match the train state: " f"{got} vs {want}"
      )
  checkpoints.save_config(workdir, config)
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints)
  checkpoints.save(mngr, state)
  mngr.close()
  return state
