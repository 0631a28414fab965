"""Evaluation during training: label accuracy and per-class FID.

At every evaluation point of the loop (`cign_jax.validation`), with the
config's fixed noise (`config.eval_noise_seed`):

- `config.eval_samples_per_label` > 0: that many samples per label, scored
  by the library's classifier (`cign_jax.evaluation.classifier`, trained
  once per dataset and cached): `label_accuracy` (overall),
  `label_accuracy_min` (the weakest label) and `label_accuracy_<k>`.
- `config.eval_fid_sizes` (e.g. (64,)): per-class FID as the paper's Table 3
  (`eval_fid_samples_per_class` generated per label against as many of the
  first test images of that label): `fid<N>` (mean over classes),
  `fid<N>_min`, `fid<N>_max`.

The core loop does not import this package: `train_and_evaluate` here
builds the evaluator and passes it to `cign_jax.train.train_and_evaluate`.

Cost (docs/performance.md, `benchmarks/in_loop_cost.py`): label accuracy
of 100 samples per label is a forward pass of 1000 images and a classifier
pass, about 0.1% of an epoch of `configs/quick.py` on a 2-core CPU;
per-class FID64 on 100 samples per class already costs about 5.6% of an
epoch there (the Inception network at 299x299 on every sample), and the
paper's 1000 per class ten times that, so both are off by default
(`eval_samples_per_label = 0`, `eval_fid_sizes = ()`); `quick.py` and
`experiments/reproduce_table3.py` turn label accuracy on.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from cign_jax import config as config_lib
from cign_jax import sampling
from cign_jax import train
from cign_jax.data import reader
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import fid as fid_lib


class InLoopEvaluator:
  """evaluator(model, variables, step) -> {metric: value} for the loop.

  Args:
    config: the run's config (the eval_* fields, the dataset, clip_prior).
    test: (images uint8, labels) of the test split for FID; None loads the
      config's dataset.
    classifier: a `classifier.Classifier`; None loads (or trains and caches)
      the library's for the config's dataset.
    splits: ((train images, labels), (test images, labels)) to train that
      classifier on when none is cached (machines without
      tensorflow-datasets).
  """

  def __init__(self, config: ml_collections.ConfigDict, test=None,
               classifier: Optional[classifier_lib.Classifier] = None,
               splits=None):
    self.config = config
    self.num_classes = int(config.model.num_classes)
    self.samples_per_label = int(config.eval_samples_per_label)
    self.fid_sizes = tuple(int(s) for s in config.eval_fid_sizes)
    self.fid_per_class = int(config.eval_fid_samples_per_class)
    self.key = jax.random.key(int(config.eval_noise_seed))
    self.classifier = None
    if self.samples_per_label > 0:
      self.classifier = classifier or classifier_lib.load_or_train(
          config.data.dataset, config.data.data_dir, splits=splits)
    self.test = None
    if self.fid_sizes:
      if test is None:
        test = reader.load_split(config.data.dataset, "test",
                                 config.data.data_dir)
      images, labels = np.asarray(test[0]), np.asarray(test[1])
      counts = np.bincount(labels.astype(np.int64),
                           minlength=self.num_classes)
      usable = min(int(counts.min()), self.fid_per_class)
      if usable < max(self.fid_sizes):
        allowed = tuple(s for s in config_lib.FID_FEATURE_SIZES
                        if s <= usable)
        raise ValueError(
            f"config.eval_fid_sizes: FID at {max(self.fid_sizes)} features "
            f"needs that many test images per class; the test split's "
            f"smallest class has {int(counts.min())} (label "
            f"{int(counts.argmin())}); sizes it allows: {allowed or 'none'}")
      self.test = (images, labels)

  def _samples(self, model, variables, per_label: int):
    labels = np.repeat(np.arange(self.num_classes, dtype=np.int32), per_label)
    images = sampling.generate(model, variables, labels, self.key,
                               clip=bool(self.config.model.clip_prior))
    return images, labels

  def __call__(self, model, variables, step: int) -> Dict[str, Any]:
    del step  # the noise is fixed: every point is scored on the same draws
    metrics: Dict[str, Any] = {}
    n = max(self.samples_per_label,
            self.fid_per_class if self.fid_sizes else 0)
    images, labels = self._samples(model, variables, n)
    if self.samples_per_label > 0:
      keep = np.concatenate([np.arange(k * n, k * n + self.samples_per_label)
                             for k in range(self.num_classes)])
      predicted = self.classifier.predict(images[keep])
      acc = classifier_lib.label_accuracy(predicted, labels[keep],
                                          self.num_classes)
      metrics["label_accuracy"] = acc["accuracy"]
      per_label = [a for a in acc["per_label"] if a is not None]
      metrics["label_accuracy_min"] = float(min(per_label))
      for k, a in enumerate(acc["per_label"]):
        metrics[f"label_accuracy_{k}"] = a
    if self.fid_sizes:
      result = fid_lib.per_class_fid(
          images, labels, *self.test, feature_sizes=self.fid_sizes,
          max_per_class=self.fid_per_class, dataset=self.config.data.dataset,
          split="test", progress=False)
      for s in self.fid_sizes:
        metrics[f"fid{s}"] = result.mean[s]
        metrics[f"fid{s}_min"] = result.min[s]
        metrics[f"fid{s}_max"] = result.max[s]
    return metrics


def needs_evaluator(config: ml_collections.ConfigDict) -> bool:
  return config.eval_samples_per_label > 0 or bool(config.eval_fid_sizes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: Optional[Any] = None,
                       time_limit_seconds: Optional[float] = None,
                       classifier: Optional[classifier_lib.Classifier] = None):
  """`cign_jax.train.train_and_evaluate` with the config's in-loop
  evaluation (what `python -m cign_jax.main` runs).

  Args:
    config: the run's config.
    workdir: the run directory.
    dataset: as `cign_jax.train.train_and_evaluate` takes it; its test split
      (when given) also serves FID.
    time_limit_seconds: stop cleanly after this long (resumable).
    classifier: the label-accuracy classifier (default: the cached one).

  Returns:
    The final TrainState.
  """
  config = config_lib.validate(config)
  evaluator = None
  if needs_evaluator(config):
    splits = test = None
    if dataset is not None:
      train_split, test = train.split_dataset(dataset)
      if test is not None:
        splits = (train_split, test)
    evaluator = InLoopEvaluator(config, test, classifier, splits)
  return train.train_and_evaluate(config, workdir, dataset,
                                  evaluator=evaluator,
                                  time_limit_seconds=time_limit_seconds)
