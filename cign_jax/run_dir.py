"""Keeping a run directory whole: one writer, atomic files, verified tensors.

- `WorkdirLock`: the training holds an exclusive `fcntl.flock` on
  WORKDIR/train.lock for its lifetime; the OS drops it when the process ends
  (also on kill -9), so a lock is never stale. The file records the holder's
  PID and host, which a refused second trainer names.
- `atomic_savez`: an .npz written to a temporary file and renamed over the
  target, so a reader or a kill mid-write never sees half a file.
- `tree_digest`: a SHA-256 over a tree's arrays (their dtypes, shapes and
  bytes), stored beside each checkpoint step and compared on restore.
- `check_finite`: refuses arrays holding NaN or Inf, with their count and
  the first position.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
from typing import Any, Optional

import jax
import numpy as np

LOCK_FILE = "train.lock"
CHECKSUM_FILE = "cign_checksum.json"


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
          "for it to end or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n"
              .encode(), 0)
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


@contextlib.contextmanager
def _replaced_atomically(path: str, tmp: str, mode: str):
  """Yields `tmp` opened in `mode`; once written and synced it replaces
  `path` (`os.replace`), so `path` is either the old file or the complete
  new one. `tmp` is removed whatever happens."""
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def atomic_savez(path: str, **arrays):
  """np.savez to `path` through a temporary file in the same directory and
  an `os.replace`, so `path` is either the old file or the complete new one.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  with _replaced_atomically(path, tmp, "wb") as f:
    np.savez(f, **arrays)


def atomic_write_text(path: str, text: str):
  """Writes `text` to `path` through a temporary file and `os.replace`."""
  with _replaced_atomically(path, f"{path}.{os.getpid()}.tmp", "w") as f:
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


def write_digest(step_dir: str, digest: str):
  """Records a finished checkpoint step's digest inside its directory."""
  atomic_write_text(os.path.join(step_dir, CHECKSUM_FILE),
                    json.dumps({"sha256": digest}))


def read_digest(step_dir: str) -> Optional[str]:
  """The recorded digest of a step, or None when the step has none (saved
  before checksums were recorded, or by a run killed between the save and
  the record)."""
  path = os.path.join(step_dir, CHECKSUM_FILE)
  try:
    with open(path) as f:
      return json.load(f)["sha256"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError, TypeError):
    return "unreadable"


def check_finite(array, what: str):
  """Raises ValueError when `array` holds NaN or Inf, naming how many and
  the first position.

  Args:
    array: a numpy-convertible array.
    what: what the array is, for the message (e.g. "--inputs images").
  """
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.floating):
    return
  bad = ~np.isfinite(a)
  count = int(bad.sum())
  if count:
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{what} hold {count} non-finite value(s) (NaN or Inf) of {a.size}, "
        f"the first at index {first} (value {a[first]})")
