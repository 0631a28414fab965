"""CIGN, channel conditioning, small (paper: ld 32, id 128; 1,546,374 params)."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "channel"
  config.model.latent_dim = 32
  config.model.intermediate_dim = 128
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.loss.idem_mismatch_weight = 3.0
  config.num_epochs = 50
  return config
