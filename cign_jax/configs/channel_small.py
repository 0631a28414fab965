"""CIGN, channel conditioning, small (paper: ld 32, id 128; 1,546,374 params).

The defaults of `base_config()` are this run, so nothing changes here.
"""

from cign_jax import config as config_lib


def get_config():
  return config_lib.base_config()
