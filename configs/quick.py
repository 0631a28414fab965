"""A quick CPU run: channel-conditioned CIGN, small; about 12 minutes on 2 CPU
cores, and a recognisable digit for every label (docs/results.md has the runs
and their label accuracy).

  python -m cign_jax.main --config=configs/quick.py --workdir=/tmp/run

What differs from the paper's channel_small, and why: a smaller network
(ld 16, id 64); one wrong label per real image instead of all nine (a step
then pushes 7 images per real image through the loss instead of 31, so the
run sees about five epochs instead of one); 2400 steps; and sampling from an
exponential moving average of the parameters (decay 0.995), which steadies
the per-label prototypes that otherwise wander from checkpoint to checkpoint.
"""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.conditioning = "channel"
  config.model.latent_dim = 16
  config.model.intermediate_dim = 64
  config.optimizer.learning_rate = 1e-3
  config.batch_size = 128
  config.loss.num_mismatch_labels = 1
  config.ema_decay = 0.995
  config.num_train_steps = 2400
  config.log_every_steps = 50
  config.sample_every_steps = 400
  config.checkpoint_every_steps = 400
  return config
