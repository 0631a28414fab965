"""The command-line entry points: each module defines its flags and makes one
library call. `python -m cign_jax.commands.NAME`, or the console scripts
(`cign-train`, `cign-sample`, `cign-evaluate`, `cign-convert`,
`cign-classifier`, `cign-data`); the older `python -m cign_jax.main` /
`sample` / `evaluate` / `convert` / `classifier` / `data` run the same
modules. Each module's `run()` defines the flags and starts absl, so that
importing one command beside another defines nothing.
"""

import sys

from absl import app
from absl import flags


def run(main, command_module: str) -> None:
  """Runs `main` under absl with `command_module`'s docstring and flags as
  the --help text, whichever module started the process.

  absl's --help shows the docstring and flags of `__main__`, which is the
  older path (`cign_jax/main.py`) or a console script's launcher when the
  command is started that way, not the module that defines the flags.

  Args:
    main: the command's `main(argv)`.
    command_module: the `__name__` of the module that defined the flags.
  """
  main_module = sys.modules["__main__"]
  module = sys.modules[command_module]
  if main_module is not module:
    for flag in flags.FLAGS.get_key_flags_for_module(command_module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    main_module.__doc__ = module.__doc__
  app.run(main)
