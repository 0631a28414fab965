"""CIGN, filter conditioning, small (paper: ld 64, id 128; 616,005 params)."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "filter"
  config.model.latent_dim = 64
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 64
  config.loss.idem_mismatch_weight = 8.0
  return config
