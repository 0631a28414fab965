"""The config overrides the train-step benchmarks share, flag by flag.

`train_step.py`, `hlo_counts.py` and `profile_step.py` take a subset of
these flags; `apply(config, args)` sets the config field of each one given.
"""

from __future__ import annotations

# flag -> config field (dotted for nested fields)
FIELDS = {
    "batch_size": "batch_size",
    "latent_dim": "model.latent_dim",
    "intermediate_dim": "model.intermediate_dim",
    "compute_dtype": "compute_dtype",
    "matmul_precision": "matmul_precision",
    "passes": "loss.passes",
    "channel_conv": "model.channel_conv",
}


def apply(config, args) -> dict:
  """Sets the field of every flag in FIELDS that `args` has and gives
  (non-empty, non-zero); returns {flag: value} of those set, in FIELDS'
  order."""
  given = {
      flag: getattr(args, flag) for flag in FIELDS if getattr(args, flag, None)
  }
  config.update_from_flattened_dict({FIELDS[f]: v for f, v in given.items()})
  return given


def command_line(given: dict) -> str:
  """' --flag=value' for each override set (for a printed command)."""
  return "".join(f" --{flag}={value}" for flag, value in given.items())
