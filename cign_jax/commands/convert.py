"""Imports an original (PyTorch) CIGN checkpoint as a run directory.

  python -m cign_jax.convert --torch_checkpoint=epoch=49.ckpt \
      --config=configs/channel_small.py --workdir=DIR

Reads Lightning `.ckpt` files and plain state dicts without PyTorch
(`cign_jax.interop.convert`); the run directory then works with `sample`,
`evaluate` and resumed training.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from cign_jax import commands
from cign_jax.interop import convert

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string(
      "torch_checkpoint",
      None,
      "Lightning .ckpt or saved state dict of the original.",
  )
  flags.DEFINE_string("workdir", None, "Run directory to create.")
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file describing the checkpoint's model.",
      lock_config=True,
  )
  flags.mark_flags_as_required(["torch_checkpoint", "config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  convert.convert(FLAGS.torch_checkpoint, FLAGS.config, FLAGS.workdir)
  print(f"converted {FLAGS.torch_checkpoint} into {FLAGS.workdir} " f"(step 0)")


def run():
  _define_flags()
  commands.run(main, __name__)
