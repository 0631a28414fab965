"""Unconditional IGN baseline on MNIST: the same encoder/decoder as
channel_small without any conditioning; rec, idem and tight on noise only."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "none"
  config.loss.idem_mismatch_weight = 0.0
  config.loss.tight_mismatch_weight = 0.0
  config.loss.num_mismatch_labels = 0
  return config
