"""CIGN on Fashion-MNIST: the paper's channel_small, and a quick CPU run.

  python -m cign_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/f
  python -m cign_jax.main --config=configs/fashion_mnist.py:quick \
      --workdir=/tmp/fq

`get_config()`: the paper's channel_small (ld 32, id 128, all nine wrong
labels, AdamW 1e-3, batch 128, 50 epochs) on Fashion-MNIST (28x28, ten
classes, prepared offline like MNIST: `python -m cign_jax.data prepare
fashion_mnist`), the first step towards the question the CIGN paper leaves
open, how its conditionings compare beyond MNIST
(--config.model.conditioning=filter with filter_small's learning rate and
batch for the other).

`get_config("quick")`: `configs/quick.py`'s quick CPU run (ld 16, id 64,
one wrong label per image, 3200 steps, moving average, the best checkpoint
by the Fashion-MNIST classifier's label accuracy) on Fashion-MNIST.
"""

from cign_jax import config as config_lib
from cign_jax.configs import quick

VARIANTS = ("", "quick")


def get_config(variant: str = ""):
  """The paper run (`variant` '') or the quick CPU run ('quick')."""
  if variant not in VARIANTS:
    raise ValueError(
        f"configs/fashion_mnist.py: unknown variant {variant!r}; expected "
        f"one of {VARIANTS} (e.g. --config=configs/fashion_mnist.py:quick)"
    )
  if variant == "quick":
    config = quick.get_config()
  else:
    config = config_lib.base_config()
  config.data.dataset = "fashion_mnist"
  return config
