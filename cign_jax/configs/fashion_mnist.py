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
moving average, the best checkpoint by the Fashion-MNIST classifier's label
accuracy) on Fashion-MNIST, with all nine wrong labels per real image, as
the paper, a batch of 24 real images instead of 128 and 4000 steps instead
of 3200. Why: with one wrong label, drawn at random, a dress meets the
T-shirt label in the mismatch terms once in nine steps, and the labels of
look-alike classes (dress and T-shirt; coat, shirt and pullover; sandal and
ankle boot) drift into one drawing; all nine teach every pair at every
step. The smaller batch keeps the images a step pushes through the loss
(31 per real image, 744 in all) under the quick run's (7 x 128 = 896), so
the longer run takes about as long; with a batch of 32 and 3200 steps some
seeds had not yet learnt their labels at the end. docs/results.md has the
runs over seeds.
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
    config.loss.num_mismatch_labels = 9
    config.batch_size = 24
    config.num_train_steps = 4000
  else:
    config = config_lib.base_config()
  config.data.dataset = "fashion_mnist"
  return config
