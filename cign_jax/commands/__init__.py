"""The command-line entry points: each module defines its flags and makes one
library call. Each is run by one name: `python -m cign_jax.main` (train),
`python -m cign_jax.sample` / `evaluate` / `convert` / `classifier`, and
`python -m cign_jax.data prepare NAME`. Each module's `run()` defines the flags and starts absl, so that
importing one command beside another defines nothing.
"""

import errno
import os
import sys
import traceback
from typing import Optional, Tuple

from absl import app
from absl import flags


def run(main, command_module: str) -> None:
  """Runs `main` under absl with `command_module`'s docstring and flags as
  the --help text, whichever module started the process.

  absl's --help shows the docstring and flags of `__main__`, which is the
  entry point (`cign_jax/main.py`), not the module that defines the flags.

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
  app.run(guarded(main), flags_parser=_parse_flags)


# How a failure's last line reads: known causes with their fix.
_ERRNO_FIXES = {
    errno.ENOSPC: "the disk is full: free space (or use a --workdir on "
    "another disk), then run the same command again",
    errno.EDQUOT: "the disk quota is exhausted: free space, then run the "
    "same command again",
    errno.EACCES: "permission denied: choose a directory you can write, or "
    "fix its permissions",
    errno.EPERM: "operation not permitted: choose a directory you can write",
    errno.EROFS: "the file system is read-only: choose another directory",
}


def _errno_of(error: BaseException):
  """The errno of `error` or of an exception it was raised from (orbax and
  TensorStore wrap the OSError of a failed write)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _ERRNO_FIXES:
      return error.errno
    text = str(error)
    if "No space left on device" in text:
      return errno.ENOSPC
    if "Permission denied" in text:
      return errno.EACCES
    error = error.__cause__ or error.__context__
  return None


def plain_message(error: BaseException) -> Tuple[str, bool]:
  """The one-line message for `error`, and whether it is a known kind
  (whose traceback would only hide the message)."""
  code = _errno_of(error)
  first = (str(error).strip().splitlines() or [""])[0]
  if code is not None:
    where = getattr(error, "filename", None)
    return (
        f"error: {_ERRNO_FIXES[code]}"
        + (f" ({where})" if where else f" ({first[:300]})")
    ), True
  if isinstance(
      error,
      (
          ValueError,
          FileNotFoundError,
          FloatingPointError,
          RuntimeError,
          KeyError,
      ),
  ):
    return f"error: {first}", True
  return f"error: {type(error).__name__}: {first}", False


def _exit_with(line: str, code: int):
  """Prints `line` as the process's last line and ends it at once, so that
  library threads (orbax, TensorStore) shutting down cannot print after
  it."""
  try:
    sys.stdout.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  sys.stderr.write("\n" + line + "\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def guarded(main):
  """`main` with every failure ending on one plain line naming its cause
  and fix (the traceback is printed above it for unexpected errors)."""

  def wrapped(argv):
    try:
      return main(argv)
    except (app.UsageError, SystemExit):
      raise
    except KeyboardInterrupt:
      _exit_with(
          "error: interrupted (Ctrl-C); a training resumes from its "
          "last checkpoint when the same command is run again",
          130,
      )
    except BaseException as e:  # pylint: disable=broad-except
      if isinstance(getattr(e, "exit_code", None), int):
        # A clean stop that says so itself (`stopping.StoppedBySignal`):
        # its line, no `error:`, and its exit status.
        _exit_with(str(e), e.exit_code)
      line, known = plain_message(e)
      if not known:
        traceback.print_exc()
      _exit_with(line, 1)

  return wrapped


def _unknown_config_key(argv) -> Optional[str]:
  """For a --config.PATH=VALUE whose PATH the config does not have: a
  message naming it and the keys known there."""
  from cign_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top

  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0]
    node, prefix = config_lib.base_config(), "config"
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = (
            ", ".join(sorted(node.keys()))
            if isinstance(node, ml_collections.ConfigDict)
            else "none (not a group)"
        )
        if path.startswith("sweep.") and path != "sweep.product":
          name = path[len("sweep.") :]
          return (
              f"error: --config.{path}: {name} cannot be swept: the "
              "members of a sweep share one compiled train step, so only "
              "scalars the step reads as numbers may vary "
              f"({', '.join(config_lib.SWEEPABLE)})"
          )
        return (
            f"error: --config.{path}: {prefix} has no key {part!r}; "
            f"the keys of {prefix}: {known}"
        )
      node, prefix = node[part], f"{prefix}.{part}"
  return None


def _config_file_values(argv):
  """The values given to --config (`--config=F` or `--config F`)."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      yield arg[len("--config=") :]
    elif arg == "--config" and i + 1 < len(argv):
      yield argv[i + 1]


def _missing_config_file(argv) -> Optional[str]:
  """For a --config naming no file: a message naming it. ml_collections
  defers that error to the config's first use, and then names neither the
  flag nor the path."""
  if "config" not in flags.FLAGS:
    return None
  for value in _config_file_values(argv):
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      what = "is a directory" if os.path.isdir(path) else "does not exist"
      return (
          f"error: --config={value}: the config file {path!r} {what}; "
          "give a Python file with get_config(), such as "
          "configs/quick.py (a path relative to the current directory, "
          f"{os.getcwd()}, or absolute)"
      )
  return None


def _flag_error_line(error: flags.Error) -> str:
  """The one line for a bad flag. ml_collections embeds the traceback of a
  config file's failing get_config() in the message; its last line is the
  cause."""
  lines = [l for l in str(error).strip().splitlines() if l.strip()]
  if len(lines) > 1 and any(l.startswith("Traceback") for l in lines):
    head = lines[0].split(": Error whilst parsing config file", 1)[0]
    return f"error: {head}: {lines[-1].strip()} (see --help)"
  return f"error: {lines[0] if lines else error} (see --help)"


def _parse_flags(argv):
  """absl's flag parsing, with a plain line for a bad flag."""
  line = _missing_config_file(argv)
  if line is not None:
    _exit_with(line, 2)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(_flag_error_line(e), 2)
  except Exception as e:  # pylint: disable=broad-except
    line = _unknown_config_key(argv)
    if line is None:
      line, _ = plain_message(e)
      line = f"{line} (while reading the flags; see --help)"
    _exit_with(line, 2)
