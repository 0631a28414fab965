"""Ablation: the CIGN network of channel_small (ld 32, id 128) with the
conditioning removed; rec, idem and tight on noise only. Not the IGN code's
network: that one is configs/ign_dcgan.py."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "none"
  config.loss.idem_mismatch_weight = 0.0
  config.loss.tight_mismatch_weight = 0.0
  config.loss.num_mismatch_labels = 0
  return config
