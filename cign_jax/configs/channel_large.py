"""CIGN, channel conditioning, large (paper: ld 64, id 128; 5,607,110 params)."""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.latent_dim = 64
  return config
