"""Trains an IGN/CIGN model.

  python -m cign_jax.main --config=configs/filter_large.py --workdir=DIR \
      [--config.batch_size=32 ...]

Re-running the same command resumes from the latest checkpoint in DIR.

All local devices are used. On several hosts, start the same command on every
host with `--multihost` (or with JAX_COORDINATOR_ADDRESS set): it calls
`jax.distributed.initialize()` before anything else, with the process count
and index from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, else detected by
JAX (SLURM, Open MPI, TPU pods, Kubernetes). See README, "Several GPUs,
several hosts".
"""

import logging as logging_std
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard "
                    "events and samples.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_bool(
    "multihost", None, "Call jax.distributed.initialize() first, to train on "
    "the devices of several hosts (one process per host). Default: on when "
    "JAX_COORDINATOR_ADDRESS is set. The coordinator (host:port of process "
    "0) comes from JAX_COORDINATOR_ADDRESS, the process count and index from "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID; unset ones are detected on SLURM, "
    "Open MPI, TPU pods and Kubernetes.")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(multihost=None, environ=None) -> bool:
  """`jax.distributed.initialize()` when asked for; True if it ran.

  Must run before JAX touches a device (so before the imports of cign_jax's
  training modules, which may create arrays).
  """
  environ = os.environ if environ is None else environ
  if multihost is None:
    multihost = bool(environ.get("JAX_COORDINATOR_ADDRESS"))
  if not multihost:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  for key, name in (("num_processes", "JAX_NUM_PROCESSES"),
                    ("process_id", "JAX_PROCESS_ID")):
    value = environ.get(name, "")
    if value:
      try:
        kwargs[key] = int(value)
      except ValueError:
        raise app.UsageError(f"{name} must be an integer, got {value!r}") \
            from None
  coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    kwargs["coordinator_address"] = coordinator
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local and %d global "
               "devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax's checkpointing threads."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in (
        record.pathname or "")


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  initialize_distributed(FLAGS.multihost)
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
