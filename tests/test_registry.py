"""The metrics registry and scoring: names and directions, what is shared,
FID and label accuracy giving the numbers they gave before they moved onto
the registry, a metric added as one module, in-loop evaluation (its
numbers, TensorBoard, the best checkpoint by a new metric) and the errors.

No Inception weights: a stand-in extractor (a fixed random projection of
the 8-bit pixels) replaces `fid.extract_features`, and a stand-in
classifier the library's, as in tests/test_fid.py.
"""

import json
import os
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import sampling
from cign_jax import train_step as train_step_lib
from cign_jax import validation
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import distances
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import fid
from cign_jax.evaluation import in_loop
from cign_jax.evaluation import metrics as metrics_package
from cign_jax.evaluation import registry
from cign_jax.evaluation import scoring
from cign_jax.evaluation.metrics import kid
from cign_jax.evaluation.metrics import prdc
from cign_jax.evaluation.metrics import spread
from conftest import tiny_config
import synthetic  # tests/synthetic.py


class FakeFeatures:
  """Deterministic features of the 8-bit pixels at every tap (a random
  projection and tanh); records each call's image count and taps."""

  def __init__(self):
    rng = np.random.default_rng(123)
    self.proj = rng.normal(size=(28 * 28, 2048)).astype(np.float32) / 28
    self.calls = []

  def __call__(self, images, feature_sizes=(2048,), **kwargs):
    del kwargs
    pixels = fid.quantize(images).reshape(len(images), -1)
    self.calls.append((len(images), tuple(sorted(feature_sizes))))
    feats = np.tanh((pixels.astype(np.float32) / 127.5 - 1) @ self.proj)
    return {int(s): feats[:, :s] for s in feature_sizes}


class FakeClassifier:
  """A deterministic labeller (not a good one): the mean pixel, binned."""

  test_accuracy = 0.5

  def predict(self, images):
    images = np.asarray(images, np.float32)
    return (np.floor((images.mean(axis=(1, 2, 3)) + 1) * 57) % 10).astype(
        np.int32
    )


@pytest.fixture
def fake(monkeypatch, tmp_path):
  """The stand-in extractor, and a fresh cache directory for features."""
  monkeypatch.setenv("CIGN_JAX_CACHE", str(tmp_path / "cache"))
  extractor = FakeFeatures()
  monkeypatch.setattr(fid, "extract_features", extractor)
  return extractor


@pytest.fixture(scope="module")
def samples():
  """Generated-like and real images of 3 labels (80 and 70 each, in
  [-1, 1] and uint8), shuffled: tests/synthetic.py's bars."""
  gen_u8, _ = synthetic.dataset(num_examples=240, seed=5)
  real_u8, _ = synthetic.dataset(num_examples=210, seed=6)
  gen_labels = np.arange(240) % 3
  real_labels = np.arange(210) % 3
  gen = gen_u8.astype(np.float32) / 127.5 - 1
  return gen, gen_labels, real_u8, real_labels


# --- Names, directions, needs ------------------------------------------------


def test_names_and_directions():
  names = registry.known_names()
  for name in (
      "fid64",
      "fid192",
      "fid768",
      "fid2048",
      "label_accuracy",
      "precision",
      "recall",
      "density",
      "coverage",
      "kid",
      "kid_std",
      "spread",
      "duplicates",
      "memorisation_ratio",
      "memorised",
  ):
    assert name in names
  assert registry.direction("fid64") == registry.LOWER
  assert registry.direction("recall") == registry.HIGHER
  assert registry.direction("spread") is None
  # The core ranks checkpoints by what the modules declare.
  assert validation.is_better("kid", 0.1, 0.2)
  assert validation.is_better("coverage", 0.9, 0.8)
  assert validation.is_better("fid192", 1.0, 2.0)
  assert registry.title("precision") == f"precision (k={prdc.PR_K})"


def test_needs_are_the_union():
  need = registry.needs(["fid64", "fid192", "precision", "label_accuracy"])
  assert need.features == (64, 192, 2048)
  assert need.real and need.classifier and need.train_features == ()
  assert need.min_samples == 192  # FID192's covariance
  assert registry.needs(["precision", "recall"]).min_samples == prdc.PR_K + 1
  assert registry.needs(["coverage"]).min_samples == prdc.DC_K + 1
  assert registry.needs(["memorised"]).train_features == (2048,)
  assert not registry.needs(["label_accuracy"]).real


def test_unknown_and_repeated_names():
  with pytest.raises(
      registry.UnknownMetricError,
      match=r"unknown metric 'recal'; known: .*recall",
  ):
    registry.needs(["recal"])
  with pytest.raises(ValueError, match="'kid' is listed twice"):
    registry.group(["kid", "kid"])
  with pytest.raises(
      distances.TooFewSamplesError,
      match="fid192 needs at least 192 samples per class; "
      "config.eval_samples_per_label is 100",
  ):
    registry.check_samples(
        ["label_accuracy", "fid192"], 100, "config.eval_samples_per_label"
    )


# --- FID and label accuracy: the numbers of before the move -----------------


def test_fid_and_label_accuracy_unchanged(fake, samples, tmp_path):
  gen, gen_labels, real, real_labels = samples
  clf = FakeClassifier()
  report = scoring.score(
      ["fid64", "label_accuracy"],
      gen,
      gen_labels,
      (real, real_labels),
      classifier=clf,
      store=scoring.FeatureStore(cache_dir=tmp_path / "r"),
  )
  # The functions the library scored with before the registry.
  before = fid.per_class_fid(
      gen,
      gen_labels,
      real,
      real_labels,
      feature_sizes=(64,),
      cache_dir=tmp_path / "s",
      progress=False,
  )
  acc = classifier_lib.label_accuracy(clf.predict(gen), gen_labels)
  assert report.summaries["fid64"].per_class == before.per_class[64]
  assert report.summaries["fid64"].value == before.mean[64]
  assert report.summaries["fid64"].min == before.min[64]
  assert report.summaries["fid64"].max == before.max[64]
  assert report.counts == before.counts == {0: 70, 1: 70, 2: 70}
  la = report.summaries["label_accuracy"]
  assert la.value == acc["accuracy"]
  assert [la.per_class[c] for c in range(3)] == acc["per_label"][:3]
  assert report.generated == {0: 80, 1: 80, 2: 80}  # every sample counted


def test_features_computed_once_and_shared(
    fake, samples, tmp_path, monkeypatch
):
  gen, gen_labels, real, real_labels = samples
  products = []
  inner = distances.inner_products

  def counted(a, b):
    products.append((len(a), len(b)))
    return inner(a, b)

  monkeypatch.setattr(distances, "inner_products", counted)
  store = scoring.FeatureStore(cache_dir=tmp_path)
  names = [
      "fid64",
      "precision",
      "recall",
      "density",
      "coverage",
      "kid",
      "spread",
      "duplicates",
  ]
  report = scoring.score(
      names, gen, gen_labels, (real, real_labels), store=store
  )
  # One pass over the real images and one over the generated, at the union
  # of the taps; per class three matrices of inner products (generated,
  # real, across) serve all the nearest-neighbour metrics and KID.
  assert fake.calls == [(210, (64, 2048)), (210, (64, 2048))]
  assert len(products) == 3 * 3
  # The shared matrices give what each metric gives on its own.
  c = 1
  real_c = fake(real[real_labels == c], (2048,))[2048]
  gen_c = fake(gen[gen_labels == c][:70], (2048,))[2048]
  alone = prdc.precision_recall_density_coverage(real_c, gen_c, prdc.PR_K)
  assert report.summaries["recall"].per_class[c] == pytest.approx(
      alone["recall"], abs=1e-12
  )
  alone = prdc.precision_recall_density_coverage(real_c, gen_c, prdc.DC_K)
  assert report.summaries["coverage"].per_class[c] == pytest.approx(
      alone["coverage"], abs=1e-12
  )
  assert report.summaries["kid"].per_class[c] == pytest.approx(
      kid.kernel_inception_distance(real_c, gen_c)[0], rel=1e-9
  )
  assert report.summaries["spread"].per_class[c] == pytest.approx(
      spread.within_class_spread(real_c, gen_c), rel=1e-9
  )
  # Again with the same store: the real features come from memory, and a
  # new store reads them from the disk cache.
  fake.calls.clear()
  scoring.score(names, gen, gen_labels, (real, real_labels), store=store)
  scoring.score(
      names,
      gen,
      gen_labels,
      (real, real_labels),
      store=scoring.FeatureStore(cache_dir=tmp_path),
  )
  assert fake.calls == [(210, (64, 2048)), (210, (64, 2048))]
  values = report.summaries["precision"]
  assert values.value == pytest.approx(np.mean(list(values.per_class.values())))
  assert report.scalars()["precision_2"] == values.per_class[2]


def test_memorisation_reads_the_training_split(fake, samples, tmp_path):
  """Generated images that are training images are all memorised; the
  training features are extracted once (one pass over the classes scored)
  and cached like the real ones."""
  gen, gen_labels, real, real_labels = samples
  train_u8, _ = synthetic.dataset(num_examples=300, seed=7)
  train_labels = np.arange(300) % 3
  copies = train_u8[:90].astype(np.float32) / 127.5 - 1
  names = ["memorisation_ratio", "memorised"]
  stores = dict(
      store=scoring.FeatureStore(cache_dir=tmp_path),
      train_store=scoring.FeatureStore(split="train", cache_dir=tmp_path),
  )
  report = scoring.score(
      names,
      copies,
      train_labels[:90],
      (real, real_labels),
      train=(train_u8, train_labels),
      **stores,
  )
  assert report.summaries["memorised"].per_class == {0: 1.0, 1: 1.0, 2: 1.0}
  assert report.summaries["memorisation_ratio"].max < 1e-5  # rounding
  assert (300, (2048,)) in fake.calls  # the training images, once
  fresh = scoring.score(
      names,
      gen,
      gen_labels,
      (real, real_labels),
      train=(train_u8, train_labels),
      **stores,
  )
  assert fresh.summaries["memorised"].max < 0.2
  assert 0.5 < fresh.summaries["memorisation_ratio"].value < 2.0
  assert [c for c in fake.calls if c[0] == 300] == [(300, (2048,))]
  with pytest.raises(ValueError, match="pass train="):
    scoring.score(names, gen, gen_labels, (real, real_labels))


# --- A metric is one module --------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _design_example():
  """The metric module docs/design.md shows ("Adding a metric is ...")."""
  with open(os.path.join(ROOT, "docs", "design.md")) as f:
    text = f.read()
  after = text[text.index("Adding a metric is") :]
  block = after[after.index("```python\n") + len("```python\n") :]
  return block[: block.index("```")]


@pytest.fixture
def extra_metric(tmp_path, monkeypatch):
  """docs/design.md's example, as a file in a folder of the metrics
  package's path; the registry is read again with it and after it."""
  folder = tmp_path / "more_metrics"
  folder.mkdir()
  (folder / "centre_distance.py").write_text(_design_example())
  monkeypatch.setattr(
      metrics_package,
      "__path__",
      list(metrics_package.__path__) + [str(folder)],
  )
  registry._discover.cache_clear()  # pylint: disable=protected-access
  yield
  sys.modules.pop("cign_jax.evaluation.metrics.centre_distance", None)
  monkeypatch.undo()
  registry._discover.cache_clear()  # pylint: disable=protected-access


def test_a_metric_is_one_module_and_a_name(
    fake, samples, tmp_path, extra_metric
):
  gen, gen_labels, real, real_labels = samples
  assert registry.direction("centre_distance") == registry.LOWER
  report = scoring.score(
      ["centre_distance", "kid"],
      gen,
      gen_labels,
      (real, real_labels),
      store=scoring.FeatureStore(cache_dir=tmp_path),
  )
  feats = fake(real[real_labels == 0], (2048,))[2048]
  g = fake(gen[gen_labels == 0][:70], (2048,))[2048]
  want = np.linalg.norm(g - feats.mean(axis=0), axis=1).mean()
  assert report.summaries["centre_distance"].per_class[0] == pytest.approx(
      want, rel=1e-6
  )
  config = tiny_config(
      eval_samples_per_label=10,
      eval_metrics=("centre_distance",),
      best_metric="centre_distance",
  )
  config_lib.validate(config)
  in_loop.check_config(config)
  assert validation.lower_is_better("centre_distance")


# --- Bad input ---------------------------------------------------------------


def test_too_few_samples_of_a_class(fake, samples, tmp_path):
  gen, gen_labels, real, real_labels = samples
  keep = np.ones(len(gen), bool)
  keep[np.flatnonzero(gen_labels == 1)[4:]] = False  # 4 of label 1
  with pytest.raises(
      distances.TooFewSamplesError,
      match=r"coverage: label 1 has 4 samples per side \(4 "
      r"generated, 70 real, at most 1000\); it needs at least "
      r"6",
  ):
    scoring.score(
        ["coverage"],
        gen[keep],
        gen_labels[keep],
        (real, real_labels),
        store=scoring.FeatureStore(cache_dir=tmp_path),
    )
  assert fake.calls == []  # before any feature is computed
  with pytest.raises(ValueError, match="label 2: no real images"):
    scoring.score(
        ["kid"],
        gen,
        gen_labels,
        (real[real_labels != 2], real_labels[real_labels != 2]),
    )
  with pytest.raises(ValueError, match="pass real="):
    scoring.score(["kid"], gen, gen_labels)


def test_non_finite_features_are_named(samples, tmp_path, monkeypatch):
  gen, gen_labels, real, real_labels = samples
  base = FakeFeatures()

  def broken(images, feature_sizes=(2048,), **kwargs):
    out = base(images, feature_sizes, **kwargs)
    if kwargs.get("desc") == "generated features":
      out[2048][75, 3] = np.nan  # the 6th sample of label 1
    return out

  monkeypatch.setattr(fid, "extract_features", broken)
  with pytest.raises(
      distances.NonFiniteFeaturesError,
      match=r"generated, label 1 features: 1 of 70 feature " r"rows .*row 5",
  ):
    scoring.score(
        ["precision"],
        gen,
        gen_labels,
        (real, real_labels),
        store=scoring.FeatureStore(cache_dir=tmp_path),
    )


# --- In-loop evaluation -------------------------------------------------------


@pytest.fixture(scope="module")
def loop_data():
  """Training images (64) and a test split with 20 images per label."""
  return {
      "train": synthetic.dataset(seed=0),
      "test": synthetic.dataset(num_examples=200, seed=1),
  }


def test_in_loop_evaluator_numbers(fake, loop_data):
  config = tiny_config(
      eval_samples_per_label=12,
      eval_metrics=("label_accuracy", "precision", "kid"),
  )
  clf = FakeClassifier()
  evaluator = in_loop.InLoopEvaluator(config, loop_data["test"], clf)
  model = models.model_from_config(config)
  variables = train_step_lib.eval_variables(
      train_step_lib.create_train_state(config, model=model)
  )
  got = evaluator(model, variables, 2)
  labels = np.repeat(np.arange(10, dtype=np.int32), 12)
  images = sampling.generate(
      model, variables, labels, jax.random.key(config.eval_noise_seed)
  )
  acc = classifier_lib.label_accuracy(clf.predict(images), labels)
  assert got["label_accuracy"] == acc["accuracy"]
  assert got["label_accuracy_min"] == min(acc["per_label"])
  for c in range(10):
    assert got[f"label_accuracy_{c}"] == acc["per_label"][c]
  test_x, test_y = loop_data["test"]
  real_3 = fake(test_x[test_y == 3][:12], (2048,))[2048]
  gen_3 = fake(images[labels == 3], (2048,))[2048]
  want = prdc.precision_recall_density_coverage(real_3, gen_3, prdc.PR_K)
  assert got["precision_3"] == pytest.approx(want["precision"], abs=1e-12)
  assert {
      "precision",
      "precision_min",
      "precision_max",
      "kid",
      "kid_max",
  } <= set(got)


def test_in_loop_config_errors(loop_data):
  with pytest.raises(
      distances.TooFewSamplesError,
      match="coverage needs at least 6 samples per class; "
      "config.eval_samples_per_label is 5",
  ):
    in_loop.check_config(
        tiny_config(eval_samples_per_label=5, eval_metrics=("coverage",))
    )
  with pytest.raises(registry.UnknownMetricError, match="'fid100'"):
    in_loop.check_config(tiny_config(eval_metrics=("fid100",)))
  with pytest.raises(
      ValueError, match=r"best_metric: 'spread' ranks " r"nothing.*\['kid'\]"
  ):
    in_loop.check_config(
        tiny_config(
            eval_samples_per_label=10,
            eval_metrics=("spread", "kid"),
            best_metric="spread",
        )
    )
  with pytest.raises(
      distances.TooFewSamplesError,
      match="test images per class; the test split's " "smallest class has 5",
  ):
    in_loop.InLoopEvaluator(
        tiny_config(eval_samples_per_label=30, eval_metrics=("coverage",)),
        synthetic.dataset(num_examples=50, seed=1),
    )


def test_in_loop_metrics_reach_tensorboard_and_rank(fake, loop_data, tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(
      num_train_steps=4,
      eval_every_epochs=0,
      eval_every_steps=2,
      eval_samples_per_label=8,
      eval_metrics=("recall", "kid", "label_accuracy"),
      best_metric="kid",
  )
  in_loop.train_and_evaluate(
      config, workdir, loop_data, classifier=FakeClassifier()
  )
  with open(os.path.join(workdir, "evaluations.json")) as f:
    record = json.load(f)
  assert record["best_metric"] == "kid" and record["lower_is_better"]
  kids = {r["step"]: r["kid"] for r in record["history"]}
  assert sorted(kids) == [2, 4]
  assert record["best"]["step"] == min(kids, key=kids.get)
  acc = event_accumulator.EventAccumulator(
      workdir, size_guidance={event_accumulator.TENSORS: 0}
  )
  acc.Reload()
  tags = set(acc.Tags()["tensors"])
  for tag in (
      "eval/recall",
      "eval/recall_min",
      "eval/recall_9",
      "eval/kid",
      "eval/label_accuracy",
  ):
    assert tag in tags, tag
  assert [e.step for e in acc.Tensors("eval/recall")] == [2, 4]


# --- The evaluate command's report -------------------------------------------


def test_report_and_table(fake, samples, monkeypatch):
  gen, gen_labels, real, real_labels = samples
  report = evaluate.evaluate_samples(
      gen,
      gen_labels,
      feature_sizes=[64],
      progress=False,
      real=(real, real_labels),
      clf=FakeClassifier(),
  )
  names = list(report["metrics"])
  assert names == ["fid64", "label_accuracy"] + list(registry.DIVERSITY)
  assert report["fid"]["64"] == {
      k: report["metrics"]["fid64"][k]
      for k in ("mean", "min", "max", "per_class")
  }
  assert (
      report["label_accuracy"]["accuracy"]
      == report["metrics"]["label_accuracy"]["mean"]
  )
  assert report["metrics"]["recall"]["better"] == "higher"
  json.dumps(report)  # what eval.json holds
  table = evaluate.format_table(report)
  for row in (
      "| FID64 |",
      "| label accuracy |",
      "| recall (k=3) |",
      "| coverage (k=5) |",
      "| KID |",
      "| within-class spread |",
      "| near-duplicates |",
  ):
    assert row in table
  # Metrics named: only those, and no classifier needed.
  only = evaluate.evaluate_samples(
      gen,
      gen_labels,
      metrics=["duplicates"],
      progress=False,
      real=(real, real_labels),
  )
  assert list(only["metrics"]) == ["duplicates"]
  assert "label_accuracy" not in only and "fid" not in only
