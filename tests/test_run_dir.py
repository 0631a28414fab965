"""A run directory nothing can corrupt: readers never write, only good steps
are checkpointed, no silent NaN, one writer per run, verified checkpoints,
and a plain last line for every failure."""

import os
import shutil

import jax
import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import sampling
from cign_jax import train
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
