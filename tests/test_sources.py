"""The source kinds of `cign_jax.data.registry`: 'npz:PATH', 'folder:PATH'
and 'tfds:NAME', read into the reader's uint8 arrays, and a training through
each kind; with data made here (no network)."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import train
from cign_jax.commands import sample as sample_command
from cign_jax.data import reader
from cign_jax.data import registry
from conftest import tiny_config
import synthetic


@pytest.fixture(name="npz_path")
def _npz_path(tmp_path):
  path = tmp_path / "data.npz"
  train, test = synthetic.coloured_npz(
      path, 48, 12, class_names=np.array(["red", "green", "blue"])
  )
  return str(path), train, test


def _write_folder(root, images, labels, names, ext="png"):
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = os.path.join(root, names[label])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.{ext}"))


@pytest.fixture(name="folder_path")
def _folder_path(tmp_path):
  images, labels = synthetic.coloured(30, 40)
  test_images, test_labels = synthetic.coloured(6, 40, seed=1)
  # Named so that sorting, not creation order, gives the labels.
  names = ["zebra", "apple", "mango"]
  root = str(tmp_path / "faces")
  _write_folder(root, images, labels, names)
  _write_folder(os.path.join(root, "test"), test_images, test_labels, names)
  return root, (images, labels, names)


def test_npz_reads_both_splits_and_the_class_names(npz_path):
  path, train, test = npz_path
  found = registry.load(f"npz:{path}")
  np.testing.assert_array_equal(found.train[0], train[0])
  np.testing.assert_array_equal(found.train[1], train[1])
  np.testing.assert_array_equal(found.test[0], test[0])
  assert found.num_classes == 3
  assert found.class_names == ("red", "green", "blue")
  assert found.train[0].dtype == np.uint8 and found.train[1].dtype == np.int32
  # load_split reads a source kind too, as evaluation does.
  images, _ = reader.load_split(f"npz:{path}", "test")
  np.testing.assert_array_equal(images, test[0])


def test_npz_grey_images_and_resizing(tmp_path):
  images = np.random.RandomState(0).randint(0, 255, (5, 40, 40), np.uint8)
  path = tmp_path / "grey.npz"
  np.savez(path, images=images, labels=np.array([0, 1, 0, 1, 1]))
  found = registry.load(f"npz:{path}")
  assert found.train[0].shape == (5, 40, 40, 1) and found.test is None
  assert found.num_classes == 2
  small = registry.load(f"npz:{path}", image_size=32)
  assert small.train[0].shape == (5, 32, 32, 1)
  # Resize then centre crop, as Pillow does it (the reference).
  want = np.asarray(Image.fromarray(images[2]).resize((32, 32), Image.BICUBIC))
  np.testing.assert_array_equal(small.train[0][2, :, :, 0], want)


@pytest.mark.parametrize(
    "arrays,message",
    [
        (
            dict(
                images=np.zeros((2, 8, 8), np.uint8),
                labels=np.array([0, -1]),
            ),
            "label -1 is outside",
        ),
        (
            dict(
                images=np.zeros((2, 8, 8), np.uint8),
                labels=np.array([0, 3]),
                class_names=np.array(["a", "b"]),
            ),
            "label 3 is outside 0..1",
        ),
        (
            dict(images=np.zeros((2, 8, 8), np.float32), labels=[0, 1]),
            "must be uint8",
        ),
        (dict(labels=np.array([0, 1])), "no 'images' array"),
        (
            dict(images=np.zeros((2, 8, 8, 2), np.uint8), labels=[0, 1]),
            "C 1 or 3",
        ),
    ],
)
def test_npz_bad_input_is_named(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=message):
    registry.load(f"npz:{path}")


def test_folder_labels_are_the_sorted_class_names(folder_path):
  root, (images, labels, names) = folder_path
  found = registry.load(f"folder:{root}")
  assert found.class_names == ("apple", "mango", "zebra")
  assert found.num_classes == 3
  assert found.train[0].shape == (30, 40, 40, 3)
  assert found.test[0].shape == (6, 40, 40, 3)
  # Each image comes back (PNG is lossless) with its class's sorted index.
  sorted_label = {n: i for i, n in enumerate(sorted(names))}
  for image, label in zip(found.train[0], found.train[1]):
    index = int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0])
    assert label == sorted_label[names[labels[index]]]


def test_folder_resize_crop_and_mixed_modes(tmp_path):
  root = tmp_path / "mixed"
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  wide = np.random.RandomState(0).randint(0, 255, (20, 30, 3), np.uint8)
  Image.fromarray(wide).save(root / "a" / "wide.png")
  grey = np.full((24, 24), 100, np.uint8)
  Image.fromarray(grey).save(root / "b" / "grey.jpg", quality=100)
  found = registry.load(f"folder:{root}", image_size=16)
  # Any colour image makes the whole set RGB; grey is replicated.
  assert found.train[0].shape == (2, 16, 16, 3)
  scaled = Image.fromarray(wide).resize((24, 16), Image.BICUBIC)
  want = np.asarray(scaled.crop((4, 0, 20, 16)))
  np.testing.assert_array_equal(found.train[0][0], want)
  b = found.train[0][1]
  assert np.all(b[..., 0] == b[..., 1]) and np.all(b[..., 1] == b[..., 2])
  one = registry.load(f"folder:{root}", image_size=16, image_channels=1)
  assert one.train[0].shape == (2, 16, 16, 1)
  with pytest.raises(ValueError, match="images of sizes"):
    registry.load(f"folder:{root}")


def test_folder_names_a_file_that_is_no_image(folder_path):
  root, _ = folder_path
  bad = os.path.join(root, "apple", "notes.txt")
  with open(bad, "w") as f:
    f.write("not an image")
  with pytest.raises(ValueError, match="notes.txt is not an image"):
    registry.load(f"folder:{root}")


def test_a_folder_of_one_class_cannot_train_a_conditional_model(tmp_path):
  images, _ = synthetic.coloured(8, 32)
  _write_folder(str(tmp_path / "one"), images, [0] * 8, ["only"])
  config = tiny_config(
      **{
          "data.dataset": f"folder:{tmp_path / 'one'}",
          "model.image_size": 0,
          "model.image_channels": 0,
          "model.num_classes": 0,
          "loss.num_mismatch_labels": 0,
      }
  )
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="at least two classes"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # refused before anything was written


def _source_config(dataset, **more):
  return tiny_config(
      **{
          "data.dataset": dataset,
          "model.image_size": 0,
          "model.image_channels": 0,
          "model.num_classes": 0,
          "loss.num_mismatch_labels": 1,
          "num_train_steps": 2,
          "checkpoint_every_steps": 2,
          "eval_num_examples": 8,
          **more,
      }
  )


def test_training_through_a_folder_records_the_shape_and_classes(
    folder_path, tmp_path
):
  root, _ = folder_path
  config = _source_config(f"folder:{root}", **{"data.image_size": 32})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    recorded = json.load(f)
  assert recorded["model"]["image_size"] == 32
  assert recorded["model"]["image_channels"] == 3
  assert recorded["model"]["num_classes"] == 3
  assert recorded["data"]["class_names"] == ["apple", "mango", "zebra"]
  # load_model needs nothing but the run directory.
  run_config, model, _, step = checkpoints.load_model(workdir)
  assert (model.image_size, model.image_channels, model.num_classes) == (
      32,
      3,
      3,
  )
  assert step == 2 and tuple(run_config.data.class_names)[0] == "apple"
  samples = np.asarray(Image.open(os.path.join(workdir, "samples.png")))
  assert samples.ndim == 3 and samples.shape[-1] == 3  # an RGB grid
  # The sample command takes class names for labels.
  out = str(tmp_path / "mango.npz")
  images, labels = sample_command.sample_to_file(
      workdir, out, labels=["mango", "0"], num_per_label=2
  )
  assert labels.tolist() == [1, 1, 0, 0]
  assert images.shape == (4, 32, 32, 3)
  with pytest.raises(ValueError, match="unknown class 'kiwi'.*apple, mango"):
    sample_command.sample_to_file(workdir, out, labels=["kiwi"])
  # Resumed with the same config: nothing to do, no complaint.
  train.train_and_evaluate(config, workdir)
  # Another image size for the same run is refused, naming the field.
  other = _source_config(f"folder:{root}", **{"data.image_size": 64})
  with pytest.raises(
      ValueError, match="config.data.image_size is 32 there, 64 now"
  ):
    train.train_and_evaluate(other, workdir)


def test_training_through_an_npz(npz_path, tmp_path):
  path, _, _ = npz_path
  state = train.train_and_evaluate(
      _source_config(f"npz:{path}"), str(tmp_path / "run")
  )
  assert int(state.step) == 2
  config = checkpoints.load_config(str(tmp_path / "run"))
  assert tuple(config.data.class_names) == ("red", "green", "blue")
  # The same config on data of another size: the run's recorded shape is
  # not the data's, and the resume is refused naming the field.
  images, labels = synthetic.coloured(16, 64)
  np.savez(
      path,
      images=images,
      labels=labels,
      class_names=np.array(["red", "green", "blue"]),
  )
  with pytest.raises(
      ValueError, match="config.model.image_size is 32 there, 64 now"
  ):
    train.train_and_evaluate(
        _source_config(f"npz:{path}"), str(tmp_path / "run")
    )


def test_a_class_count_that_differs_from_the_data_is_refused(
    npz_path, tmp_path
):
  path, _, _ = npz_path
  config = _source_config(
      f"npz:{path}", **{"model.num_classes": 2, "loss.num_mismatch_labels": 1}
  )
  # The data name three classes; the model represents two.
  with pytest.raises(ValueError, match="model.num_classes is 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.fixture(name="tfds_dir", scope="module")
def _tfds_dir(tmp_path_factory):
  """A tiny tfds builder, prepared as array_record in a temporary data
  directory from arrays made here."""
  import io  # pylint: disable=g-import-not-at-top

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  images, labels = synthetic.coloured(16, 32)
  test_images, test_labels = synthetic.coloured(4, 32, seed=1)

  class CignTinyColours(tfds.core.GeneratorBasedBuilder):
    # tfds looks for a builder's files beside its module, which must be in a
    # package.
    __module__ = "cign_jax.test_builders"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict(
              {
                  "image": tfds.features.Image(shape=(32, 32, 3)),
                  "label": tfds.features.ClassLabel(
                      names=["red", "green", "blue"]
                  ),
                  # A boolean attribute, as celeb_a's: is the image red?
                  "attributes": tfds.features.FeaturesDict(
                      {"Red": tfds.features.Tensor(shape=(), dtype=np.bool_)}
                  ),
              }
          )
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
          "train": self._generate_examples(images, labels),
          "test": self._generate_examples(test_images, test_labels),
      }

    def _generate_examples(self, xs, ys):  # pylint: disable=arguments-differ
      for i, (x, y) in enumerate(zip(xs, ys)):
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "PNG")
        yield i, {
            "image": buf.getvalue(),
            "label": int(y),
            "attributes": {"Red": bool(y == 0)},
        }

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  CignTinyColours(
      data_dir=data_dir, file_format="array_record"
  ).download_and_prepare()
  return data_dir, (images, labels), (test_images, test_labels)


def test_tfds_reads_a_prepared_builder(tfds_dir):
  data_dir, (images, labels), _ = tfds_dir
  found = registry.load("tfds:cign_tiny_colours", data_dir=data_dir)
  assert found.num_classes == 3
  assert found.class_names == ("red", "green", "blue")
  assert found.train[0].shape == (16, 32, 32, 3)
  assert found.test[0].shape == (4, 32, 32, 3)
  # tfds may store examples in any order: compare as sets of (image, label).
  got = sorted(
      (x.tobytes(), int(y)) for x, y in zip(found.train[0], found.train[1])
  )
  want = sorted((x.tobytes(), int(y)) for x, y in zip(images, labels))
  assert got == want


def test_tfds_training_end_to_end(tfds_dir, tmp_path):
  data_dir, _, _ = tfds_dir
  config = _source_config(
      "tfds:cign_tiny_colours", **{"data.data_dir": data_dir}
  )
  state = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert int(state.step) == 2


def test_tfds_unknown_builder_and_feature_are_named(tfds_dir):
  data_dir, _, _ = tfds_dir
  with pytest.raises(ValueError, match="no such tfds builder"):
    registry.load("tfds:no_such_dataset_here", data_dir=data_dir)
  with pytest.raises(ValueError, match="no feature 'attributes/Male'"):
    registry.load(
        "tfds:cign_tiny_colours",
        data_dir=data_dir,
        label_key="attributes/Male",
    )


def test_tfds_needing_manual_files_names_the_manual_dir(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class CignManualOnly(tfds.core.GeneratorBasedBuilder):
    __module__ = "cign_jax.test_builders"
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put faces.zip there."

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict(
              {"image": tfds.features.Image(shape=(8, 8, 3))}
          )
      )

    def _split_generators(self, dl_manager):
      raise AssertionError("not reached")

    def _generate_examples(self):  # pylint: disable=arguments-differ
      raise AssertionError("not reached")

  del CignManualOnly
  data_dir = str(tmp_path / "tfds")
  manual = os.path.join(data_dir, "downloads", "manual")
  with pytest.raises(ValueError, match="Put faces.zip there") as error:
    registry.load("tfds:cign_manual_only", data_dir=data_dir)
  assert manual in str(error.value)


def test_unknown_kinds_and_empty_arguments_are_refused():
  config = tiny_config(**{"data.dataset": "npz:"})
  with pytest.raises(ValueError, match="names no npz source"):
    config_lib.validate(config)
  config = tiny_config(**{"data.dataset": "hdf5:/x.h5"})
  with pytest.raises(ValueError, match="folder:PATH"):
    config_lib.validate(config)


def test_tfds_boolean_attribute_as_two_classes(tfds_dir):
  data_dir, (images, labels), _ = tfds_dir
  found = registry.load(
      "tfds:cign_tiny_colours", data_dir=data_dir, label_key="attributes/Red"
  )
  assert found.num_classes == 2 and found.class_names == ("not Red", "Red")
  got = sorted(
      (x.tobytes(), int(y)) for x, y in zip(found.train[0], found.train[1])
  )
  want = sorted((x.tobytes(), int(y == 0)) for x, y in zip(images, labels))
  assert got == want
  unlabelled = registry.load(
      "tfds:cign_tiny_colours", data_dir=data_dir, label_key=""
  )
  assert unlabelled.num_classes == 1
  assert not unlabelled.train[1].any()
