"""TensorBoard metric writers for training, with or without TensorFlow.

clu's TensorBoard writer (`clu.metric_writers.SummaryWriter`) writes through
`tf.summary`, and importing `clu.metric_writers` imports TensorFlow. A GPU
machine with jax, flax and tensorboard but no TensorFlow could then not train.
`create_default_writer` here returns clu's own default writer when
`clu.metric_writers` imports, and otherwise the same arrangement (a clu
`LoggingWriter` plus a TensorBoard writer, in clu's `MultiWriter` or
`AsyncMultiWriter`) with `TensorBoardWriter`, which writes the event files
through the `tensorboard` package alone: the summaries are built with
TensorBoard's own protobuf helpers (the ones `tf.summary` uses) in the same
form `tf.summary` writes them (tensor summaries with the scalars, images,
text, histogram and hparams plugin metadata), so TensorBoard shows the same
runs whichever writer wrote them.
"""

import importlib
import importlib.util
import io
import os
import sys
import time
from typing import Any, Mapping, Optional

from absl import logging
from clu.internal import utils as clu_utils
import numpy as np
from PIL import Image

# TensorBoard's summary helpers and event writer; none of these modules
# imports TensorFlow (tensorboard.compat loads it lazily, only when used).
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import summary_v2 as histogram_summary
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import summary_v2 as text_summary
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util

_CLU_WRITERS = "clu.metric_writers"


def _clu_writer_module(name: str):
  """`clu.metric_writers.<name>` without running the package's `__init__`.

  `clu/metric_writers/__init__.py` imports clu's TensorFlow summary writer;
  the modules for the interface, the logging writer and the multi writers do
  not need TensorFlow. When the package itself is not imported, a bare
  package module stands in for it while the submodule loads, and is removed
  again afterwards, so a later `import clu.metric_writers` behaves as usual.

  Args:
    name: the submodule, e.g. "interface" or "logging_writer".

  Returns:
    The imported submodule.
  """
  full_name = f"{_CLU_WRITERS}.{name}"
  if full_name in sys.modules or _CLU_WRITERS in sys.modules:
    return importlib.import_module(full_name)
  spec = importlib.util.find_spec(_CLU_WRITERS)
  if spec is None:
    raise ImportError(
        f"{_CLU_WRITERS} not found; install clu (pip install clu)"
    )
  package = importlib.util.module_from_spec(spec)
  sys.modules[_CLU_WRITERS] = package
  try:
    return importlib.import_module(full_name)
  finally:
    if sys.modules.get(_CLU_WRITERS) is package:
      del sys.modules[_CLU_WRITERS]


_interface = _clu_writer_module("interface")
MetricWriter = _interface.MetricWriter


def _png(image_u8: np.ndarray) -> bytes:
  modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
  if image_u8.shape[-1] == 1:
    image_u8 = image_u8[..., 0]
    mode = "L"
  else:
    mode = modes[image_u8.shape[-1]]
  buffer = io.BytesIO()
  Image.fromarray(image_u8, mode=mode).save(buffer, format="PNG")
  return buffer.getvalue()


def image_to_uint8(images: Any) -> np.ndarray:
  """Pixels as `tf.summary.image` stores them.

  Args:
    images: uint8 pixels, or floating point values meant to lie in [0, 1].

  Returns:
    The uint8 array: uint8 input unchanged; floats saturated to [0, 255]
    after scaling by 255.5 and truncated (what `tf.image.convert_image_dtype`
    does with `saturate=True`).

  Raises:
    ValueError: for any other dtype.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    scaled = images.astype(np.float64) * 255.5
    return np.clip(scaled, 0, 255).astype(np.uint8)
  raise ValueError(
      f"images must be uint8 or floating point in [0, 1], "
      f"got dtype {images.dtype}"
  )


class TensorBoardWriter(MetricWriter):
  """A clu `MetricWriter` that writes TensorBoard event files without
  TensorFlow, through `tensorboard.summary.writer.event_file_writer`.

  Scalars, images, texts, histograms, raw tensor summaries and hparams are
  written as `tf.summary` writes them; videos are not supported (as in clu's
  TensorFlow writer) and neither are audios: both log a warning once.
  """

  def __init__(self, logdir: str):
    """Opens a new events file in `logdir` (created if missing).

    Args:
      logdir: the run directory TensorBoard reads.
    """
    self._events = event_file_writer.EventFileWriter(logdir)

  def _write(self, step: int, summary) -> None:
    self._events.add_event(
        event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
    )

  def write_summaries(
      self,
      step: int,
      values: Mapping[str, Any],
      metadata: Optional[Mapping[str, Any]] = None,
  ):
    summary = summary_pb2.Summary()
    for key, value in values.items():
      md = metadata.get(key) if metadata is not None else None
      if md is None:
        md = summary_pb2.SummaryMetadata()
      elif isinstance(md, bytes):
        md = summary_pb2.SummaryMetadata.FromString(md)
      elif not isinstance(md, summary_pb2.SummaryMetadata):
        # The same message from another proto package (e.g. TensorFlow's).
        md = summary_pb2.SummaryMetadata.FromString(md.SerializeToString())
      summary.value.add(
          tag=key,
          metadata=md,
          tensor=tensor_util.make_tensor_proto(np.asarray(value)),
      )
    self._write(step, summary)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._write(step, scalar_summary.scalar_pb(key, np.asarray(value)))

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      pixels = image_to_uint8(value)
      if pixels.ndim == 3:
        pixels = pixels[None]
      if pixels.ndim != 4 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"image {key!r}: shape {pixels.shape}; expected [N, H, W, C] or "
            f"[H, W, C] with C in 1 (grey), 2 (grey+alpha), 3 (RGB), 4 (RGBA)"
        )
      # tf.summary.image's tensor: width, height, then one PNG per image.
      content = [str(pixels.shape[2]).encode(), str(pixels.shape[1]).encode()]
      content += [_png(image) for image in pixels]
      summary = summary_pb2.Summary()
      summary.value.add(
          tag=key,
          metadata=image_metadata.create_summary_metadata(
              display_name=None, description=None
          ),
          tensor=tensor_util.make_tensor_proto(np.array(content, dtype=object)),
      )
      self._write(step, summary)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.log_first_n(
        logging.WARNING, "TensorBoardWriter does not write videos.", 1
    )

  def write_audios(
      self, step: int, audios: Mapping[str, Any], *, sample_rate: int
  ):
    logging.log_first_n(
        logging.WARNING, "TensorBoardWriter does not write audios.", 1
    )

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._write(step, text_summary.text_pb(key, value))

  def write_histograms(
      self,
      step: int,
      arrays: Mapping[str, Any],
      num_buckets: Optional[Mapping[str, int]] = None,
  ):
    for key, value in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      self._write(
          step,
          histogram_summary.histogram_pb(
              key, np.asarray(value), buckets=buckets
          ),
      )

  def write_hparams(self, hparams: Mapping[str, Any]):
    # As clu: flattened names, None as "", written at step 0.
    flat = dict(clu_utils.flatten_dict(hparams))
    self._write(0, hparams_summary.hparams_pb(flat))

  def flush(self):
    self._events.flush()

  def close(self):
    self._events.close()


def create_default_writer(
    logdir: Optional[str] = None,
    *,
    just_logging: bool = False,
    asynchronous: bool = True,
    collection: Optional[str] = None,
) -> MetricWriter:
  """clu's default writer, with or without TensorFlow.

  Args:
    logdir: where the TensorBoard events go; None writes only to the log.
    just_logging: only log (for processes other than the first, which alone
      writes the events).
    asynchronous: write from a background thread (clu's AsyncMultiWriter).
    collection: a sub-directory of `logdir` and a tag in the log lines.

  Returns:
    `clu.metric_writers.create_default_writer(...)` when clu's writers import
    (TensorFlow installed), else the same writers with `TensorBoardWriter` in
    place of clu's TensorFlow `SummaryWriter`.
  """
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    logging.info(
        "clu's TensorFlow summary writer is unavailable (%s); "
        "writing TensorBoard events with the tensorboard package",
        e,
    )
  else:
    return metric_writers.create_default_writer(
        logdir,
        just_logging=just_logging,
        asynchronous=asynchronous,
        collection=collection,
    )
  return create_tensorboard_writer(
      logdir,
      just_logging=just_logging,
      asynchronous=asynchronous,
      collection=collection,
  )


def create_tensorboard_writer(
    logdir: Optional[str] = None,
    *,
    just_logging: bool = False,
    asynchronous: bool = True,
    collection: Optional[str] = None,
) -> MetricWriter:
  """The writers of clu's `create_default_writer`, without TensorFlow.

  Args: as `create_default_writer`.

  Returns:
    A clu `MultiWriter` (or `AsyncMultiWriter`) of a clu `LoggingWriter` and,
    unless `just_logging` or `logdir` is None, a `TensorBoardWriter` on
    `logdir` (joined with `collection` when given).
  """
  logging_writer = _clu_writer_module("logging_writer")
  writers = [logging_writer.LoggingWriter(collection=collection)]
  if not just_logging and logdir is not None:
    logdir = os.fspath(logdir)
    if collection is not None:
      logdir = os.path.join(logdir, collection)
    writers.append(TensorBoardWriter(logdir))
  if asynchronous:
    return _clu_writer_module("async_writer").AsyncMultiWriter(writers)
  return _clu_writer_module("multi_writer").MultiWriter(writers)
