"""CIGN, filter conditioning, large (paper: ld 96, id 256; 1,380,293 params)."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "filter"
  config.model.latent_dim = 96
  config.model.intermediate_dim = 256
  config.optimizer.learning_rate = 1e-4
  config.batch_size = 64
  config.loss.idem_mismatch_weight = 8.0
  return config
