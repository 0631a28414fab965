"""Evaluation during training: the config's metrics at every evaluation point.

At every evaluation point of the loop (`cign_jax.validation`), when
`config.eval_samples_per_label` > 0: that many samples per label, drawn
with the config's fixed noise (`config.eval_noise_seed`), scored by every
metric named in `config.eval_metrics` (`cign_jax.evaluation.registry`),
per class against as many of the first test images of the class. Each name
gives `<name>` (the mean over classes; label accuracy's counts every
sample), `<name>_min`, `<name>_max` and `<name>_<label>`; the loop records
them in evaluations.json and writes them to TensorBoard as
`eval/<name>...`, and `config.best_metric` may be any of the names (the
way its metric declares better).

Features are extracted once per point and shared by the metrics; the test
images' features are computed at the first point and kept (in memory, and
on disk across runs).

Cost (docs/performance.md, "Evaluation during training: what an evaluation
point costs"; `benchmarks/in_loop_cost.py`): label accuracy of 100 samples
per label is a forward pass of 1000 images and a classifier pass, a small
fraction of an epoch of `configs/quick.py`; any Inception-based metric runs
the FID Inception at 299x299 on every sample, many times that, and the
metrics on the 2048-d features (precision / recall, KID, ...) run the
network further still, so the default is label accuracy alone
(`eval_metrics = ('label_accuracy',)`, off while `eval_samples_per_label =
0`); `quick.py` and `experiments/reproduce_table3.py` turn it on.

The core loop does not import this package: `train_and_evaluate` here
builds the evaluator and passes it to `cign_jax.train.train_and_evaluate`.
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
from cign_jax.data import source_kind
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import distances
from cign_jax.evaluation import registry
from cign_jax.evaluation import scoring
from cign_jax.sweeps import training as sweep_training


def check_config(config: ml_collections.ConfigDict) -> registry.Needs:
  """What `config_lib.validate` leaves to the metrics: every name of
  `config.eval_metrics` is known, `eval_samples_per_label` is enough for
  each, and `best_metric` ranks (a named error otherwise). Returns what the
  metrics need together."""
  names = tuple(config.eval_metrics)
  need = registry.needs(names)
  if config.eval_samples_per_label > 0:
    registry.check_samples(
        names,
        int(config.eval_samples_per_label),
        "config.eval_samples_per_label",
    )
  registry.check_best_metric(config.best_metric, names)
  return need


class InLoopEvaluator:
  """evaluator(model, variables, step) -> {metric: value} for the loop.

  Args:
    config: the run's config (the eval_* fields, the dataset, clip_prior).
    test: (images uint8, labels) of the test split, the real images of the
      metrics that read them; None loads the config's dataset when needed.
    classifier: a `classifier.Classifier`; None loads (or trains and caches)
      the library's for the config's dataset, when a metric needs it.
    splits: ((train images, labels), (test images, labels)) to train that
      classifier on when none is cached (machines without
      tensorflow-datasets).
    train_split: (images uint8, labels) of the training split for metrics
      that read training images (memorisation); None: that of `splits`,
      else the config's dataset.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      test=None,
      classifier: Optional[classifier_lib.Classifier] = None,
      splits=None,
      train_split=None,
  ):
    self.config = config
    self.names = tuple(config.eval_metrics)
    self.num_classes = int(config.model.num_classes)
    self.samples_per_label = int(config.eval_samples_per_label)
    self.key = jax.random.key(int(config.eval_noise_seed))
    need = check_config(config)
    data = config.data
    self.classifier = None
    if need.classifier:
      self.classifier = classifier or classifier_lib.load_or_train(
          data.dataset, data.data_dir, splits=splits
      )
    self.test = None
    if need.real:
      if test is None:
        test = reader.load_split(data.dataset, "test", data.data_dir)
      images, labels = np.asarray(test[0]), np.asarray(test[1])
      counts = np.bincount(labels.astype(np.int64), minlength=self.num_classes)
      usable = min(int(counts.min()), self.samples_per_label)
      if usable < need.min_samples:
        raise distances.TooFewSamplesError(
            f"config.eval_metrics {self.names} need at least "
            f"{need.min_samples} test images per class; the test split's "
            f"smallest class has {int(counts.min())} (label "
            f"{int(counts.argmin())})"
        )
      self.test = (images, labels)
    self.train = None
    if need.train_features:
      if train_split is None and splits is not None:
        train_split = splits[0]
      if train_split is None:
        train_split = reader.load_split(data.dataset, "train", data.data_dir)
      self.train = train_split
    self.store = scoring.FeatureStore(data.dataset, "test")
    self.train_store = scoring.FeatureStore(data.dataset, "train")

  def _samples(self, model, variables, per_label: int):
    labels = np.repeat(np.arange(self.num_classes, dtype=np.int32), per_label)
    images = sampling.generate(
        model,
        variables,
        labels,
        self.key,
        clip=bool(self.config.model.clip_prior),
    )
    return images, labels

  def __call__(self, model, variables, step: int) -> Dict[str, Any]:
    del step  # the noise is fixed: every point is scored on the same draws
    if not self.names or self.samples_per_label == 0:
      return {}
    images, labels = self._samples(model, variables, self.samples_per_label)
    report = scoring.score(
        self.names,
        images,
        labels,
        self.test,
        labels=list(range(self.num_classes)),
        max_per_class=self.samples_per_label,
        classifier=self.classifier,
        train=self.train,
        store=self.store,
        train_store=self.train_store,
        num_classes=self.num_classes,
    )
    return report.scalars()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    dataset: Optional[Any] = None,
    time_limit_seconds: Optional[float] = None,
    classifier: Optional[classifier_lib.Classifier] = None,
):
  """`cign_jax.train.train_and_evaluate` with the config's in-loop
  evaluation (what `python -m cign_jax.main` runs).

  Args:
    config: the run's config.
    workdir: the run directory.
    dataset: as `cign_jax.train.train_and_evaluate` takes it; its test split
      (when given) also gives the metrics their real images.
    time_limit_seconds: stop cleanly after this long (resumable).
    classifier: the label-accuracy classifier (default: the cached one).

  Returns:
    The final TrainState.
  """
  config = config_lib.validate(config)
  check_config(config)
  evaluator = None
  if config_lib.needs_evaluator(config):
    splits = test = train_split = None
    eval_config = config
    if dataset is not None or source_kind(config.data.dataset) is not None:
      # The data as the training reads them; their shape and classes fill
      # the config's unset fields for the evaluator as the training will.
      data = reader.load_training_data(config, dataset, with_test=True)
      train_split, test = data.train, data.test
      if test is not None:
        splits = (train_split, test)
      eval_config = config_lib.fit_to_data(
          config, train_split[0].shape[1:], data.num_classes, data.class_names
      )
    evaluator = InLoopEvaluator(
        eval_config, test, classifier, splits, train_split
    )
  # A sweep's members share the evaluator: what it computes is not swept.
  run = (
      sweep_training.train_and_evaluate
      if config_lib.is_sweep(config)
      else train.train_and_evaluate
  )
  return run(
      config,
      workdir,
      dataset,
      evaluator=evaluator,
      time_limit_seconds=time_limit_seconds,
  )
