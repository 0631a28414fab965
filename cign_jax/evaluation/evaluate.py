"""Scoring a run or a set of samples with the registry's metrics.

`run` is what `python -m cign_jax.evaluate` does (the command's docstring,
`cign_jax/commands/evaluate.py`, has its usage): it generates or reads the
samples, scores them with `evaluate_samples` (the metrics of
`cign_jax.evaluation.registry` through `cign_jax.evaluation.scoring`: by
default per-class FID as the CIGN paper's Table 3, label accuracy with the
library's classifier, and the diversity metrics) and writes eval.json and
confusion.png. `generate_for_eval` draws the samples from a checkpoint of a
run; they are cached in DIR/eval_samples.npz, keyed on the checkpoint's
step and weights and on the settings. `format_table` prints the report
like Table 3.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import numpy as np

from cign_jax import checkpoints
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling
from cign_jax import data as data_lib
from cign_jax.data import reader
from cign_jax.evaluation import classifier
from cign_jax.evaluation import fid
from cign_jax.evaluation import registry
from cign_jax.evaluation import scoring

# The paper's protocol: at most this many samples per class on each side.
MAX_PER_CLASS = 1000


def generate_for_eval(
    workdir: str,
    num_per_class: int,
    applications: int,
    seed: int,
    checkpoint=None,
    loaded=None,
):
  """num_per_class samples of every label from a checkpoint of the run
  (`checkpoint`: 'best', 'latest' or a step; default the best when the run
  keeps one, else the latest), or from `loaded`, the result of
  `checkpoints.load_model`. An unconditional model gives num_per_class
  samples, all labelled 0 (for the whole-set metrics)."""
  config, model, variables, step = loaded or checkpoints.load_model(
      workdir, checkpoint=checkpoint
  )
  if num_per_class < 2:
    raise ValueError(f"num_per_class must be >= 2, got {num_per_class}")
  k = 1 if model.conditioning == "none" else model.num_classes
  labels = np.repeat(np.arange(k), num_per_class)
  images = sampling.generate(
      model,
      variables,
      labels,
      jax.random.key(seed),
      applications=applications,
      clip=config.model.clip_prior,
  )
  return images, labels, config, step


def _read_cache(path: str, key: str):
  """(images, labels) from the sample cache when it was written for `key`;
  None when it is missing, for another key, or unreadable (a kill while an
  older version wrote it)."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if "key" not in f.files or str(f["key"]) != key:
        return None
      return f["images"], f["labels"]
  except Exception as e:  # pylint: disable=broad-except
    logging.warning(
        "%s is unreadable (%s: %s); generating the samples " "again",
        path,
        type(e).__name__,
        e,
    )
    return None


def default_metrics(
    feature_sizes=None,
    smallest: Optional[int] = None,
    label_accuracy: bool = True,
) -> Tuple[List[str], List[str]]:
  """(names, notes): per-class FID at `feature_sizes` (default 64, 192, 768,
  and 2048 when the smallest class, `smallest` samples, has at least 2048),
  label accuracy (unless `label_accuracy` is False: whole-set scoring), and
  the diversity metrics (`registry.DIVERSITY`)."""
  notes = []
  if feature_sizes is None:
    sizes = [64, 192, 768]
    if smallest is not None and smallest >= 2048:
      sizes.append(2048)
    else:
      notes.append(
          f"FID2048 skipped: the smallest class has {smallest} "
          "samples per side, fewer than 2048 features (pass "
          "feature sizes with 2048 to require it)"
      )
  else:
    sizes = sorted(set(int(s) for s in feature_sizes))
    bad = [s for s in sizes if s not in fid.FEATURE_SIZES]
    if bad or not sizes:
      raise ValueError(
          f"feature sizes must be among {fid.FEATURE_SIZES}, "
          f"got {tuple(feature_sizes)}"
      )
  accuracy = ["label_accuracy"] if label_accuracy else []
  return (
      [f"fid{s}" for s in sizes] + accuracy + list(registry.DIVERSITY)
  ), notes


def evaluate_samples(
    images,
    labels,
    dataset: str = "mnist",
    feature_sizes=None,
    progress: bool = True,
    real=None,
    clf=None,
    metrics=None,
    train=None,
    whole_set: bool = False,
) -> Dict[str, Any]:
  """The registry's metrics of samples in [-1, 1], per class (or over the
  whole set).

  Args:
    images, labels: the samples and the labels they were drawn for.
    dataset: the dataset of the real images (and the classifier).
    feature_sizes: FID's Inception taps in the default list (see
      `default_metrics`); ignored when `metrics` is given.
    progress: progress bars for the Inception passes.
    real: (images uint8, labels) of the test split (default: the dataset's,
      through tensorflow-datasets).
    clf: the classifier (default: the cached one of `dataset`).
    metrics: metric names (default: `default_metrics`).
    train: (images uint8, labels) of the training split, for metrics that
      read it (default: the dataset's, loaded only then).
    whole_set: score all samples against all real images as one class (an
      unconditional model; the IGN paper's CelebA FID): every label is
      taken as 0, and label accuracy is not in the default metrics.

  Returns:
    The report written to eval.json: `metrics` {name: {mean, min, max,
    per_class, better, title}} in the order computed ('mean' is the number
    for all classes: for label accuracy, over all samples); `counts`
    {label: samples per side}; and in the layout of earlier versions
    `fid` {size: {mean, min, max, per_class}}, `fid_counts`, `fid_notes`,
    `label_accuracy` {accuracy, per_label, confusion, num_samples} and
    `classifier_test_accuracy` (when label accuracy was computed).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(
        f"wrong image shape {images.shape}: expected (N, H, W) or "
        "(N, H, W, C)"
    )
  images = models.check_images(
      images, images.shape[-1], image_size=images.shape[1]
  )
  if real is None:
    real = reader.load_split(dataset, "test")
  if whole_set:
    labels = np.zeros((len(images),), np.int32)
    real = (real[0], np.zeros((len(real[0]),), np.int32))
    if train is not None:
      train = (train[0], np.zeros((len(train[0]),), np.int32))
  real_labels = np.asarray(real[1])
  if dataset in data_lib.DATASETS:
    num_classes = data_lib.NUM_CLASSES
  else:
    seen = [np.asarray(labels).reshape(-1), real_labels.reshape(-1)]
    num_classes = max(int(np.max(x)) for x in seen if x.size) + 1
  labels = models.check_labels(labels, num_classes, images.shape[0])
  present = sorted(np.unique(labels).tolist())
  notes: List[str] = []
  if metrics is None:
    smallest = min(
        min(
            int(np.sum(labels == c)),
            int(np.sum(real_labels == c)),
            MAX_PER_CLASS,
        )
        for c in present
    )
    names, notes = default_metrics(
        feature_sizes, smallest, label_accuracy=not whole_set
    )
  else:
    names = [str(n) for n in metrics]
  need = registry.needs(names)
  if need.train_features and train is None:
    train = reader.load_split(dataset, "train")
  if need.classifier and clf is None:
    splits = None
    if dataset not in data_lib.DATASETS:
      if train is None:
        train = reader.load_split(dataset, "train")
      splits = (train, real)
    clf = classifier.load_or_train(dataset, splits=splits)
  result = scoring.score(
      names,
      images,
      labels,
      real,
      labels=present,
      max_per_class=MAX_PER_CLASS,
      classifier=clf,
      train=train,
      store=scoring.FeatureStore(dataset, "test", progress=progress),
      train_store=scoring.FeatureStore(dataset, "train", progress=progress),
      num_classes=num_classes,
  )
  report: Dict[str, Any] = {
      "dataset": dataset,
      "num_samples": int(images.shape[0]),
      "metrics": {
          name: {
              "mean": s.value,
              "min": s.min,
              "max": s.max,
              "per_class": {str(k): v for k, v in s.per_class.items()},
              "better": registry.direction(name),
              "title": registry.title(name),
          }
          for name, s in result.summaries.items()
      },
      "counts": {str(k): int(v) for k, v in result.counts.items()},
  }
  fid_names = [n for n in names if registry.metric(n).module == "fid"]
  if fid_names:
    report["fid"] = {
        n[len("fid") :]: {
            k: report["metrics"][n][k]
            for k in ("mean", "min", "max", "per_class")
        }
        for n in fid_names
    }
    report["fid_counts"] = dict(report["counts"])
    report["fid_notes"] = notes
  if result.predicted is not None:
    report["label_accuracy"] = classifier.label_accuracy(
        result.predicted, labels, num_classes
    )
    report["classifier_test_accuracy"] = clf.test_accuracy
  report["notes"] = notes
  return report


def _number(value: float) -> str:
  if value == 0 or abs(value) >= 1e-3:
    return f"{value:.4f}"
  return f"{value:.2e}"


def format_table(report: Dict[str, Any]) -> str:
  """The paper's Table 3 layout (mean / min / max over classes) for every
  metric of the report, with which way each is better."""
  lines = []
  if "step" in report:
    lines += [
        f"checkpoint: step {report['step']}"
        + (f" ({report['checkpoint']})" if report.get("checkpoint") else ""),
        "",
    ]
  lines += ["| metric | mean | min | max | better |", "|---|---|---|---|---|"]
  for r in report["metrics"].values():
    lines.append(
        f"| {r['title']} | {_number(r['mean'])} | "
        f"{_number(r['min'])} | {_number(r['max'])} | "
        f"{r['better'] or 'neither'} |"
    )
  counts = sorted(set(report["counts"].values()))
  lines.append("")
  line = f"samples per class (each side): {', '.join(map(str, counts))}"
  if report.get("classifier_test_accuracy") is not None:
    line += (
        f"; classifier test accuracy "
        f"{report['classifier_test_accuracy']:.4f}"
    )
  lines.append(line)
  lines.extend(f"note: {n}" for n in report.get("notes", []))
  return "\n".join(lines)


def run(
    workdir: Optional[str] = None,
    samples: Optional[str] = None,
    out: Optional[str] = None,
    dataset: Optional[str] = None,
    num_per_class: int = 1000,
    applications: int = 1,
    seed: int = 0,
    feature_sizes=None,
    checkpoint=None,
    metrics=None,
) -> Dict[str, Any]:
  """What `python -m cign_jax.evaluate` does; returns the report written to
  eval.json (with `step` and `checkpoint`, the reason it was chosen, when
  scoring a run: `checkpoint` is 'best', 'latest' or a step, default the
  best when the run keeps one). `metrics`: names of the registry (default:
  `default_metrics(feature_sizes)`); unknown names fail before any
  sample is generated."""
  if metrics is not None:
    metrics = [str(m) for m in metrics]
    registry.needs(metrics)
  if (workdir is None) == (samples is None):
    raise ValueError(
        "give exactly one of workdir (a run to sample) and "
        "samples (an .npz to score)"
    )
  meta: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d")}
  real = train = None
  whole_set = False
  if samples is not None:
    arrays = sampling.open_npz(samples, "the samples file")
    for key in ("images", "labels"):
      if key not in arrays:
        raise ValueError(
            f"the samples file {samples} has no '{key}' array "
            f"(found: {', '.join(arrays) or 'no arrays'})"
        )
    images, labels = arrays["images"], arrays["labels"]
    out = out or os.path.dirname(os.path.abspath(samples))
    meta["samples"] = samples
    dataset = dataset or "mnist"
  else:
    chosen, loaded = checkpoints.load_chosen_model(workdir, checkpoint)
    step = loaded[3]
    meta["checkpoint"] = chosen.reason
    # The cache holds samples of one checkpoint (its step and the digest of
    # its weights) with one set of settings; anything else regenerates.
    key = json.dumps(
        dict(
            step=step,
            weights=run_dir.tree_digest(loaded[2]),
            num_per_class=num_per_class,
            applications=applications,
            seed=seed,
        ),
        sort_keys=True,
    )
    cache = os.path.join(workdir, "eval_samples.npz")
    cached = _read_cache(cache, key)
    images, labels = cached if cached is not None else (None, None)
    run_config = loaded[0]
    if images is None:
      images, labels, _, step = generate_for_eval(
          workdir, num_per_class, applications, seed, loaded=loaded
      )
      run_dir.atomic_savez(
          cache, images=images, labels=labels, step=step, key=key
      )
    meta["step"] = step
    settings = dict(
        num_per_class=num_per_class,
        applications=applications,
        seed=seed,
        step=step,
    )
    out = out or workdir
    meta.update(workdir=workdir, **settings)
    dataset = dataset or run_config.data.dataset
    whole_set = loaded[1].conditioning == "none"
    if data_lib.source_kind(dataset) is not None:
      # The run's own reading of its data (size, channels, keys).
      splits = reader.load_training_data(run_config, with_test=True)
      if splits.test is None:
        raise ValueError(
            f"{dataset} has no test split to score the samples against"
        )
      real, train = splits.test, splits.train
  named = {} if metrics is None else {"metrics": metrics}
  # Only what differs from evaluate_samples' defaults.
  for key, value in (("real", real), ("train", train)):
    if value is not None:
      named[key] = value
  if whole_set:
    named["whole_set"] = True
  report = evaluate_samples(images, labels, dataset, feature_sizes, **named)
  report.update(meta)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(report, f, indent=2)
  if "label_accuracy" in report:
    classifier.plot_confusion(
        np.asarray(report["label_accuracy"]["confusion"]),
        os.path.join(out, "confusion.png"),
    )
  return report
