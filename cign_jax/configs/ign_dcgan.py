"""The unconditional IGN of the IGN code on MNIST: its DCGAN-like network
(`models.DCGANIdempotentNetwork`: 5,550,336 parameters), BatchNorm and
Dropout2d(0.1), Adam (betas 0.5/0.999, no weight decay), learning rate 1e-4,
batch 256, 50 epochs; rec, idem and tight on noise only (weights 20, 20,
2.5), plain L1 tightness as that code has it (the IGN paper's smooth clamp:
--config.loss.tightness=smooth_clamp).

  python -m cign_jax.main --config=configs/ign_dcgan.py --workdir=/tmp/ign
"""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.architecture = "ign_dcgan"
  config.model.conditioning = "none"
  config.model.latent_dim = 64
  config.model.intermediate_dim = 512
  config.model.dropout_rate = 0.1
  config.loss.idem_mismatch_weight = 0.0
  config.loss.tight_mismatch_weight = 0.0
  config.loss.num_mismatch_labels = 0
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.weight_decay = 0.0
  config.batch_size = 256
  config.num_epochs = 50
  return config
