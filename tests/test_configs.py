"""Every config file loads and validates, each variant too."""

import importlib.util
import os

import pytest

from cign_jax import config as config_lib

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def _config_paths():
  """'configs/NAME.py' and 'configs/NAME.py:VARIANT' for every variant a
  file lists in VARIANTS."""
  paths = []
  for name in sorted(os.listdir(CONFIGS)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    path = os.path.join(CONFIGS, name)
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in getattr(module, "VARIANTS", ("",)):
      paths.append(f"{path}:{variant}" if variant else path)
  return paths


@pytest.mark.parametrize(
    "path", _config_paths(), ids=lambda p: os.path.basename(p)
)
def test_every_config_loads_and_validates(path):
  config = config_lib.load_config_file(path)
  assert config_lib.validate(config) is config


def test_the_dataset_configs_name_their_data():
  def load(name):
    return config_lib.load_config_file(os.path.join(CONFIGS, name))

  assert load("fashion_mnist.py").data.dataset == "fashion_mnist"
  quick = load("fashion_mnist.py:quick")
  assert quick.data.dataset == "fashion_mnist"
  assert quick.best_metric == "label_accuracy"
  # All nine wrong labels, as the paper, at a smaller batch, longer.
  assert (quick.loss.num_mismatch_labels, quick.batch_size) == (9, 24)
  assert quick.num_train_steps == 4000
  cifar = load("cifar10.py")
  assert cifar.data.dataset == "tfds:cifar10"
  assert cifar.model.conditioning == "channel"
  celeba = load("ign_celeba64.py")
  assert celeba.data.dataset == "tfds:celeb_a"
  assert celeba.model.architecture == "dcgan"
  assert (celeba.model.image_size, celeba.model.image_channels) == (64, 3)
  assert celeba.loss.tightness == "smooth_clamp"


def test_the_paper_configs_keep_the_paper_shape():
  for name in ("channel_small", "channel_large", "filter_small"):
    m = config_lib.load_config_file(os.path.join(CONFIGS, f"{name}.py")).model
    assert (m.image_size, m.image_channels, m.num_classes) == (28, 1, 10)
