"""A run directory nothing can corrupt: readers never write, only good steps
are checkpointed, no silent NaN, one writer per run, verified checkpoints,
and a plain last line for every failure."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import sampling
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.configs import quick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def tiny_config(**overrides):
  config = quick.get_config("tiny")
  config.update_from_flattened_dict(overrides)
  return config


def synthetic(n=64, num_classes=10, seed=0):
  """Random uint8 digits-shaped images with labels 0..num_classes-1."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
  labels = (np.arange(n) % num_classes).astype(np.int64)
  return images, labels


def mnist_head(n=512):
  from cign_jax.data import reader  # pylint: disable=g-import-not-at-top
  images, labels = reader.load_split("mnist", "train")
  return images[:n], labels[:n]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished tiny run (checkpoints 2, 4, 6), copied per test that
  changes it."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train.train_and_evaluate(tiny_config(), workdir, dataset=synthetic())
  return workdir


@pytest.fixture
def run_copy(finished, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished, workdir)
  return workdir


def test_sampling_leaves_a_saving_trainers_temporary_directory(
    run_copy, tmp_path):
  """What a training writes while it saves step 8 (an orbax temporary
  directory) survives a reader of the run."""
  tmp_dir = os.path.join(run_copy, "checkpoints", "8.orbax-checkpoint-tmp",
                         "default")
  os.makedirs(tmp_dir)
  before = sorted(os.listdir(os.path.join(run_copy, "checkpoints")))
  images, _ = sampling.sample_to_file(run_copy, str(tmp_path / "s.npz"),
                                      labels=[1], num_per_label=2)
  assert images.shape == (2, 28, 28, 1)
  checkpoints.load_model(run_copy)
  assert os.path.isdir(tmp_dir)
  assert sorted(os.listdir(os.path.join(run_copy, "checkpoints"))) == before


def test_blow_up_keeps_a_last_good_checkpoint_that_samples_finite_images(
    tmp_path, monkeypatch):
  """A learning rate of 1e-3 for two steps, then 1e6: the weights and
  BatchNorm statistics overflow; no state that does so is checkpointed, and
  the last good checkpoint samples finite images."""
  workdir = str(tmp_path / "blowup")
  monkeypatch.setattr(train_step_lib, "learning_rate",
                      lambda config, total_steps=None:
                      lambda count: jnp.where(count < 2, 1e-3, 1e6))
  config = tiny_config(num_train_steps=8, checkpoint_every_steps=1)
  with pytest.raises(train.NonFiniteLossError, match="not") as err:
    train.train_and_evaluate(config, workdir, dataset=mnist_head())
  _, _, variables, step = checkpoints.load_model(workdir)
  assert step >= 2
  assert f"(step {step}) in" in str(err.value)
  for leaf in jax.tree_util.tree_leaves(variables):
    assert np.all(np.isfinite(np.asarray(leaf)))
  images, _ = sampling.sample_to_file(workdir, str(tmp_path / "s.npz"))
  assert np.all(np.isfinite(images))
