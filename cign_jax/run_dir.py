"""Keeping a run directory whole: one writer, atomic files, verified tensors.

- `WorkdirLock`: the training holds an exclusive `fcntl.flock` on
  WORKDIR/train.lock for its lifetime; the OS drops it when the process ends
  (also on kill -9), so a lock is never stale. The file records the holder's
  PID and host, which a refused second trainer names.
- `atomic_savez`: an .npz written to a temporary file and renamed over the
  target, so a reader or a kill mid-write never sees half a file.
- `tree_digest`: a SHA-256 over a tree's arrays (their dtypes, shapes and
  bytes), saved in each checkpoint step (`read_digest`) and compared on
  restore.
- `noting_sigterm`: SIGTERM sets a flag instead of ending the process, so
  that a training can finish its step, save it and stop cleanly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import threading
from typing import Any, Optional

import jax
import numpy as np

from cign_jax import utils

LOCK_FILE = "train.lock"
CHECKSUM_FILE = "cign_checksum.json"
# The checkpoint item (a folder of each step) that holds CHECKSUM_FILE.
CHECKSUM_ITEM = "checksum"


class RunLockedError(RuntimeError):
  """Another process holds the run directory's training lock."""


class WorkdirLock:
  """An exclusive lock on a run directory, held until `release()` or the end
  of the process.

  Args:
    workdir: the run directory (created if missing).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        os.close(fd)
        raise
      holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
      os.close(fd)
      holder = holder or "holder unknown"
      raise RunLockedError(
          f"{workdir} is being trained by another process ({holder}); wait "
          "for it to end or stop it, or train in another run directory"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0
    )
    self._fd = fd

  def release(self):
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def atomic_savez(path: str, **arrays):
  """np.savez to `path` through `utils.atomic_write`: `path` is either the
  old file or the complete new one."""
  with utils.atomic_write(path) as f:
    np.savez(f, **arrays)


def atomic_write_text(path: str, text: str):
  """Writes `text` to `path` through `utils.atomic_write`."""
  with utils.atomic_write(path, "w") as f:
    f.write(text)


def _host_array(leaf) -> np.ndarray:
  # A replicated global array is not fully addressable on several hosts; its
  # first local shard holds all of it.
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    leaf = leaf.addressable_data(0)
  return np.asarray(jax.device_get(leaf))


def tree_digest(tree: Any) -> str:
  """SHA-256 over every array of `tree` (dtype, shape and bytes).

  The per-array digests are sorted before they are combined, so the digest
  does not depend on how a container type orders its leaves (a restored
  optimiser state may come back as dicts where the saved one held named
  tuples). Integer arrays are hashed as int64 so that a step counter
  restored at another integer width hashes the same.

  Args:
    tree: a pytree of arrays (jax or numpy) or Python scalars.

  Returns:
    The hex digest.
  """
  parts = []
  for leaf in jax.tree_util.tree_leaves(tree):
    a = _host_array(leaf)
    if np.issubdtype(a.dtype, np.integer):
      a = a.astype(np.int64)
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    parts.append(h.hexdigest())
  total = hashlib.sha256()
  for p in sorted(parts):
    total.update(p.encode())
  return total.hexdigest()


def read_digest(step_dir: str) -> Optional[str]:
  """The recorded digest of a checkpoint step, or None when it has none.

  A step holds it in its CHECKSUM_ITEM folder, written in the same atomic
  commit as its tensors. Steps saved by earlier versions hold it in a file
  beside their tensors, written after the commit (still accepted: its
  presence shows the save finished); such a step without that file was
  left by a run stopped between the two, and is incomplete.

  Args:
    step_dir: the folder of one step (`checkpoints/<step>`).

  Returns:
    The hex digest; "unreadable" when the file is damaged; None when the
    step records none.
  """
  for path in (
      os.path.join(step_dir, CHECKSUM_ITEM, CHECKSUM_FILE),
      os.path.join(step_dir, CHECKSUM_FILE),
  ):
    try:
      with open(path) as f:
        return json.load(f)["sha256"]
    except FileNotFoundError:
      continue
    except (ValueError, KeyError, TypeError):
      return "unreadable"
  return None


class _SigtermNote:
  """The state of `noting_sigterm`: whether SIGTERM came, how many blocks
  are open, and the handler they replaced."""

  def __init__(self):
    self.received = threading.Event()
    self.depth = 0
    self.previous = None
    self.installed = False


_SIGTERM = _SigtermNote()


def _note_sigterm(signum, frame):
  del signum, frame
  # Only a flag: the training loop reads it at its next step boundary (a
  # handler runs between two bytecodes of the main thread, possibly inside
  # a save, where nothing else may be done safely).
  _SIGTERM.received.set()


@contextlib.contextmanager
def noting_sigterm():
  """Within the block, SIGTERM sets `sigterm_received()` instead of ending
  the process.

  Schedulers (preemptible VMs, SLURM's time limit) send SIGTERM and wait a
  grace period before SIGKILL; the training loop then finishes its step,
  saves a checkpoint of it and stops. Blocks nest: the outermost one (the
  train command's, open before its slow start) installs the handler and
  clears the flag, so a signal that came before the training began is still
  seen by it; the handler in place before is put back when it ends. Nothing
  is installed outside the main thread (Python runs handlers there only),
  nor where SIGTERM is ignored (SIG_IGN: the parent's choice is kept).
  """
  outermost = _SIGTERM.depth == 0
  if outermost:
    _SIGTERM.received.clear()
    _SIGTERM.installed = False
    if threading.current_thread() is threading.main_thread():
      previous = signal.getsignal(signal.SIGTERM)
      if previous is not signal.SIG_IGN:
        _SIGTERM.previous = previous
        signal.signal(signal.SIGTERM, _note_sigterm)
        _SIGTERM.installed = True
  _SIGTERM.depth += 1
  try:
    yield
  finally:
    _SIGTERM.depth -= 1
    if outermost and _SIGTERM.installed:
      signal.signal(
          signal.SIGTERM,
          _SIGTERM.previous
          if _SIGTERM.previous is not None
          else signal.SIG_DFL,
      )
      _SIGTERM.installed = False
      _SIGTERM.previous = None


def sigterm_received() -> bool:
  """Whether SIGTERM came within the open `noting_sigterm` blocks."""
  return _SIGTERM.received.is_set()
