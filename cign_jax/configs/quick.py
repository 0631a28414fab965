"""A quick CPU run, and the tiny configuration of the tests and tutorials.

  python -m cign_jax.main --config=configs/quick.py --workdir=/tmp/run
  python -m cign_jax.main --config=configs/quick.py:tiny --workdir=/tmp/tiny

`get_config()`: channel-conditioned CIGN, small, that draws a recognisable
digit for every label in a short run on a 2-core CPU (docs/results.md has
the runs, their duration and their label accuracy). What differs from
the paper's channel_small, and why: a smaller network (ld 16, id 64); one
wrong label per real image instead of all nine (a step then pushes 7 images
per real image through the loss instead of 31, so the run sees about seven
epochs instead of one and a half); 3200 steps; sampling from an exponential
moving average of the parameters (its warm-up decay (1 + t) / (10 + t)
stays under the 0.998 cap for the whole run, so the average's horizon grows
with it), which steadies the per-label prototypes that otherwise wander from
checkpoint to checkpoint; and the best checkpoint by label accuracy, judged
every 200 steps (the score still moves by 0.1 between neighbouring
checkpoints).

`get_config("tiny")`: the smallest network the architecture allows a test
to train in seconds (ld 4, id 8, batch 8), 6 steps, a checkpoint every 2;
it learns nothing useful, and exists to exercise the code.
"""

from cign_jax import config as config_lib

VARIANTS = ("", "tiny")


def get_config(variant: str = ""):
  """The quick run (`variant` ''), or the tiny test configuration ('tiny')."""
  if variant not in VARIANTS:
    raise ValueError(
        f"configs/quick.py: unknown variant {variant!r}; "
        f"expected one of {VARIANTS} (e.g. "
        "--config=configs/quick.py:tiny)"
    )
  config = config_lib.base_config()
  if variant == "tiny":
    config.model.latent_dim = 4
    config.model.intermediate_dim = 8
    config.batch_size = 8
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.sample_every_steps = 1000
    config.checkpoint_every_steps = 2
    # Validation on a few test images when a test split is there; no best
    # checkpoint (tests pass training data alone, without a test split).
    config.eval_num_examples = 64
    config.best_metric = ""
    return config
  config.model.latent_dim = 16
  config.model.intermediate_dim = 64
  config.loss.num_mismatch_labels = 1
  config.ema_decay = 0.998
  config.num_train_steps = 3200
  config.log_every_steps = 50
  config.sample_every_steps = 400
  config.checkpoint_every_steps = 400
  # The best checkpoint by label accuracy (100 samples per label, fixed
  # noise; cheap), judged every 200 steps; no validation loss (it would
  # cost more than the label accuracy and does not pick the best-looking
  # digits).
  config.eval_every_epochs = 0
  config.eval_every_steps = 200
  config.eval_num_examples = 0
  config.eval_samples_per_label = 100
  config.best_metric = "label_accuracy"
  return config
