"""CIGN at 32x32x3 on CIFAR-10 (tfds:cifar10), channel conditioning.

  python -m cign_jax.main --config=configs/cifar10.py --workdir=/tmp/c10

The CIGN network's 32x32 form (`models.cign.LAYOUTS`: three 4x4 stride-2
convolutions down to 4x4, a 4x4 valid one to 1x1, mirrored) with the
paper's channel_large widths (ld 64, id 128) and its training (all nine
wrong labels, AdamW 1e-3, betas 0.5/0.999, weight decay 0.01, batch 128,
50 epochs). The image shape and the classes are the data's (left 0 here:
recorded in the run's config.json). The data come from tensorflow-datasets
(`cifar10`, prepared as array_record; downloaded on first use where tfds
can reach its host). --config.model.conditioning=filter gives the other
mechanism.
"""

from cign_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.data.dataset = "tfds:cifar10"
  config.model.latent_dim = 64
  config.model.intermediate_dim = 128
  config.model.image_size = 0
  config.model.image_channels = 0
  config.model.num_classes = 0
  return config
