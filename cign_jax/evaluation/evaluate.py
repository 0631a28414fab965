"""Scoring a run or a set of samples: per-class FID and label accuracy.

`run` is what `python -m cign_jax.evaluate` does (the command's docstring,
`cign_jax/commands/evaluate.py`, has its usage): it generates or reads the
samples, scores them with `evaluate_samples` (per-class FID as the CIGN
paper's Table 3, through `cign_jax.evaluation.fid`, and label accuracy with
the library's classifier) and writes eval.json and confusion.png.
`generate_for_eval` draws the samples from a checkpoint of a run; they are
cached in DIR/eval_samples.npz, keyed on the checkpoint's step and weights
and on the settings. `format_table` prints the report like Table 3.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import jax
import numpy as np

from cign_jax import checkpoints
from cign_jax import models
from cign_jax import run_dir
from cign_jax import sampling
from cign_jax.data import reader
from cign_jax.evaluation import classifier
from cign_jax.evaluation import fid

def generate_for_eval(workdir: str, num_per_class: int, applications: int,
                      seed: int, checkpoint=None, loaded=None):
  """num_per_class samples of every label from a checkpoint of the run
  (`checkpoint`: 'best', 'latest' or a step; default the best when the run
  keeps one, else the latest), or from `loaded`, the result of
  `checkpoints.load_model`."""
  config, model, variables, step = loaded or checkpoints.load_model(
      workdir, checkpoint=checkpoint)
  if model.conditioning == "none":
    raise ValueError("per-class evaluation needs a conditional model; this "
                     "run is an unconditional IGN")
  if num_per_class < 2:
    raise ValueError(f"--num_per_class must be >= 2, got {num_per_class}")
  labels = np.repeat(np.arange(model.num_classes), num_per_class)
  images = sampling.generate(model, variables, labels, jax.random.key(seed),
                             applications=applications,
                             clip=config.model.clip_prior)
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
    logging.warning("%s is unreadable (%s: %s); generating the samples "
                    "again", path, type(e).__name__, e)
    return None


def evaluate_samples(images, labels, dataset: str = "mnist",
                     feature_sizes=None, progress: bool = True,
                     real=None, clf=None) -> Dict[str, Any]:
  """Per-class FID and label accuracy of samples in [-1, 1].

  `real`: (images uint8, labels) of the test split (default: the dataset's,
  through tensorflow-datasets); `clf`: the classifier (default: the cached
  one of `dataset`)."""
  images = models.check_images(images)
  labels = models.check_labels(labels, 10, images.shape[0])
  if real is None:
    real_images, real_labels = reader.load_split(dataset, "test")
  else:
    real_images, real_labels = real
  present = sorted(np.unique(labels).tolist())
  sizes = None if feature_sizes is None else [int(s) for s in feature_sizes]
  result = fid.per_class_fid(images, labels, real_images, real_labels,
                             feature_sizes=sizes, dataset=dataset,
                             split="test", labels=present, progress=progress)
  clf = clf or classifier.load_or_train(dataset)
  predicted = clf.predict(images)
  accuracy = classifier.label_accuracy(predicted, labels)
  return {
      "dataset": dataset,
      "num_samples": int(images.shape[0]),
      "fid": {str(s): {"mean": result.mean[s], "min": result.min[s],
                       "max": result.max[s],
                       "per_class": {str(k): v for k, v in
                                     result.per_class[s].items()}}
              for s in result.feature_sizes},
      "fid_counts": {str(k): int(v) for k, v in result.counts.items()},
      "fid_notes": list(result.notes),
      "label_accuracy": accuracy,
      "classifier_test_accuracy": clf.test_accuracy,
  }


def format_table(report: Dict[str, Any]) -> str:
  """The paper's Table 3 layout (mean / min / max per feature size) plus
  label accuracy."""
  lines = []
  if "step" in report:
    lines += [f"checkpoint: step {report['step']}"
              + (f" ({report['checkpoint']})" if report.get("checkpoint")
                 else ""), ""]
  lines += ["| metric | mean | min | max |", "|---|---|---|---|"]
  for size, r in report["fid"].items():
    lines.append(f"| FID{size} | {r['mean']:.4f} | {r['min']:.4f} | "
                 f"{r['max']:.4f} |")
  acc = report["label_accuracy"]
  per = [a for a in acc["per_label"] if a is not None]
  lines.append(f"| label accuracy | {acc['accuracy']:.4f} | "
               f"{min(per):.4f} | {max(per):.4f} |")
  counts = sorted(set(report["fid_counts"].values()))
  lines.append("")
  lines.append(f"samples per class in FID: {', '.join(map(str, counts))}; "
               f"classifier test accuracy "
               f"{report['classifier_test_accuracy']:.4f}")
  lines.extend(f"note: {n}" for n in report["fid_notes"])
  return "\n".join(lines)


def run(workdir: Optional[str] = None, samples: Optional[str] = None,
        out: Optional[str] = None, dataset: Optional[str] = None,
        num_per_class: int = 1000, applications: int = 1, seed: int = 0,
        feature_sizes=None, checkpoint=None) -> Dict[str, Any]:
  """What `python -m cign_jax.evaluate` does; returns the report written to
  eval.json (with `step` and `checkpoint`, the reason it was chosen, when
  scoring a run: `checkpoint` is 'best', 'latest' or a step, default the
  best when the run keeps one)."""
  if (workdir is None) == (samples is None):
    raise ValueError("give exactly one of --workdir and --samples")
  meta: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d")}
  if samples is not None:
    if not os.path.isfile(samples):
      raise FileNotFoundError(f"--samples file not found: {samples}")
    arrays = sampling.open_npz(samples, "--samples")
    for key in ("images", "labels"):
      if key not in arrays:
        raise ValueError(f"{samples} has no '{key}' array (found: "
                         f"{', '.join(arrays) or 'no arrays'})")
    images, labels = arrays["images"], arrays["labels"]
    out = out or os.path.dirname(os.path.abspath(samples))
    meta["samples"] = samples
    dataset = dataset or "mnist"
  else:
    chosen = checkpoints.resolve_checkpoint(workdir, checkpoint)
    loaded = checkpoints.load_model(workdir, checkpoint=checkpoint)
    step = loaded[3]
    meta["checkpoint"] = chosen.reason
    # The cache holds samples of one checkpoint (its step and the digest of
    # its weights) with one set of settings; anything else regenerates.
    key = json.dumps(dict(step=step, weights=run_dir.tree_digest(loaded[2]),
                          num_per_class=num_per_class,
                          applications=applications, seed=seed),
                     sort_keys=True)
    cache = os.path.join(workdir, "eval_samples.npz")
    cached = _read_cache(cache, key)
    images, labels = cached if cached is not None else (None, None)
    run_config = loaded[0]
    if images is None:
      images, labels, _, step = generate_for_eval(
          workdir, num_per_class, applications, seed, loaded=loaded)
      run_dir.atomic_savez(cache, images=images, labels=labels, step=step,
                           key=key)
    meta["step"] = step
    settings = dict(num_per_class=num_per_class, applications=applications,
                    seed=seed, step=step)
    out = out or workdir
    meta.update(workdir=workdir, **settings)
    dataset = dataset or run_config.data.dataset
  report = evaluate_samples(images, labels, dataset, feature_sizes)
  report.update(meta)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(report, f, indent=2)
  classifier.plot_confusion(np.asarray(report["label_accuracy"]["confusion"]),
                            os.path.join(out, "confusion.png"))
  return report
