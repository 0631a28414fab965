"""Small shared helpers: cache directories and JAX's compilation cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os

import jax


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb"):
  """Yields a temporary file beside `path` opened in `mode`; once written
  and synced it replaces `path` (`os.replace`), so a reader or a kill
  mid-write sees either the old file or the complete new one. The
  temporary file is removed whatever happens; `path`'s directory is
  created."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def file_lock(path):
  """Holds an exclusive `fcntl.flock` on `path` (created, with its
  directory) for the block, waiting for any other holder: processes that
  would build the same cached file (a prepared dataset, a trained
  classifier) take turns, and the later ones find it built."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def cache_root() -> str:
  """The library's cache: $CIGN_JAX_CACHE if set, else ~/.cache/cign_jax
  (data sources, classifier, FID weights and statistics, compiled steps)."""
  env = os.environ.get("CIGN_JAX_CACHE", "")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), ".cache", "cign_jax")


def cache_dir(*parts: str) -> str:
  """<cache_root>/<parts>, created."""
  path = os.path.join(cache_root(), *parts)
  os.makedirs(path, exist_ok=True)
  return path


def enable_compilation_cache(path: str = "") -> str:
  """Turns on JAX's persistent compilation cache, so that a restarted or
  resumed run does not compile its train step again (minutes on a small
  CPU). $JAX_COMPILATION_CACHE_DIR, when set, wins."""
  path = (
      os.environ.get("JAX_COMPILATION_CACHE_DIR")
      or path
      or cache_dir("jax_compilation_cache")
  )
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def file_digest(path, algorithm: str = "sha256") -> str:
  """Hex digest of a file's bytes, read in 1 MiB chunks."""
  digest = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
