"""Trains an IGN/CIGN model.

  python -m cign_jax.main --config=configs/filter_large.py --workdir=DIR \
      [--config.batch_size=32 ...]

Re-running the same command resumes from the latest checkpoint in DIR.

On SIGTERM (a preemptible VM's or SLURM's notice before SIGKILL) the step in
flight is finished and saved, and the command ends with the line `stopped by
SIGTERM at step N; checkpoint saved; run the same command to resume` and
exit status 143 (128 + 15, what schedulers expect of a process ended by
SIGTERM; SLURM's --requeue then starts it again).

All local devices are used. On several hosts, start the same command on every
host with `--multihost` (or with JAX_COORDINATOR_ADDRESS set): it calls
`jax.distributed.initialize()` before anything else, with the process count
and index from JAX_NUM_PROCESSES / JAX_PROCESS_ID when set, else detected by
JAX (SLURM, Open MPI, TPU pods, Kubernetes). See README, "Several GPUs,
several hosts".
"""

import logging as logging_std

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cign_jax import commands
from cign_jax import config as config_lib
from cign_jax import run_dir
from cign_jax import sharding
from cign_jax import utils

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string(
      "workdir",
      None,
      "Directory for checkpoints, " "TensorBoard events and samples.",
  )
  config_flags.DEFINE_config_file(
      "config", None, "Training configuration file.", lock_config=True
  )
  flags.DEFINE_bool(
      "multihost",
      None,
      "Call jax.distributed.initialize() first, to train "
      "on the devices of several hosts (one process per host). Default: on "
      "when JAX_COORDINATOR_ADDRESS is set. The coordinator (host:port of "
      "process 0) comes from JAX_COORDINATOR_ADDRESS, the process count and "
      "index from JAX_NUM_PROCESSES and JAX_PROCESS_ID; unset ones are "
      "detected on SLURM, Open MPI, TPU pods and Kubernetes.",
  )
  flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax's checkpointing threads."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in (
        record.pathname or ""
    )


def main(argv):
  # From the start: a SIGTERM during the slow start (JAX's backend, the
  # classifier, the restore) stops the training before its first step.
  with run_dir.noting_sigterm():
    _main(argv)


def _main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  sharding.initialize_distributed(FLAGS.multihost)
  utils.enable_compilation_cache()
  # Imported after jax.distributed.initialize(), which must come before
  # anything touches a device; the training modules are not needed for
  # --help or a flag error either.
  from cign_jax.evaluation import in_loop  # pylint: disable=g-import-not-at-top

  config = config_lib.validate(FLAGS.config)
  logging.info("Config:\n%s", config)
  # A SIGTERM stop (`stopping.StoppedBySignal`) ends on its own line and
  # exit status 143, through `commands.guarded`.
  in_loop.train_and_evaluate(config, FLAGS.workdir)


def run():
  _define_flags()
  commands.run(main, __name__)
