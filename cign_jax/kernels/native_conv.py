"""Blocked im2col convolution kernels for CPU (C++, XLA FFI + OpenBLAS).

`cign_jax/kernels/native/conv_kernels.cc` computes each pass of a shared-kernel
convolution as im2col patches times the kernel matrix, building the patches
in cache-sized blocks and multiplying each block with OpenBLAS's sgemm (the
`scipy-openblas32` wheel), on XLA's thread pool. XLA's own CPU code either
materialises the whole patch array (a copy that costs more than the product)
or, for its native convolutions, runs some of CIGN's passes far slower
(docs/performance.md, "the C++ kernels per pass").

The library is compiled on first use with the system's C++ compiler
(`$CXX`, split like a shell command so that a wrapper such as "ccache g++"
works; else `c++`/`g++`/`clang++`) from a private copy of the source bytes
it hashed, within $CIGN_JAX_NATIVE_BUILD_TIMEOUT seconds (default 300).
It is cached in `<cache>/native/<key>/` (`cign_jax.utils.cache_root()`,
directories created 0700), keyed by the source, the jaxlib and OpenBLAS
versions and paths, the whole compile command and the CPU (every feature
line of /proc/cpuinfo and the flags the compiler resolves -march=native to),
beside a build record (`RECORD_NAME`: its key, size and SHA-256) that the
builder writes after the library, each atomically. Each directory below the
cache root is opened from its parent's descriptor without following a link,
and it, the library and the record must be owned by this user or root and
not writable by group or others (checked on the opened files). The library
is read once, checked against its record, and those bytes are loaded from a
private unlinked copy (through /proc/self/fd). A library that fails its
record (truncated, replaced, no record) or does not load or lacks a symbol
is rebuilt once, under a lock file in its directory; an unsafe cache (a
link, another user's file) is refused. The library is registered with
XLA as three FFI targets. `available()` says whether that worked; where it
did not (no compiler, no OpenBLAS wheel, an unsafe cache,
`CIGN_JAX_NATIVE_CONV=0`), `cign_jax.ops` logs a warning with the reason
and uses its XLA formulations instead: the same results up to rounding,
slower train steps.

The kernels' tuning knobs (`TUNING_ENV`: block size, minimum rows per block,
chunks per thread, memory for the kernel gradient's partial sums) are
integers checked against their bounds before loading; the kernels clamp
them too. A chunk that cannot get its scratch memory makes the call raise
RESOURCE_EXHAUSTED in Python (CIGN_JAX_NATIVE_TEST_FAIL_CHUNK=<n> forces
that for chunk n, for tests).

The public functions take and return JAX arrays and are used only on CPU
(under `jax.vmap` they run once per mapped element):

  conv_forward(x, kernel, stride, padding)           conv2d
  conv_input_grad(g, kernel, stride, padding, hw)    its adjoint in x
  conv_kernel_grad(x, g, kh, kw, stride, padding)    its adjoint in kernel

with x (B, H, W, C), kernel (kh, kw, C, Co), g (B, Ho, Wo, Co), PyTorch's
conv2d arithmetic Ho = (H + 2p - kh) // s + 1 (0 where the kernel does
not fit, as lax).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import platform
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from typing import List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import utils

SOURCE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "native", "conv_kernels.cc"
)
LIBRARY_NAME = "libcign_conv_kernels.so"
# Beside the library: its key, size and SHA-256, written by the builder.
RECORD_NAME = "libcign_conv_kernels.json"
_LOCK_NAME = "lock"
_MAX_LIBRARY_BYTES = 1 << 28
_MAX_RECORD_BYTES = 4096
_TARGETS = {
    "cign_conv_forward": "CignConvForward",
    "cign_conv_input_grad": "CignConvInputGrad",
    "cign_conv_kernel_grad": "CignConvKernelGrad",
}
# What a loaded library must export to be used.
_SYMBOLS = ("cign_native_init",) + tuple(_TARGETS.values())
ENV_SWITCH = "CIGN_JAX_NATIVE_CONV"
BUILD_TIMEOUT_ENV = "CIGN_JAX_NATIVE_BUILD_TIMEOUT"
# The kernels' tuning knobs (read by conv_kernels.cc) and their largest
# accepted values, the same bounds as the C++ side's clamps.
TUNING_ENV = {
    "CIGN_JAX_NATIVE_BLOCK_KIB": 1 << 20,
    "CIGN_JAX_NATIVE_MIN_ROWS": 1 << 16,
    "CIGN_JAX_NATIVE_CHUNKS_PER_THREAD": 64,
    "CIGN_JAX_NATIVE_PARTIAL_MIB": 1 << 20,
}
# Largest kernel size, stride and padding the kernels accept (kMaxAttr).
MAX_ATTR = 1 << 20
# /proc/cpuinfo fields that say which instructions a -march=native build may
# use (x86, aarch64, other Linux ports); per-core noise (MHz, ids) is left out.
_CPU_FIELDS = frozenset(
    (
        "vendor_id",
        "cpu family",
        "model",
        "model name",
        "stepping",
        "flags",
        "features",
        "cpu implementer",
        "cpu architecture",
        "cpu variant",
        "cpu part",
        "cpu revision",
        "isa",
        "isa-ext",
        "uarch",
        "mmu",
        "cpu",
        "platform",
        "machine",
        "cpu model",
        "ase",
    )
)
_CPUINFO = "/proc/cpuinfo"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Marks the places of the source and output files in a compile command.
_SOURCE_ARG, _OUTPUT_ARG = "<source>", "<output>"

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "disabled": 0}


class NativeBuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded."""


class UnsafeCacheError(NativeBuildError):
  """A cached library or its directory could have been written by another
  user: it is not loaded."""


class _LoadError(NativeBuildError):
  """A library that matched its record did not load, or lacks a symbol."""


class _StaleLibrary(NativeBuildError):
  """A cached library that does not match its build record (or has none):
  it is rebuilt, never loaded."""


class _NotBuilt(_StaleLibrary):
  """There is no cached library yet."""


class BuildSpec(NamedTuple):
  """What a build compiles and how; `key` names its cache directory.

  Attributes:
    key: hex digest of everything below and the versions and CPU it is for.
    source: the source bytes that were hashed (and are compiled).
    command: the compile command, with `<source>` and `<output>` in place of
      the files.
  """

  key: str
  source: bytes
  command: Tuple[str, ...]


def _env_int(name: str, default: int, max_value: int) -> int:
  """An integer setting from the environment, checked against
  [1, max_value]; `default` when unset."""
  text = os.environ.get(name, "").strip()
  if not text:
    return default
  try:
    value = int(text)
  except ValueError:
    value = 0
  if not 1 <= value <= max_value:
    raise NativeBuildError(
        f"{name}={text!r} is not an integer in "
        f"[1, {max_value}]; unset it or pick one there"
    )
  return value


def _compiler() -> List[str]:
  """The compiler command: $CXX split like a shell command (so "ccache g++"
  works), else the first of c++, g++, clang++ on the PATH."""
  cxx = os.environ.get("CXX", "").strip()
  if cxx:
    try:
      argv = shlex.split(cxx)
    except ValueError as e:
      raise NativeBuildError(f"$CXX={cxx!r} is not a valid command: {e}") from e
    exe = shutil.which(argv[0]) if argv else None
    if exe is None:
      raise NativeBuildError(
          f"$CXX={cxx!r}: {argv[0] if argv else ''!r} "
          f"is not an executable on the PATH; fix or "
          f"unset CXX"
      )
    return [exe] + argv[1:]
  for name in ("c++", "g++", "clang++"):
    if shutil.which(name):
      return [shutil.which(name)]
  raise NativeBuildError("no C++ compiler found (install one or set $CXX)")


def _cpu_signature(compiler: List[str], timeout: float) -> str:
  """What a -march=native build depends on: every instruction-set line of
  /proc/cpuinfo (x86 flags, aarch64 Features and CPU part/variant, ...;
  all distinct lines, so a machine mixing cores lists each kind) and the
  target flags the compiler resolves -march=native to on this machine."""
  lines = {platform.machine()}
  try:
    with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
      for line in f:
        field = line.split(":", 1)[0].strip().lower()
        if field in _CPU_FIELDS:
          lines.add(" ".join(line.split()))
  except OSError:
    pass
  probe = compiler + ["-###", "-E", "-march=native", "-x", "c++", os.devnull]
  try:
    proc = subprocess.run(
        probe,
        capture_output=True,
        text=True,
        cwd="/",
        env=dict(os.environ, LC_ALL="C"),
        timeout=timeout,
        check=False,
    )
    resolved = f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
  except subprocess.TimeoutExpired as e:
    raise NativeBuildError(
        f"{shlex.join(probe)} took more than {timeout}s "
        f"(${BUILD_TIMEOUT_ENV})"
    ) from e
  return "\n".join(sorted(lines)) + "\n" + resolved


def _build_spec(compiler: List[str], timeout: float) -> BuildSpec:
  """The source, compile command and cache key for this machine."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  import scipy_openblas32  # pylint: disable=g-import-not-at-top

  with open(SOURCE, "rb") as f:
    source = f.read()
  blas_dir = scipy_openblas32.get_lib_dir()
  # The library finds OpenBLAS by its absolute path (rpath): a new
  # environment gets its own build.
  command = tuple(compiler) + (
      "-O3",
      "-march=native",
      "-std=c++17",
      "-shared",
      "-fPIC",
      "-pthread",
      f"-I{jax.ffi.include_dir()}",
      f"-I{scipy_openblas32.get_include_dir()}",
      _SOURCE_ARG,
      "-o",
      _OUTPUT_ARG,
      f"-L{blas_dir}",
      f"-l{scipy_openblas32.get_library()}",
      f"-Wl,-rpath,{blas_dir}",
  )
  identity = json.dumps(
      {
          "source": hashlib.sha256(source).hexdigest(),
          "jaxlib": jaxlib.__version__,
          "openblas": scipy_openblas32.__version__,
          "command": command,
          "cpu": _cpu_signature(compiler, timeout),
      }
  )
  return BuildSpec(
      hashlib.sha256(identity.encode()).hexdigest()[:16], source, command
  )


def _check_owner_and_mode(st: os.stat_result, path: str, what: str) -> None:
  """Refuses what another user (other than root) owns or could write."""
  uid = os.geteuid()
  if st.st_uid not in (uid, 0):
    raise UnsafeCacheError(
        f"refusing to load from the kernel cache: the {what} {path} belongs "
        f"to uid {st.st_uid}, not to this user (uid {uid}) or root; remove "
        f"it, or point CIGN_JAX_CACHE at a directory of your own"
    )
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    raise UnsafeCacheError(
        f"refusing to load from the kernel cache: the {what} {path} is "
        f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
        f"remove it, or point CIGN_JAX_CACHE at a directory of your own"
    )


def _link_refused(path: str) -> UnsafeCacheError:
  """The refusal of a link in the cache (it could lead anywhere)."""
  return UnsafeCacheError(
      f"refusing to load from the kernel cache: {path} is a symbolic link "
      f"(none is followed below the cache root); remove it so that the "
      f"kernels are rebuilt there"
  )


def _open_private_dir(parent_fd: int, name: str, path: str) -> int:
  """A descriptor of directory `name` in parent_fd (created 0700 if missing),
  opened without following a link and checked as opened, so that later
  steps cannot be redirected by a path that changed since the check."""
  with contextlib.suppress(FileExistsError):
    os.mkdir(name, 0o700, dir_fd=parent_fd)
  st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
  if stat.S_ISLNK(st.st_mode):
    raise _link_refused(path)
  if not stat.S_ISDIR(st.st_mode):
    raise NativeBuildError(
        f"{path} is not a directory; remove it so that "
        f"the kernels can be cached there"
    )
  try:
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
  except OSError as e:
    if e.errno in (errno.ELOOP, errno.ENOTDIR):  # made a link since the stat
      raise _link_refused(path) from e
    raise
  try:
    _check_owner_and_mode(os.fstat(fd), path, "directory")
  except BaseException:
    os.close(fd)
    raise
  return fd


@contextlib.contextmanager
def _key_directory(key: str):
  """Yields (descriptor, path) of <cache_root>/native/<key>, each directory
  below the root opened by `_open_private_dir` from its parent's
  descriptor. The root itself may be a link (~/.cache often is)."""
  root = utils.cache_root()
  os.makedirs(root, exist_ok=True)
  fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
  try:
    path = root
    for part in ("native", key):
      path = os.path.join(path, part)
      fds.append(_open_private_dir(fds[-1], part, path))
    yield fds[-1], path
  finally:
    for fd in fds:
      os.close(fd)


@contextlib.contextmanager
def _exclusive(dir_fd: int, path: str, wait: float):
  """Holds an exclusive lock on <dir>/lock, so that one process at a time
  checks, builds and loads the library there (two builders could otherwise
  leave one's library beside the other's record); after `wait` seconds, or
  on a file system without locks, goes on without it, which costs at most
  a rebuild since nothing unverified is loaded."""
  lock_path = os.path.join(path, _LOCK_NAME)
  try:
    fd = os.open(
        _LOCK_NAME,
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _link_refused(lock_path) from e
    raise NativeBuildError(f"cannot open {lock_path}: {e}") from e
  try:
    deadline = time.monotonic() + wait
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          logging.warning(
              "cign_jax: %s has been locked for over %.0fs; "
              "going on without the lock",
              lock_path,
              wait,
          )
          break
        time.sleep(0.2)
      except OSError:
        break
    yield
  finally:
    os.close(fd)  # releases the lock


def _remove_stale_temporaries(dir_fd: int, path: str, timeout: float) -> None:
  """Removes tmp* entries that an interrupted writer left (older than a build
  may take, so that a concurrent unlocked writer's files stay)."""
  cutoff = time.time() - timeout - 60
  for name in os.listdir(dir_fd):
    if not name.startswith("tmp"):
      continue
    try:
      st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
      if st.st_mtime > cutoff:
        continue
      if stat.S_ISDIR(st.st_mode):  # a build directory of older versions
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
      else:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
      pass


def _write_all(fd: int, data: bytes) -> None:
  """Writes all of `data` (os.write may write part of it)."""
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view) :]


def _write_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
  """Writes `name` in dir_fd atomically: a temporary, synced, then renamed
  over it, so that a reader (or a crash) sees the old file or the new one."""
  temp = f"tmp{secrets.token_hex(8)}"
  fd = os.open(
      temp,
      os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
      mode,
      dir_fd=dir_fd,
  )
  try:
    try:
      os.fchmod(fd, mode)  # whatever the umask
      _write_all(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temp, dir_fd=dir_fd)
    raise


def _compile(spec: BuildSpec, timeout: float) -> bytes:
  """Compiles spec.source and returns the library's bytes. It is built in a
  private temporary directory, not at a path in the cache, which another
  user could redirect if the cache root is shared."""
  work = tempfile.mkdtemp(prefix="cign_jax_build")
  try:
    src = os.path.join(work, os.path.basename(SOURCE))
    out = os.path.join(work, LIBRARY_NAME)
    with open(src, "wb") as f:
      f.write(spec.source)  # the bytes that were hashed, whatever SOURCE is now
    cmd = [
        src if a == _SOURCE_ARG else out if a == _OUTPUT_ARG else a
        for a in spec.command
    ]
    # A session of its own, so that a timeout ends a wrapper's children too.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=work,
        start_new_session=True,
    )
    try:
      _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      raise NativeBuildError(
          f"compiling {SOURCE} took more than {timeout}s (set "
          f"{BUILD_TIMEOUT_ENV} to allow longer): {shlex.join(cmd)}"
      ) from e
    if proc.returncode != 0:
      raise NativeBuildError(
          f"compiling {SOURCE} failed " f"({shlex.join(cmd)}):\n{err[-4000:]}"
      )
    try:
      with open(out, "rb") as f:
        return f.read()
    except OSError as e:
      raise NativeBuildError(f"{shlex.join(cmd)} wrote no library: {e}") from e
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _build(spec: BuildSpec, dir_fd: int, timeout: float) -> None:
  """Compiles the library into dir_fd (mode 0755) with its build record.

  The library is renamed into place first and its record last, each
  atomically: after a crash in between, the new library sits beside the
  old record or none, which the check before loading rejects (a rebuild).
  """
  data = _compile(spec, timeout)
  record = {
      "key": spec.key,
      "size": len(data),
      "sha256": hashlib.sha256(data).hexdigest(),
  }
  _write_file(dir_fd, LIBRARY_NAME, data, 0o755)
  _write_file(dir_fd, RECORD_NAME, json.dumps(record).encode(), 0o644)
  os.fsync(dir_fd)  # the renames too


def _read_cached(
    dir_fd: int, name: str, path: str, what: str, limit: int
) -> Optional[bytes]:
  """The bytes of `name` in dir_fd if it is a regular file (not a link)
  owned by this user or root that group and others cannot write, checked
  on the opened file; None if it is missing.

  Raises:
    _StaleLibrary: it is longer than `limit` bytes.
    UnsafeCacheError: it fails the checks.
  """
  try:
    # O_NONBLOCK: a FIFO planted here must not hang the open.
    fd = os.open(
        name,
        os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        dir_fd=dir_fd,
    )
  except FileNotFoundError:
    return None
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _link_refused(path) from e
    raise NativeBuildError(f"cannot open {path}: {e}") from e
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise UnsafeCacheError(
          f"refusing to load from the kernel cache: "
          f"{path} is not a regular file"
      )
    _check_owner_and_mode(st, path, what)
    chunks, size = [], 0
    while size <= limit:
      chunk = os.read(fd, min(1 << 20, limit + 1 - size))
      if not chunk:
        break
      chunks.append(chunk)
      size += len(chunk)
  finally:
    os.close(fd)
  if size > limit:
    raise _StaleLibrary(f"{path} is larger than {limit} bytes")
  return b"".join(chunks)


def _verified_library(dir_fd: int, path: str, key: str) -> bytes:
  """The cached library's bytes, read once and checked against its build
  record (key, size and SHA-256): these bytes, not the file, get loaded.

  Raises:
    _NotBuilt: there is no library.
    _StaleLibrary: its record is missing or invalid, or does not match.
    UnsafeCacheError: the library or its record fails `_read_cached`.
  """
  data = _read_cached(dir_fd, LIBRARY_NAME, path, "library", _MAX_LIBRARY_BYTES)
  if data is None:
    raise _NotBuilt(f"{path} is not built")
  record_path = os.path.join(os.path.dirname(path), RECORD_NAME)
  raw = _read_cached(
      dir_fd, RECORD_NAME, record_path, "build record", _MAX_RECORD_BYTES
  )
  if raw is None:
    raise _StaleLibrary(
        f"{path} has no build record ({record_path} is " f"missing)"
    )
  try:
    record = json.loads(raw)
    size, digest = record["size"], record["sha256"]
    valid = (
        record["key"] == key
        and isinstance(size, int)
        and isinstance(digest, str)
    )
  except (ValueError, KeyError, TypeError):
    valid = False
  if not valid:
    raise _StaleLibrary(
        f"the build record {record_path} of {path} is not "
        f"valid (not JSON with this key, a size and a "
        f"SHA-256)"
    )
  if len(data) != size:
    raise _StaleLibrary(
        f"{path} is {len(data)} bytes, its build record "
        f"{record_path} says {size}"
    )
  if hashlib.sha256(data).hexdigest() != digest:
    raise _StaleLibrary(
        f"the SHA-256 of {path} differs from its build " f"record {record_path}"
    )
  return data


def _load_bytes(data: bytes, dir_fd: int, path: str) -> ctypes.CDLL:
  """Loads the verified bytes of the library at `path` from a private copy.

  The copy is an unlinked file in dir_fd (the library's own file system,
  so executable wherever the cache is), loaded through /proc/self/fd:
  loading the cached file after hashing it would load whatever it holds by
  then, and a mapped file truncated later would crash the process (SIGBUS).
  """
  temp = f"tmp{secrets.token_hex(8)}.so"
  fd = os.open(
      temp,
      os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
      0o700,
      dir_fd=dir_fd,
  )
  try:
    os.unlink(temp, dir_fd=dir_fd)
    _write_all(fd, data)
  except BaseException:
    os.close(fd)
    raise
  try:
    lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
  except OSError as e:
    os.close(fd)
    raise _LoadError(f"{path} does not load: {e}") from e
  # From here the descriptor stays open: the dynamic loader knows the
  # library by this /proc path, and would hand it back for another file
  # opened later under the same descriptor number.
  missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
  if missing:
    raise _LoadError(f"{path} lacks {', '.join(missing)}")
  return lib


def _load_cached(spec: BuildSpec, timeout: float) -> ctypes.CDLL:
  """Loads the library from the cache, building it if it is missing, and
  rebuilding it (once) if it fails its record or does not load."""
  with _key_directory(spec.key) as (dir_fd, key_dir), _exclusive(
      dir_fd, key_dir, 2 * timeout + 60
  ):
    path = os.path.join(key_dir, LIBRARY_NAME)
    _remove_stale_temporaries(dir_fd, key_dir, timeout)
    built = False
    try:
      data = _verified_library(dir_fd, path, spec.key)
    except _NotBuilt:
      built = True
    except _StaleLibrary as e:
      logging.warning(
          "cign_jax: the cached C++ conv kernels are not the ones "
          "built (%s); rebuilding them once",
          e,
      )
      built = True
    if built:
      _build(spec, dir_fd, timeout)
      data = _verified_library(dir_fd, path, spec.key)
    try:
      return _load_bytes(data, dir_fd, path)
    except _LoadError as e:
      if built:
        raise
      logging.warning(
          "cign_jax: the cached C++ conv kernels do not load "
          "(%s); rebuilding them once",
          e,
      )
    _build(spec, dir_fd, timeout)
    return _load_bytes(_verified_library(dir_fd, path, spec.key), dir_fd, path)


def _load() -> None:
  if os.environ.get(ENV_SWITCH, "1") == "0":
    raise NativeBuildError(f"disabled by {ENV_SWITCH}=0")
  for name, max_value in TUNING_ENV.items():
    _env_int(name, 1, max_value)
  timeout = _env_int(BUILD_TIMEOUT_ENV, 300, 86400)
  if not os.path.isdir("/proc/self/fd"):
    raise NativeBuildError(
        "loading the kernels safely needs /proc/self/fd " "(Linux)"
    )
  compiler = _compiler()
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise NativeBuildError("the scipy-openblas32 wheel is not installed") from e
  spec = _build_spec(compiler, timeout)
  lib = _load_cached(spec, timeout)
  lib.cign_native_init()
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
    )


def available() -> bool:
  """Whether the kernels are built and registered (builds them once), and
  not switched off by `disabled()`."""
  with _lock:
    if _state["disabled"]:
      return False
    if not _state["loaded"] and _state["error"] is None:
      try:
        _load()
        _state["loaded"] = True
      except Exception as e:  # pylint: disable=broad-except
        # Whatever went wrong (registration raises ValueError/RuntimeError
        # too), XLA's formulations take over, and later traces do not retry.
        _state["error"] = f"{type(e).__name__}: {e}"
        if os.environ.get(ENV_SWITCH, "1") != "0":
          logging.warning(
              "cign_jax: the C++ conv kernels are unavailable, "
              "CPU convolutions use XLA (slower): %s",
              _state["error"],
          )
    return _state["loaded"]


@contextlib.contextmanager
def disabled():
  """Within this block `available()` is False, so functions traced in it
  use XLA's formulations (plans are chosen when a function is traced)."""
  with _lock:
    _state["disabled"] += 1
  try:
    yield
  finally:
    with _lock:
      _state["disabled"] -= 1


def unavailable_reason() -> Optional[str]:
  """Why `available()` is False (None when it is True or not yet asked)."""
  return _state["error"]


def _require():
  if not available():
    raise NativeBuildError(
        f"the native conv kernels are not available: " f"{unavailable_reason()}"
    )


def _attrs(kh, kw, stride, padding):
  """The kernels' attributes, checked (the C++ side refuses the same)."""
  for name, value, low in (
      ("kernel height", kh, 1),
      ("kernel width", kw, 1),
      ("stride", stride, 1),
      ("padding", padding, 0),
  ):
    if not isinstance(value, (int, np.integer)) or not (
        low <= value <= MAX_ATTR
    ):
      raise ValueError(
          f"native conv: {name} must be an integer in "
          f"[{low}, {MAX_ATTR}], got {value!r}"
      )
  return dict(
      kh=np.int64(kh),
      kw=np.int64(kw),
      stride=np.int64(stride),
      padding=np.int64(padding),
  )


def _out_size(size, k, stride, padding):
  """lax's output size: 0 where the kernel does not fit."""
  return max(0, (size + 2 * padding - k) // stride + 1)


def conv_forward(x, kernel, stride: int, padding: int):
  """conv2d: x (B,H,W,C), kernel (kh,kw,C,Co) -> (B,Ho,Wo,Co), float32."""
  _require()
  kh, kw, c, co = kernel.shape
  attrs = _attrs(kh, kw, stride, padding)
  b, h, w, _ = x.shape
  shape = (
      b,
      _out_size(h, kh, stride, padding),
      _out_size(w, kw, stride, padding),
      co,
  )
  return jax.ffi.ffi_call(
      "cign_conv_forward",
      jax.ShapeDtypeStruct(shape, jnp.float32),
      vmap_method="sequential",
  )(
      x.astype(jnp.float32),
      kernel.astype(jnp.float32).reshape(kh * kw * c, co),
      **attrs,
  )


def conv_input_grad(g, kernel, stride: int, padding: int, hw: Tuple[int, int]):
  """The adjoint of conv_forward in x: g (B,Ho,Wo,Co) -> (B,H,W,C) for an
  input of spatial size hw (rows a strided conv never reads get zeros)."""
  _require()
  kh, kw, c, co = kernel.shape
  attrs = _attrs(kh, kw, stride, padding)
  shape = (g.shape[0], hw[0], hw[1], c)
  return jax.ffi.ffi_call(
      "cign_conv_input_grad",
      jax.ShapeDtypeStruct(shape, jnp.float32),
      vmap_method="sequential",
  )(
      g.astype(jnp.float32),
      kernel.astype(jnp.float32).reshape(kh * kw * c, co),
      **attrs,
  )


def conv_kernel_grad(x, g, kh: int, kw: int, stride: int, padding: int):
  """The adjoint of conv_forward in the kernel: (kh, kw, C, Co)."""
  _require()
  attrs = _attrs(kh, kw, stride, padding)
  c, co = x.shape[-1], g.shape[-1]
  dk = jax.ffi.ffi_call(
      "cign_conv_kernel_grad",
      jax.ShapeDtypeStruct((kh * kw * c, co), jnp.float32),
      vmap_method="sequential",
  )(x.astype(jnp.float32), g.astype(jnp.float32), **attrs)
  return dk.reshape(kh, kw, c, co)
