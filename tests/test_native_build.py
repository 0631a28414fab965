"""Building, caching and loading the C++ conv kernels, and their failure modes.

Loading runs a library's constructors inside the process, so the cache is
checked like a private directory: the tests plant libraries (one that
writes a marker file when loaded) where the kernels would be found and
expect them refused, and damage a built cache (a truncated or replaced
library, a lost record) and expect a rebuild before anything unverified is
loaded. Tests that load the real kernels run in subprocesses,
so that each starts from an unloaded state and an abort shows as a crash
(a negative return code) instead of taking pytest down.
"""

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itertools

from cign_jax import ops
from cign_jax.kernels import cpu_conv
from cign_jax.kernels import native_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(
    CXX is None, reason="no C++ compiler on this machine"
)

_PREAMBLE = """\
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from cign_jax import ops
from cign_jax.kernels import cpu_conv, native_conv
def result(**kw):
  print("RESULT " + json.dumps(kw))
"""


def _env(cache, **env_extra):
  """The environment of a fresh Python with the kernel cache at `cache`."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH", "")) if p
  )
  env["JAX_PLATFORMS"] = "cpu"
  env["CIGN_JAX_CACHE"] = str(cache)
  for name in [
      "CXX",
      native_conv.ENV_SWITCH,
      native_conv.BUILD_TIMEOUT_ENV,
      "CIGN_JAX_NATIVE_TEST_FAIL_CHUNK",
      *native_conv.TUNING_ENV,
  ]:
    env.pop(name, None)
  env.update({k: str(v) for k, v in env_extra.items()})
  return env


def _result(proc):
  """The dict a finished `_run` script passed to result(), checking that it
  exited cleanly."""
  found = [
      line for line in proc.stdout.splitlines() if line.startswith("RESULT ")
  ]
  assert proc.returncode == 0 and found, (
      f"subprocess failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
      f"{proc.stderr[-6000:]}"
  )
  return json.loads(found[-1][len("RESULT ") :])


def _run(script, cache, **env_extra):
  """Runs `script` (after _PREAMBLE) in a fresh Python with the kernel cache
  at `cache`; returns (process, the dict it passed to result())."""
  proc = subprocess.run(
      [sys.executable, "-c", _PREAMBLE + textwrap.dedent(script)],
      env=_env(cache, **env_extra),
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  return proc, _result(proc)


def _script(path, text):
  path.write_text("#!/bin/sh\n" + textwrap.dedent(text))
  path.chmod(0o755)
  return str(path)


def _library_dirs(cache):
  """The key directories under <cache>/native."""
  native = os.path.join(cache, "native")
  return [os.path.join(native, d) for d in os.listdir(native)]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
  """A cache with the kernels built in it (by a subprocess)."""
  cache = tmp_path_factory.mktemp("kernel_cache")
  _, out = _run(
      "result(ok=native_conv.available(), "
      "why=native_conv.unavailable_reason())",
      cache,
  )
  assert out["ok"], out["why"]
  return cache


@pytest.fixture
def cache_copy(kernel_cache, tmp_path):
  """A copy of kernel_cache for one test to damage (modes kept)."""
  cache = tmp_path / "cache_copy"
  shutil.copytree(kernel_cache, cache, symlinks=True)
  return cache


def _key_dir(cache):
  (key_dir,) = _library_dirs(cache)
  return key_dir


def _replace_file(path, data, mode=0o755):
  """Replaces `path` by a new file holding `data`, as `head -c N lib >
  lib.tmp && mv lib.tmp lib` would: same owner, another inode."""
  with open(f"{path}.tmp", "wb") as f:
    f.write(data)
  os.chmod(f"{path}.tmp", mode)
  os.replace(f"{path}.tmp", path)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _record_for(data, key):
  """A build record that vouches for the library bytes `data`."""
  return json.dumps(
      {
          "key": key,
          "size": len(data),
          "sha256": hashlib.sha256(data).hexdigest(),
      }
  )


def _assert_recorded(key_dir):
  """The cached library is the one its build record describes (hashed
  here); the record was written for this key directory."""
  data = _read(os.path.join(key_dir, native_conv.LIBRARY_NAME))
  with open(
      os.path.join(key_dir, native_conv.RECORD_NAME), encoding="utf-8"
  ) as f:
    record = json.load(f)
  assert record == json.loads(_record_for(data, os.path.basename(key_dir)))
  return data


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
  """An unloaded kernel state in this process, with its cache in tmp_path
  (the real state, and a loaded library, come back afterwards)."""
  monkeypatch.setattr(
      native_conv, "_state", {"loaded": False, "error": None, "disabled": 0}
  )
  cache = tmp_path / "cache"
  monkeypatch.setenv("CIGN_JAX_CACHE", str(cache))
  for name in [
      "CXX",
      native_conv.ENV_SWITCH,
      native_conv.BUILD_TIMEOUT_ENV,
      *native_conv.TUNING_ENV,
  ]:
    monkeypatch.delenv(name, raising=False)
  return cache


_LAX_CHECK = """
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((3, 9, 9, 5)), jnp.float32)
k = jnp.asarray(rng.standard_normal((4, 4, 5, 6)), jnp.float32)
got = native_conv.conv_forward(x, k, 2, 1)
lax_error = float(jnp.max(jnp.abs(got - ops.conv2d_reference(x, k, 2, 1))))
"""

# Whether the kernels load, and how far they are from lax's convolution.
_KERNELS_AGAINST_LAX = (
    "ok = native_conv.available()\n"
    + _LAX_CHECK
    + "result(ok=ok, why=native_conv.unavailable_reason(), "
    "lax_error=lax_error)\n"
)


# --- the cache key -----------------------------------------------------------


def test_cache_key_follows_the_compile_command_and_the_cpu(
    tmp_path, monkeypatch
):
  """The key names everything the library depends on: another compiler
  command (a wrapper, a flag) or another CPU gets a build of its own."""
  monkeypatch.delenv("CXX", raising=False)
  plain = native_conv._compiler()
  base = native_conv._build_spec(plain, 60)
  assert native_conv._build_spec(plain, 60) == base  # stable
  wrapper = _script(tmp_path / "wrap", 'exec "$@"\n')
  monkeypatch.setenv("CXX", f"{wrapper} {CXX}")
  wrapped = native_conv._compiler()
  assert wrapped == [wrapper, CXX]
  monkeypatch.setenv("CXX", f"{CXX} -DCIGN_EXTRA=1")
  with_flag = native_conv._compiler()
  keys = {
      base.key,
      native_conv._build_spec(wrapped, 60).key,
      native_conv._build_spec(with_flag, 60).key,
  }
  assert len(keys) == 3
  # Another CPU: a /proc/cpuinfo with one more feature.
  fake = tmp_path / "cpuinfo"
  fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f\n\n")
  monkeypatch.setattr(native_conv, "_CPUINFO", str(fake))
  one = native_conv._build_spec(plain, 60).key
  fake.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512fp16\n\n")
  assert native_conv._build_spec(plain, 60).key != one


def test_cpu_signature_covers_every_aarch64_feature_line(tmp_path, monkeypatch):
  """On aarch64 (no 'model name' or 'flags' lines) the signature still
  changes with any core's Features or CPU part, but not with BogoMIPS; it
  includes what the compiler resolves -march=native to."""

  def cpuinfo(second_features, bogomips="50.00"):
    core = (
        "processor\t: {n}\nBogoMIPS\t: {b}\nFeatures\t: {f}\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: "
        "0x1\nCPU part\t: {p}\nCPU revision\t: 1\n\n"
    )
    return core.format(
        n=0, b=bogomips, f="fp asimd aes sha2", p="0xd0c"
    ) + core.format(n=1, b=bogomips, f=second_features, p="0xd40")

  fake = tmp_path / "cpuinfo"
  monkeypatch.setattr(native_conv, "_CPUINFO", str(fake))
  compiler = [CXX]
  signatures = []
  for text in (
      cpuinfo("fp asimd aes sha2"),
      cpuinfo("fp asimd aes sha2 sve2"),
      cpuinfo("fp asimd aes sha2", bogomips="25.00"),
  ):
    fake.write_text(text)
    signatures.append(native_conv._cpu_signature(compiler, 60))
  assert signatures[0] != signatures[1]
  assert signatures[0] == signatures[2]
  assert "CPU part : 0xd40" in signatures[0]
  assert "-march=" in signatures[0] or "target-cpu" in signatures[0]


# --- building ----------------------------------------------------------------


def test_build_runs_a_cxx_wrapper_on_the_hashed_bytes(tmp_path):
  """CXX="wrapper c++" runs the wrapper; the source compiled is the one
  hashed even if the file changes meanwhile; the library is 0755 in 0700
  directories, and no temporary is left."""
  source = tmp_path / "conv_kernels.cc"
  shutil.copy(native_conv.SOURCE, source)
  log = tmp_path / "wrapper.log"
  # The wrapper edits the source file on the way, as a concurrent edit would.
  wrapper = _script(
      tmp_path / "wrap",
      f"""\
      echo "$@" >> {log}
      case " $* " in *" -shared "*) echo '#error edited' >> {source};; esac
      exec "$@"
      """,
  )
  cache = tmp_path / "cache"
  script = f"native_conv.SOURCE = {str(source)!r}\n" + _KERNELS_AGAINST_LAX
  _, out = _run(script, cache, CXX=f"{wrapper} {CXX}")
  assert out["ok"], out["why"]
  assert out["lax_error"] < 1e-4
  assert "#error edited" in source.read_text()
  assert any("-shared" in line for line in log.read_text().splitlines())
  native = cache / "native"
  (key_dir,) = _library_dirs(native.parent)
  assert stat.S_IMODE(native.stat().st_mode) == 0o700
  assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  assert stat.S_IMODE(os.stat(lib).st_mode) == 0o755
  record = os.path.join(key_dir, native_conv.RECORD_NAME)
  assert stat.S_IMODE(os.stat(record).st_mode) == 0o644
  assert sorted(os.listdir(key_dir)) == sorted(
      [native_conv.LIBRARY_NAME, native_conv.RECORD_NAME, "lock"]
  )
  _assert_recorded(key_dir)


def test_a_truncated_library_is_rebuilt_not_loaded(cache_copy):
  """A library cut to its first 5000 bytes (valid ELF headers, so loading it
  would crash the process with SIGBUS) and replaced by a rename is caught
  by its build record before loading: the process goes on, warns naming the
  file, rebuilds it once and runs the kernels. Temporaries an interrupted
  build left long ago are removed, a concurrent build's kept."""
  key_dir = _key_dir(cache_copy)
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  good = _read(lib)
  _replace_file(lib, good[:5000])
  old = time.time() - 2 * 86400
  for name in ("tmpk2j3_x.so", "tmpbuild_old"):
    path = os.path.join(key_dir, name)
    if name.endswith(".so"):
      open(path, "wb").close()
    else:
      os.mkdir(path)
    os.utime(path, (old, old))
  open(os.path.join(key_dir, "tmpbusy.so"), "wb").close()
  proc, out = _run(_KERNELS_AGAINST_LAX, cache_copy)
  assert out["ok"], out["why"]
  assert out["lax_error"] < 1e-4
  assert f"{lib} is 5000 bytes" in proc.stderr
  assert "rebuilding them once" in proc.stderr
  assert len(_assert_recorded(key_dir)) > 5000
  assert sorted(os.listdir(key_dir)) == sorted(
      [native_conv.LIBRARY_NAME, native_conv.RECORD_NAME, "lock", "tmpbusy.so"]
  )


def test_a_replaced_library_is_not_loaded(cache_copy, tmp_path):
  """Another library of the same size, owner and mode put in the kernels'
  place fails its record's SHA-256: it is never loaded (its constructor
  would write a marker file), and the kernels are rebuilt and used."""
  key_dir = _key_dir(cache_copy)
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  good = _read(lib)
  marker = tmp_path / "planted_library_ran"
  planted = _read(_planted_library(tmp_path, marker))
  assert len(planted) < len(good)
  planted += b"\0" * (len(good) - len(planted))  # ELF ignores a tail
  _replace_file(lib, planted)
  proc, out = _run(_KERNELS_AGAINST_LAX, cache_copy)
  assert not marker.exists(), "the replaced library was loaded"
  assert out["ok"], out["why"]
  assert out["lax_error"] < 1e-4
  assert f"the SHA-256 of {lib} differs" in proc.stderr
  assert _assert_recorded(key_dir) != planted


def test_a_library_without_the_kernels_is_rebuilt(cache_copy, tmp_path):
  """A library that matches its record but lacks the kernels' symbols (as
  a broken build would leave) is rebuilt once, not left to make every later
  run fall back to XLA."""
  key_dir = _key_dir(cache_copy)
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  planted = _read(_planted_library(tmp_path, tmp_path / "marker"))
  _replace_file(lib, planted)
  _replace_file(
      os.path.join(key_dir, native_conv.RECORD_NAME),
      _record_for(planted, os.path.basename(key_dir)).encode(),
      0o644,
  )
  proc, out = _run(_KERNELS_AGAINST_LAX, cache_copy)
  assert out["ok"], out["why"]
  assert out["lax_error"] < 1e-4
  assert f"{lib} lacks CignConvForward" in proc.stderr
  assert _assert_recorded(key_dir) != planted


def test_a_library_without_its_record_is_rebuilt(cache_copy):
  """A library with no build record (as a crash between renaming the
  library into place and writing its record leaves) is rebuilt with a
  warning naming it, and then has its record."""
  key_dir = _key_dir(cache_copy)
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  os.unlink(os.path.join(key_dir, native_conv.RECORD_NAME))
  proc, out = _run(_KERNELS_AGAINST_LAX, cache_copy)
  assert out["ok"], out["why"]
  assert out["lax_error"] < 1e-4
  assert f"{lib} has no build record" in proc.stderr
  _assert_recorded(key_dir)


@pytest.mark.parametrize(
    "damage",
    [
        "missing",
        "not_json",
        "other_key",
        "wrong_size",
        "wrong_sha256",
        "not_an_object",
    ],
)
def test_a_library_failing_its_record_is_not_verified(damage, cache_copy):
  """The check before loading reads the record beside the library and
  rejects every way it can fail to vouch for the bytes, naming the file
  (these are rebuilt, as the tests above show)."""
  key_dir = _key_dir(cache_copy)
  key = os.path.basename(key_dir)
  lib = os.path.join(key_dir, native_conv.LIBRARY_NAME)
  record_path = os.path.join(key_dir, native_conv.RECORD_NAME)
  good = json.loads(_record_for(_read(lib), key))
  record = {
      "missing": None,
      "not_json": "{size: 1",
      "other_key": json.dumps(dict(good, key="0123456789abcdef")),
      "wrong_size": json.dumps(dict(good, size=good["size"] + 1)),
      "wrong_sha256": json.dumps(dict(good, sha256="0" * 64)),
      "not_an_object": json.dumps([good]),
  }[damage]
  if record is None:
    os.unlink(record_path)
  else:
    _replace_file(record_path, record.encode(), 0o644)
  fd = os.open(key_dir, os.O_RDONLY | os.O_DIRECTORY)
  try:
    with pytest.raises(native_conv.NativeBuildError) as info:
      native_conv._verified_library(fd, lib, key)
  finally:
    os.close(fd)
  assert isinstance(info.value, native_conv._StaleLibrary)
  assert lib in str(info.value)
  # The undamaged record passes, and gives back the library's bytes.
  _replace_file(record_path, json.dumps(good).encode(), 0o644)
  fd = os.open(key_dir, os.O_RDONLY | os.O_DIRECTORY)
  try:
    assert native_conv._verified_library(fd, lib, key) == _read(lib)
  finally:
    os.close(fd)


def test_the_loaded_library_is_a_private_copy(cache_copy):
  """What gets loaded is a private copy of the verified bytes: truncating
  the cached file in place after loading (which would make a mapping of it
  raise SIGBUS at the next kernel call) does not disturb the process."""
  lib = os.path.join(_key_dir(cache_copy), native_conv.LIBRARY_NAME)
  _, out = _run(
      f"ok = native_conv.available()\nos.truncate({lib!r}, 5000)\n"
      + _LAX_CHECK
      + "result(ok=ok, lax_error=lax_error)\n",
      cache_copy,
  )
  assert out["ok"]
  assert out["lax_error"] < 1e-4


def test_concurrent_first_uses_build_once(tmp_path):
  """Two processes that find the cache empty at once build the library
  once between them (the second waits on the directory's lock, then loads
  the first one's build) and neither warns: no library is left beside
  another build's record."""
  log = tmp_path / "compiles.log"
  wrapper = _script(
      tmp_path / "wrap",
      f"""\
      case " $* " in *" -shared "*) echo compile >> {log};; esac
      exec "$@"
      """,
  )
  cache = tmp_path / "cache"
  script = _PREAMBLE + _KERNELS_AGAINST_LAX
  env = _env(cache, CXX=f"{wrapper} {CXX}")
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", script],
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for _ in range(2)
  ]
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=900)
    done = subprocess.CompletedProcess(
        proc.args, proc.returncode, stdout, stderr
    )
    out = _result(done)
    assert out["ok"], out["why"]
    assert out["lax_error"] < 1e-4
    assert "cign_jax:" not in stderr, stderr
  assert log.read_text().splitlines() == ["compile"]
  _assert_recorded(_key_dir(cache))


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
  except FileNotFoundError:
    return False


def test_a_hung_compile_times_out_and_is_ended(
    tmp_path, fresh_state, monkeypatch, caplog
):
  """A compiler that never finishes is ended with its children after
  CIGN_JAX_NATIVE_BUILD_TIMEOUT seconds; XLA's convolutions take over."""
  pid_file = tmp_path / "pid"
  wrapper = _script(
      tmp_path / "hang",
      f"""\
      case " $* " in *" -shared "*) sleep 600 & echo $! > {pid_file}; wait;;
      esac
      exec "$@"
      """,
  )
  monkeypatch.setenv("CXX", f"{wrapper} {CXX}")
  monkeypatch.setenv(native_conv.BUILD_TIMEOUT_ENV, "2")
  with caplog.at_level(logging.WARNING):
    assert not native_conv.available()
  assert native_conv.BUILD_TIMEOUT_ENV in native_conv.unavailable_reason()
  assert "unavailable" in caplog.text
  pid = int(pid_file.read_text())
  deadline = time.time() + 30
  while _alive(pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not _alive(pid), "the compiler's child survived the timeout"
  (key_dir,) = _library_dirs(fresh_state)
  assert os.listdir(key_dir) == ["lock"]


# --- who may load ------------------------------------------------------------


def _planted_library(tmp_path, marker):
  """A library whose constructor writes `marker` when it is loaded."""
  src = tmp_path / "planted.cc"
  src.write_text(textwrap.dedent(f"""\
      #include <cstdio>
      __attribute__((constructor)) static void Planted() {{
        if (std::FILE* f = std::fopen("{marker}", "w")) std::fclose(f);
      }}
      extern "C" void cign_native_init() {{}}
      """))
  out = tmp_path / "planted.so"
  subprocess.run(
      [CXX, "-shared", "-fPIC", str(src), "-o", str(out)], check=True
  )
  return out


def _can_give_away(tmp_path):
  """Whether this process can give a file to uid 65534 (another user)."""
  probe = tmp_path / "chown_probe"
  probe.touch()
  try:
    os.chown(probe, 65534, 65534)
  except OSError:
    return False
  finally:
    probe.unlink()
  return True


@pytest.mark.parametrize(
    "case",
    [
        "foreign_directory",
        "foreign_library",
        "world_writable_directory",
        "group_writable_library",
        "symlinked_library",
        "symlinked_key_directory",
        "symlinked_native_directory",
    ],
)
def test_a_planted_library_is_refused(case, tmp_path, fresh_state, caplog):
  """A library in the kernel cache that another user owns or could have
  written, or that is reached through a link (to the library, or to a
  directory of this user's on the way to it), is never loaded, even with a
  build record that vouches for it: a warning names it and XLA's
  convolutions take over."""
  if case.startswith("foreign") and not _can_give_away(tmp_path):
    pytest.skip(
        "giving a file to uid 65534 needs root, with that uid mapped "
        "(not so in an `unshare -r` user namespace)"
    )
  marker = tmp_path / "planted_library_ran"
  planted = _planted_library(tmp_path, marker)
  spec = native_conv._build_spec(native_conv._compiler(), 60)
  cache = fresh_state
  native = cache / "native"
  key_dir = native / spec.key
  # A private directory of this user's where a link may lead.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir(mode=0o700)
  real_native = elsewhere if case == "symlinked_native_directory" else native
  real_key_dir = (
      elsewhere / spec.key
      if case == "symlinked_key_directory"
      else real_native / spec.key
  )
  real_key_dir.mkdir(mode=0o700, parents=True)
  cache.mkdir(exist_ok=True)
  if case == "symlinked_native_directory":
    native.symlink_to(elsewhere)
  elif case == "symlinked_key_directory":
    native.mkdir(mode=0o700, parents=True)
    key_dir.symlink_to(real_key_dir)
  os.chmod(cache, 0o777)  # a shared cache others can write to
  lib = key_dir / native_conv.LIBRARY_NAME
  if case == "symlinked_library":
    lib.symlink_to(planted)
  else:
    shutil.copy(planted, lib)
    lib.chmod(0o755)
  (key_dir / native_conv.RECORD_NAME).write_text(
      _record_for(_read(planted), spec.key)
  )
  if case == "foreign_directory":
    for path in (native, key_dir, lib):
      os.chown(path, 65534, 65534)
  elif case == "foreign_library":
    os.chown(lib, 65534, 65534)
  elif case == "world_writable_directory":
    key_dir.chmod(0o777)
  elif case == "group_writable_library":
    lib.chmod(0o775)
  with caplog.at_level(logging.WARNING):
    assert not native_conv.available()
  reason = native_conv.unavailable_reason()
  assert "refusing to load" in reason, reason
  if case.startswith("symlinked"):
    link = {
        "symlinked_library": lib,
        "symlinked_key_directory": key_dir,
        "symlinked_native_directory": native,
    }[case]
    assert f"{link} is a symbolic link" in reason
  elif case.startswith("foreign"):
    assert "belongs to uid 65534" in reason
  else:
    assert "writable by group or others" in reason
  assert "refusing to load" in caplog.text
  assert not marker.exists(), "the planted library was loaded"
  assert "native" not in cpu_conv.cpu_plan(
      False, (1, 8, 8, 3), (4, 4, 3, 4), 2, 1
  )


def test_registration_errors_fall_back_once(kernel_cache):
  """Any error while registering the kernels with XLA (here a ValueError)
  makes the convolutions use XLA, with a warning, and is not retried."""
  proc, out = _run(
      """
      calls = []
      def failing(name, *args, **kwargs):
        calls.append(name)
        raise ValueError("target table is full")
      jax.ffi.register_ffi_target = failing
      first, second = native_conv.available(), native_conv.available()
      x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)),
                      jnp.float32)
      k = jnp.ones((4, 4, 3, 5), jnp.float32)
      err = float(jnp.max(jnp.abs(ops.conv2d(x, k, 2, 1) -
                                  ops.conv2d_reference(x, k, 2, 1))))
      result(first=first, second=second, calls=len(calls), err=err,
             why=native_conv.unavailable_reason(),
             plan=cpu_conv.cpu_plan(False, x.shape, k.shape, 2, 1))
      """,
      kernel_cache,
  )
  assert out["first"] is False and out["second"] is False
  assert out["calls"] == 1
  assert "ValueError: target table is full" in out["why"]
  assert "native" not in out["plan"]
  assert out["err"] < 1e-4
  assert "CPU convolutions use XLA" in proc.stderr


# --- the kernels' own failure modes -------------------------------------------


def test_allocation_failure_in_a_chunk_is_a_python_error(kernel_cache):
  """A chunk that cannot allocate its scratch (forced by the kernels'
  CIGN_JAX_NATIVE_TEST_FAIL_CHUNK) makes each pass raise RESOURCE_EXHAUSTED
  in Python, on the calling thread's chunk and a pool thread's alike; the
  process goes on, and the next calls compute the right values."""
  _, out = _run(
      """
      rng = np.random.default_rng(0)
      x = jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
      g = jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32)
      passes = {
          "forward": lambda: native_conv.conv_forward(x, k, 1, 1),
          "input_grad": lambda: native_conv.conv_input_grad(g, k, 1, 1,
                                                            (16, 16)),
          "kernel_grad": lambda: native_conv.conv_kernel_grad(x, g, 3, 3, 1,
                                                              1)}
      errors = {}
      for chunk in ("0", "1"):
        os.environ["CIGN_JAX_NATIVE_TEST_FAIL_CHUNK"] = chunk
        for name, fn in passes.items():
          try:
            jax.block_until_ready(fn())
            errors[name + chunk] = None
          except Exception as e:  # the error XLA raises
            errors[name + chunk] = [type(e).__name__, str(e)]
      del os.environ["CIGN_JAX_NATIVE_TEST_FAIL_CHUNK"]
      y, vjp = jax.vjp(lambda a, b: ops.conv2d_reference(a, b, 1, 1), x, k)
      dx, dk = vjp(g)
      scale = lambda a: float(jnp.max(jnp.abs(a)))
      after = [scale(passes["forward"]() - y) / scale(y),
               scale(passes["input_grad"]() - dx) / scale(dx),
               scale(passes["kernel_grad"]() - dk) / scale(dk)]
      result(errors=errors, after=after)
      """,
      kernel_cache,
  )
  assert len(out["errors"]) == 6
  for name, error in out["errors"].items():
    assert error is not None, f"{name}: no error raised"
    kind, message = error
    assert kind in ("XlaRuntimeError", "JaxRuntimeError"), (name, kind)
    assert "RESOURCE_EXHAUSTED" in message and "out of memory" in message, (
        name,
        message,
    )
  assert max(out["after"]) < 1e-5, out["after"]


def test_tuning_knobs_are_bounded(kernel_cache):
  """Out-of-range tuning knobs are refused by name before loading (XLA then
  runs the convolutions); set after loading, the kernels clamp them instead
  of overflowing a scratch size."""
  knob = "CIGN_JAX_NATIVE_MIN_ROWS"
  _, out = _run(
      f"""
      ok = native_conv.available()
      result(ok=ok, why=native_conv.unavailable_reason())
      """,
      kernel_cache,
      **{knob: 2**62},
  )
  assert out["ok"] is False
  assert knob in out["why"] and "[1, 65536]" in out["why"]
  _, out = _run(
      """
      assert native_conv.available()
      for name in native_conv.TUNING_ENV:
        os.environ[name] = str(2**62)   # read at the kernels' first call
      rng = np.random.default_rng(1)
      x = jnp.asarray(rng.standard_normal((4, 9, 9, 6)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((4, 4, 6, 5)), jnp.float32)
      g = jnp.asarray(rng.standard_normal((4, 4, 4, 5)), jnp.float32)
      fast = lambda a, b: cpu_conv.conv2d_cpu(a, b, 2, 1, ("native",) * 3)
      ref = lambda a, b: ops.conv2d_reference(a, b, 2, 1)
      errs = [float(jnp.max(jnp.abs(fast(x, k) - ref(x, k))))]
      for got, want in zip(jax.vjp(fast, x, k)[1](g), jax.vjp(ref, x, k)[1](g)):
        errs.append(float(jnp.max(jnp.abs(got - want))))
      result(errs=errs)
      """,
      kernel_cache,
  )
  assert max(out["errs"]) < 1e-4, out["errs"]


_KERNEL_GRAD = """
rng = np.random.default_rng(2)
# Discriminator block 4: a 2064 x 256 kernel gradient (2 MiB per partial).
x = jnp.asarray(rng.standard_normal((24, 4, 4, 129)), jnp.float32)
g = jnp.asarray(rng.standard_normal((24, 2, 2, 256)), jnp.float32)
runs = [np.asarray(native_conv.conv_kernel_grad(x, g, 4, 4, 2, 1))
        for _ in range(2)]
k = jnp.zeros((4, 4, 129, 256), jnp.float32)
want = np.asarray(jax.vjp(lambda b: ops.conv2d_reference(x, b, 2, 1), k)[1](g)[0])
np.save(os.environ["OUT"], runs[0])
scale = float(np.max(np.abs(want)))
result(same=bool(np.array_equal(runs[0], runs[1])),
       lax_error=float(np.max(np.abs(runs[0] - want))) / scale)
"""


def test_kernel_gradient_is_deterministic_with_bounded_partials(
    kernel_cache, tmp_path
):
  """The kernel gradient sums its chunks' partials in a fixed order: runs
  are bit-identical, also when only one partial may be alive at a time
  (CIGN_JAX_NATIVE_PARTIAL_MIB=1, smaller than one partial), and equal
  lax's gradient up to rounding."""
  results = {}
  for budget in ("", "1"):
    extra = {"OUT": tmp_path / f"dk{budget}.npy"}
    if budget:
      extra["CIGN_JAX_NATIVE_PARTIAL_MIB"] = budget
    _, out = _run(_KERNEL_GRAD, kernel_cache, **extra)
    assert out["same"], f"two runs differ (budget {budget!r})"
    assert out["lax_error"] < 1e-5, out
    results[budget] = np.load(tmp_path / f"dk{budget}.npy")
  np.testing.assert_array_equal(results[""], results["1"])


def _needs_native():
  if not native_conv.available():
    pytest.skip(
        f"native kernels unavailable: " f"{native_conv.unavailable_reason()}"
    )


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        # (B, H, C, k, s, p): outputs with a zero-size axis
        (2, 2, 2, 3, 2, 0),  # (2 - 3) // 2 + 1 = 0: C++ rounding said 1
        (1, 1, 3, 5, 1, 0),  # the kernel overhangs by 4: lax gives 0, not -3
        (2, 3, 2, 6, 1, 1),  # the same with padding
        (0, 6, 3, 3, 2, 1),  # an empty batch
    ],
)
def test_empty_convolutions_match_lax(case, transposed):
  """Convolutions with an empty output (or input) give lax's shapes in every
  CPU plan (the C++ kernels and XLA's formulations in every pass position),
  and their gradients are zeros, as autodiff of lax gives."""
  b, h, c, k, s, p = case
  if transposed and b > 0:
    pytest.skip("a transposed conv's output is empty only for an empty batch")
  plans = [
      plan
      for plan in itertools.product(cpu_conv.FORMULATIONS, repeat=3)
      if "native" not in plan or native_conv.available()
  ]
  fast = cpu_conv.conv_transpose2d_cpu if transposed else cpu_conv.conv2d_cpu
  reference = (
      ops.conv_transpose2d_reference if transposed else ops.conv2d_reference
  )
  x = jnp.asarray(
      np.random.default_rng(3).standard_normal((b, h, h, c)), jnp.float32
  )
  kern = jnp.asarray(
      np.random.default_rng(4).standard_normal((k, k, c, 2)), jnp.float32
  )
  want = reference(x, kern, s, p)
  assert 0 in want.shape
  for plan in plans:
    got = fast(x, kern, s, p, plan)
    assert got.shape == want.shape, plan
    grads = jax.grad(
        lambda a, kk, pl=plan: jnp.sum(fast(a, kk, s, p, pl)), argnums=(0, 1)
    )(x, kern)
    for grad, like in zip(grads, (x, kern)):
      assert grad.shape == like.shape, plan
      np.testing.assert_array_equal(np.asarray(grad), 0.0, err_msg=str(plan))


def test_absurd_attributes_are_refused_by_name():
  """A stride of 0 or a padding past the kernels' bound is refused before
  any arithmetic with it, on the Python side and in the kernels."""
  _needs_native()
  x = jnp.ones((1, 5, 5, 2))
  kern = jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError, match=r"stride must be an integer in \[1, "):
    native_conv.conv_forward(x, kern, 0, 1)
  with pytest.raises(ValueError, match=r"padding must be an integer in \[0, "):
    native_conv.conv_forward(x, kern, 1, 2**40)
  call = jax.ffi.ffi_call(
      "cign_conv_forward", jax.ShapeDtypeStruct((1, 1, 1, 4), jnp.float32)
  )
  with pytest.raises(Exception, match=r"padding in \[0, 1048576\]"):
    jax.block_until_ready(
        call(
            x,
            kern.reshape(18, 4),
            kh=np.int64(3),
            kw=np.int64(3),
            stride=np.int64(1),
            padding=np.int64(2**40),
        )
    )
