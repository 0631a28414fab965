"""A quick CPU run: channel-conditioned CIGN, small; about 13 minutes on 2 CPU
cores. Its aim is a recognisable digit for every label; so far 8 of the 10
rows read as their digit (docs/results.md has the runs).

  python -m cign_jax.main --config=configs/quick.py --workdir=/tmp/run
"""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "channel"
  config.model.latent_dim = 16
  config.model.intermediate_dim = 64
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 32
  config.num_train_steps = 1900
  config.log_every_steps = 50
  config.sample_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
