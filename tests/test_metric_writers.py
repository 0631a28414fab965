"""TensorBoard summaries without TensorFlow: cign_jax.metric_writers.

The events that `TensorBoardWriter` writes are read back with TensorBoard's
own event readers and compared with the values written, with what clu's
TensorFlow writer writes for the same calls, and (in a process where
`import tensorflow` fails) with what the training loop logs.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from cign_jax import losses
from cign_jax import metric_writers
from cign_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def _read(logdir, plugin_aware=False):
  module = plugin_event_accumulator if plugin_aware else event_accumulator
  acc = module.EventAccumulator(logdir, size_guidance={"tensors": 0})
  acc.Reload()
  return acc


def _decode_image_tensor(tensor_proto):
  """tf.summary.image's tensor -> (width, height, [uint8 (H, W[, C])...])."""
  content = tensor_util.make_ndarray(tensor_proto)
  width, height = int(content[0]), int(content[1])
  return (
      width,
      height,
      [np.asarray(Image.open(io.BytesIO(png))) for png in content[2:]],
  )


def _session_start_hparams(acc):
  content = acc.SummaryMetadata(
      hparams_metadata.SESSION_START_INFO_TAG
  ).plugin_data.content
  info = hparams_metadata.parse_session_start_info_plugin_data(content)
  out = {}
  for name, value in info.hparams.items():
    out[name] = getattr(value, value.WhichOneof("kind"))
  return out


def _write_examples(writer):
  """The same calls for every writer under test; returns what was written."""
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (2, 5, 7, 1), dtype=np.uint8)
  rgb = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
  writer.write_hparams(
      {
          "batch_size": 4,
          "model": {"latent_dim": 2},
          "name": "run",
          "lr": 0.5,
          "flag": True,
          "missing": None,
      }
  )
  writer.write_scalars(2, {"loss": 1.25, "loss_rec": np.float32(0.75)})
  writer.write_scalars(4, {"loss": 0.5, "loss_rec": np.float32(0.125)})
  writer.write_images(4, {"grey": grey, "rgb": rgb})
  writer.write_texts(4, {"note": "hello"})
  writer.flush()
  writer.close()
  return grey, rgb


def test_writer_round_trips_through_the_event_reader(tmp_path):
  logdir = str(tmp_path)
  grey, rgb = _write_examples(metric_writers.TensorBoardWriter(logdir))
  acc = _read(logdir)
  tags = acc.Tags()["tensors"]
  assert {
      "loss",
      "loss_rec",
      "grey",
      "rgb",
      "note",
      hparams_metadata.SESSION_START_INFO_TAG,
  } <= set(tags)

  for tag, expected in (
      ("loss", {2: 1.25, 4: 0.5}),
      ("loss_rec", {2: 0.75, 4: 0.125}),
  ):
    events = acc.Tensors(tag)
    assert {
        e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events
    } == expected
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"

  (event,) = acc.Tensors("grey")
  assert event.step == 4
  assert acc.SummaryMetadata("grey").plugin_data.plugin_name == "images"
  width, height, images = _decode_image_tensor(event.tensor_proto)
  assert (width, height) == (7, 5)
  assert len(images) == 2
  for decoded, written in zip(images, grey):
    np.testing.assert_array_equal(decoded, written[..., 0])
  (event,) = acc.Tensors("rgb")  # a single [H, W, C] image
  width, height, images = _decode_image_tensor(event.tensor_proto)
  assert (width, height) == (4, 6)
  assert len(images) == 1
  np.testing.assert_array_equal(images[0], rgb)

  (event,) = acc.Tensors("note")
  assert acc.SummaryMetadata("note").plugin_data.plugin_name == "text"
  assert tensor_util.make_ndarray(event.tensor_proto).item() == b"hello"

  assert _session_start_hparams(acc) == {
      "batch_size": 4.0,
      "model.latent_dim": 2.0,
      "name": "run",
      "lr": 0.5,
      "flag": True,
      "missing": "",
  }


def test_float_images_are_stored_as_tf_summary_image_stores_them():
  # tf.image.convert_image_dtype(x, uint8, saturate=True): x * 255.5,
  # saturated to [0, 255], truncated.
  floats = np.array([-1.0, 0.0, 0.001, 0.5, 0.999, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(
      metric_writers.image_to_uint8(floats), [0, 0, 0, 127, 255, 255, 255]
  )
  pixels = np.array([0, 17, 255], np.uint8)
  assert metric_writers.image_to_uint8(pixels) is pixels
  with pytest.raises(ValueError, match="uint8 or floating point"):
    metric_writers.image_to_uint8(np.array([1, 2], np.int32))


def test_bad_image_shape_is_named(tmp_path):
  writer = metric_writers.TensorBoardWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"'flat'.*expected \[N, H, W, C\]"):
    writer.write_images(0, {"flat": np.zeros((5, 7), np.uint8)})
  with pytest.raises(ValueError, match="C in 1"):
    writer.write_images(0, {"five": np.zeros((1, 5, 7, 5), np.uint8)})
  writer.close()


def test_same_events_as_clus_tensorflow_writer(tmp_path):
  """The reference: clu's SummaryWriter (tf.summary) for the same calls."""
  pytest.importorskip("tensorflow")
  from clu.metric_writers import SummaryWriter  # pylint: disable=g-import-not-at-top

  ours, theirs = str(tmp_path / "ours"), str(tmp_path / "clu")
  _write_examples(metric_writers.TensorBoardWriter(ours))
  _write_examples(SummaryWriter(theirs))
  # TensorBoard's own reader (data_compat applied), as the dashboards see it.
  a, b = _read(ours, plugin_aware=True), _read(theirs, plugin_aware=True)
  assert a.Tags()["tensors"] and set(a.Tags()["tensors"]) == set(
      b.Tags()["tensors"]
  )
  assert (
      a.PluginTagToContent("scalars").keys()
      == b.PluginTagToContent("scalars").keys()
  )
  assert (
      a.PluginTagToContent("images").keys()
      == b.PluginTagToContent("images").keys()
  )
  for tag in a.Tags()["tensors"]:
    ma, mb = a.SummaryMetadata(tag), b.SummaryMetadata(tag)
    assert ma.plugin_data.plugin_name == mb.plugin_data.plugin_name, tag
    ea, eb = a.Tensors(tag), b.Tensors(tag)
    assert [e.step for e in ea] == [e.step for e in eb], tag
    for x, y in zip(ea, eb):
      assert x.tensor_proto.dtype == y.tensor_proto.dtype, tag
      if ma.plugin_data.plugin_name == "images":
        wa, ha, ia = _decode_image_tensor(x.tensor_proto)
        wb, hb, ib = _decode_image_tensor(y.tensor_proto)
        assert (wa, ha) == (wb, hb)
        assert len(ia) == len(ib)
        for p, q in zip(ia, ib):
          np.testing.assert_array_equal(p, q)
      else:
        np.testing.assert_array_equal(
            tensor_util.make_ndarray(x.tensor_proto),
            tensor_util.make_ndarray(y.tensor_proto),
        )
  assert _session_start_hparams(a) == _session_start_hparams(b)


# Trains a tiny model on synthetic data in a process where `import tensorflow`
# fails, and prints any TensorFlow module that got imported after all.
_NO_TENSORFLOW_RUN = r"""
import importlib.machinery
import sys

# As on a machine without TensorFlow: the path finder finds no `tensorflow`
# (nor keras, which needs it), so `import tensorflow` raises
# ModuleNotFoundError and importlib.util.find_spec("tensorflow") is None.
# (sys.modules["tensorflow"] = None would not do: etils and tensorflow-datasets
# take a "tensorflow" key in sys.modules as TensorFlow being loaded.)
HIDDEN = ("tensorflow", "tensorflow_io_gcs_filesystem", "keras", "tf_keras")


class HideTensorFlow:
  @staticmethod
  def find_spec(name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)

  @staticmethod
  def invalidate_caches():
    importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder
                    else f for f in sys.meta_path]
import json
import numpy as np
from absl import logging
from cign_jax import config as config_lib
from cign_jax import train
from cign_jax import utils

utils.enable_compilation_cache()
logging.set_verbosity(logging.INFO)
config = config_lib.base_config()
config.model.latent_dim = 2
config.model.intermediate_dim = 4
config.batch_size = 4
config.num_train_steps = 4
config.log_every_steps = 2
config.sample_every_steps = 2
config.checkpoint_every_steps = 4
config.best_metric = ""  # training data only: no validation split
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
labels = np.arange(16, dtype=np.int64) % 10
train.train_and_evaluate(config, sys.argv[1], dataset=(images, labels))
imported = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
print("RESULT", json.dumps({"tensorflow_modules": imported}))
"""


def test_train_loop_writes_events_without_tensorflow(tmp_path):
  workdir = str(tmp_path / "run")
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-c", _NO_TENSORFLOW_RUN, workdir],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert json.loads(line[len("RESULT ") :]) == {"tensorflow_modules": []}
  # clu's writer would have failed; the fallback says it took over.
  assert "clu's TensorFlow summary writer is unavailable" in proc.stderr

  acc = _read(workdir)
  scalar_tags = set(losses.LOSS_TERMS) | {"loss", "images_per_second"}
  assert scalar_tags | {
      "samples",
      hparams_metadata.SESSION_START_INFO_TAG,
  } == set(acc.Tags()["tensors"])
  values = {}
  for tag in scalar_tags:
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [2, 4], tag
    values[tag] = [
        float(tensor_util.make_ndarray(e.tensor_proto)) for e in events
    ]
  # `loss` is the sum of the five weighted terms at each logged step.
  for i in range(2):
    total = sum(values[t][i] for t in losses.LOSS_TERMS)
    assert values["loss"][i] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert values["images_per_second"][i] > 0

  events = acc.Tensors("samples")
  assert [e.step for e in events] == [2, 4]
  width, height, images = _decode_image_tensor(events[-1].tensor_proto)
  # The label grid: 10 rows (labels) x 10 samples of 28 px, 2 px gaps.
  assert (width, height) == (10 * 30 + 2, 10 * 30 + 2)
  (grid,) = images
  assert grid.shape == (302, 302) and grid.dtype == np.uint8
  # The gaps between the samples are white (1.0 before the uint8 scaling).
  assert np.all(grid[:2] == 255) and np.all(grid[:, :2] == 255)

  hparams = _session_start_hparams(acc)
  assert hparams["batch_size"] == 4 and hparams["model.latent_dim"] == 2
  assert hparams["num_train_steps"] == 4
