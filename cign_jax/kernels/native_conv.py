"""Blocked im2col convolution kernels for CPU (C++, XLA FFI + OpenBLAS).

`cign_jax/kernels/native/conv_kernels.cc` computes each pass of a shared-kernel
convolution as im2col patches times the kernel matrix, building the patches
in blocks of at least 256 rows (about 1 MiB) and multiplying each block with
OpenBLAS's sgemm (the `scipy-openblas32` wheel), on XLA's thread pool. XLA's own CPU code either
materialises the whole patch array (its copy ran at about 1.3 GB/s, 4-5x the
cost of the product) or, for its native convolutions, ran some of CIGN's
passes up to 10x slower (docs/performance.md).

The library is compiled on first use with the system's C++ compiler
(`$CXX`, else `c++`/`g++`) into the cache (`cign_jax.utils.cache_dir`), keyed
by the source, the jaxlib and OpenBLAS versions and paths, the compiler and
the CPU, and registered with XLA as three FFI targets. `available()` says
whether that worked; where it did not (no compiler, no OpenBLAS wheel,
`CIGN_JAX_NATIVE_CONV=0`), `cign_jax.ops` logs a warning with the reason
and uses its XLA formulations instead: the same results up to rounding,
about 1.5x slower train steps.

The public functions take and return JAX arrays and are used only on CPU
(under `jax.vmap` they run once per mapped element):

  conv_forward(x, kernel, stride, padding)           conv2d
  conv_input_grad(g, kernel, stride, padding, hw)    its adjoint in x
  conv_kernel_grad(x, g, kh, kw, stride, padding)    its adjoint in kernel

with x (B, H, W, C), kernel (kh, kw, C, Co), g (B, Ho, Wo, Co), PyTorch's
conv2d arithmetic Ho = (H + 2p - kh) // s + 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cign_jax import utils

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native",
                      "conv_kernels.cc")
_TARGETS = {"cign_conv_forward": "CignConvForward",
            "cign_conv_input_grad": "CignConvInputGrad",
            "cign_conv_kernel_grad": "CignConvKernelGrad"}
ENV_SWITCH = "CIGN_JAX_NATIVE_CONV"

_lock = threading.Lock()
_state = {"loaded": False, "error": None, "disabled": 0}


class NativeBuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded."""


def _compiler() -> Optional[str]:
  for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU model and its flags."""
  text = platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("model name", "flags")):
          text += line
        if line.strip() == "":
          break
  except OSError:
    pass
  return text


def _build(compiler: str) -> str:
  """Compiles the kernels (once per source/jaxlib/CPU); returns the .so."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  import scipy_openblas32  # pylint: disable=g-import-not-at-top
  with open(SOURCE, "rb") as f:
    source = f.read()
  blas_dir = scipy_openblas32.get_lib_dir()
  # The library finds OpenBLAS by its absolute path (rpath): a new
  # environment gets its own build.
  key = hashlib.sha256(source + jaxlib.__version__.encode() +
                       scipy_openblas32.__version__.encode() +
                       blas_dir.encode() + _cpu_signature().encode() +
                       compiler.encode()).hexdigest()[:16]
  out_dir = utils.cache_dir("native", key)
  lib = os.path.join(out_dir, "libcign_conv_kernels.so")
  if os.path.exists(lib):
    return lib
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
         "-pthread", f"-I{jax.ffi.include_dir()}",
         f"-I{scipy_openblas32.get_include_dir()}", SOURCE, "-o", tmp,
         f"-L{blas_dir}", f"-l{scipy_openblas32.get_library()}",
         f"-Wl,-rpath,{blas_dir}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    os.unlink(tmp)
    raise NativeBuildError(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n"
                           f"{proc.stderr[-4000:]}")
  os.replace(tmp, lib)  # atomic: a concurrent build leaves one good file
  return lib


def _load() -> None:
  if os.environ.get(ENV_SWITCH, "1") == "0":
    raise NativeBuildError(f"disabled by {ENV_SWITCH}=0")
  compiler = _compiler()
  if compiler is None:
    raise NativeBuildError("no C++ compiler found (set $CXX)")
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise NativeBuildError("the scipy-openblas32 wheel is not installed") from e
  lib = ctypes.CDLL(_build(compiler))
  lib.cign_native_init()
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib,
                                                                  symbol)),
                                platform="cpu")


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
      except (NativeBuildError, OSError, AttributeError) as e:
        _state["error"] = f"{type(e).__name__}: {e}"
        if os.environ.get(ENV_SWITCH, "1") != "0":
          logging.warning("cign_jax: the C++ conv kernels are unavailable, "
                          "CPU convolutions use XLA (slower): %s",
                          _state["error"])
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
    raise NativeBuildError(f"the native conv kernels are not available: "
                           f"{unavailable_reason()}")


def _attrs(kh, kw, stride, padding):
  return dict(kh=np.int64(kh), kw=np.int64(kw), stride=np.int64(stride),
              padding=np.int64(padding))


def _out_size(size, k, stride, padding):
  return (size + 2 * padding - k) // stride + 1


def conv_forward(x, kernel, stride: int, padding: int):
  """conv2d: x (B,H,W,C), kernel (kh,kw,C,Co) -> (B,Ho,Wo,Co), float32."""
  _require()
  kh, kw, c, co = kernel.shape
  b, h, w, _ = x.shape
  shape = (b, _out_size(h, kh, stride, padding),
           _out_size(w, kw, stride, padding), co)
  return jax.ffi.ffi_call(
      "cign_conv_forward", jax.ShapeDtypeStruct(shape, jnp.float32),
      vmap_method="sequential")(
          x.astype(jnp.float32),
          kernel.astype(jnp.float32).reshape(kh * kw * c, co),
          **_attrs(kh, kw, stride, padding))


def conv_input_grad(g, kernel, stride: int, padding: int,
                    hw: Tuple[int, int]):
  """The adjoint of conv_forward in x: g (B,Ho,Wo,Co) -> (B,H,W,C) for an
  input of spatial size hw (rows a strided conv never reads get zeros)."""
  _require()
  kh, kw, c, co = kernel.shape
  shape = (g.shape[0], hw[0], hw[1], c)
  return jax.ffi.ffi_call(
      "cign_conv_input_grad", jax.ShapeDtypeStruct(shape, jnp.float32),
      vmap_method="sequential")(
          g.astype(jnp.float32),
          kernel.astype(jnp.float32).reshape(kh * kw * c, co),
          **_attrs(kh, kw, stride, padding))


def conv_kernel_grad(x, g, kh: int, kw: int, stride: int, padding: int):
  """The adjoint of conv_forward in the kernel: (kh, kw, C, Co)."""
  _require()
  c, co = x.shape[-1], g.shape[-1]
  dk = jax.ffi.ffi_call(
      "cign_conv_kernel_grad",
      jax.ShapeDtypeStruct((kh * kw * c, co), jnp.float32),
      vmap_method="sequential")(
          x.astype(jnp.float32), g.astype(jnp.float32),
          **_attrs(kh, kw, stride, padding))
  return dk.reshape(kh, kw, c, co)
