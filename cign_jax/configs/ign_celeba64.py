"""The IGN paper's CelebA run: pytorch/examples' DCGAN as an IGN at 64x64.

  python -m cign_jax.main --config=configs/ign_celeba64.py --workdir=/tmp/celeba

Needs `tfds:celeb_a` prepared (array_record) in the tfds data directory
(--config.data.data_dir); where tfds cannot download it, the error names
tfds' manual directory.

From the IGN paper: the network, "an autoencoder from DCGAN" at CelebA
64x64 (`models.DCGANNetwork`: DCGAN's discriminator as the encoder, its
generator as the decoder), unconditional, trained on noise alone (no
mismatch terms), with the paper's smooth-clamp tightness.
From the IGN code (as configs/ign_dcgan.py): the loss weights rec 20, idem
20, tight 2.5, the clamp a = 1.5, Adam without weight decay, the training
noise of std 0.15.
From DCGAN (pytorch/examples' dcgan): 64 base channels, a 100-channel code
(nz), BatchNorm, LeakyReLU 0.2 in the encoder, ReLU in the decoder, tanh
out, no dropout; Adam lr 2e-4, betas 0.5/0.999, batch 64, 25 epochs; the
images resized (shorter side) and centre-cropped to 64.
"""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.dataset = "tfds:celeb_a"
  config.data.label_key = ""  # unconditional: the whole set, one class
  config.data.image_size = 64
  config.model.architecture = "dcgan"
  config.model.conditioning = "none"
  config.model.latent_dim = 64
  config.model.intermediate_dim = 100
  config.model.image_size = 64
  config.model.image_channels = 3
  config.model.num_classes = 1
  config.model.dropout_rate = 0.0
  config.loss.tightness = "smooth_clamp"
  config.loss.tightness_clamp_a = 1.5
  config.loss.idem_mismatch_weight = 0.0
  config.loss.tight_mismatch_weight = 0.0
  config.loss.num_mismatch_labels = 0
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 2e-4
  config.optimizer.weight_decay = 0.0
  config.batch_size = 64
  config.num_epochs = 25
  # The validation loss on the first 2048 test faces, not all of them: it
  # runs at every evaluation point.
  config.eval_num_examples = 2048
  return config
