"""Trains an IGN/CIGN model.

  python -m cign_jax.main --config=configs/filter_large.py --workdir=DIR \
      [--config.batch_size=32 ...]

Re-running the same command resumes from the latest checkpoint in DIR.
"""

import logging as logging_std

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard "
                    "events and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax's checkpointing threads."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in (
        record.pathname or "")


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Imported here so that --help and flag errors do not wait for JAX.
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from cign_jax import utils  # pylint: disable=g-import-not-at-top
  utils.enable_compilation_cache()
  from cign_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.validate(FLAGS.config)
  logging.info("Config:\n%s", config)
  train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
