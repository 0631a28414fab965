"""Scoring generated samples with the registry's metrics, per class.

`score(names, gen_images, gen_labels, real=...)` is what in-loop
evaluation, `python -m cign_jax.evaluate` and the Table 3 script call:

1. For each label scored, n = min(#generated, #real, `max_per_class`)
   (the paper's FID protocol: the first n of each; #real is left out when
   no metric reads real images). A class with fewer samples than a metric
   needs is a `TooFewSamplesError` naming the metric, before any work.
2. What the metrics need, once for all of them (`registry.Needs`): the
   label classifier's predictions of every generated image; the Inception
   features of the first n generated and real images of every class, for
   the union of the taps asked for, in one pass up to the deepest (real
   features are cached on disk, keyed by a hash of the pixels, and in
   memory by the `FeatureStore`, which in-loop evaluation keeps between
   its points); the training images' features when a metric reads them.
3. Each metric's `compute(data, names)` for each class, with a `ClassData`
   that also shares inner products and distances between the class's
   feature sets among the metrics (one class's at a time in memory).
4. Per name: the number for all classes (the mean, or the metric's
   `summarise`), min, max and the per-class values (`Report`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from cign_jax import utils
from cign_jax.evaluation import distances
from cign_jax.evaluation import fid
from cign_jax.evaluation import inception
from cign_jax.evaluation import registry


def reference_features_dir() -> pathlib.Path:
  """Where real images' Inception features are cached."""
  return inception.fid_cache_dir() / "reference_features"


def _features_path(
    cache: pathlib.Path,
    dataset: str,
    split: str,
    label,
    size: int,
    count: int,
    digest: str,
) -> pathlib.Path:
  safe = fid._safe  # pylint: disable=protected-access
  return cache / (
      f"{safe(dataset)}_{safe(split)}_label{safe(label)}_f{size}"
      f"_n{count}_{digest}.npy"
  )


def _load(path: pathlib.Path) -> Optional[np.ndarray]:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError):
    return None


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  with utils.atomic_write(path) as f:
    np.save(f, array)


class FeatureStore:
  """Inception features of fixed real images (a split's), per class and
  tap, kept in memory and on disk; generated images' features are computed
  afresh by `extract`.

  Args:
    dataset, split: name the images in the disk cache.
    use_cache: read and write the disk cache (`cache_dir`, default
      `reference_features_dir()`).
    batch_size, progress: of the Inception passes.
  """

  def __init__(
      self,
      dataset: str = "mnist",
      split: str = "test",
      *,
      use_cache: bool = True,
      cache_dir=None,
      batch_size: Optional[int] = None,
      progress: bool = False,
  ):
    self.dataset = dataset
    self.split = split
    self.use_cache = use_cache
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
    self.batch_size = batch_size
    self.progress = progress
    self._memory: Dict[Tuple[Any, int, int, str], np.ndarray] = {}

  def extract(
      self, images, sizes: Sequence[int], desc: str
  ) -> Dict[int, np.ndarray]:
    """{size: features} of `images`, one Inception pass up to the deepest
    of `sizes` (through `fid.extract_features`)."""
    return fid.extract_features(
        images,
        tuple(sizes),
        batch_size=self.batch_size,
        progress=self.progress,
        desc=desc,
    )

  def real(
      self,
      per_label: Dict[Any, np.ndarray],
      sizes: Sequence[int],
      desc: str = "real features",
  ) -> Dict[Any, Dict[int, np.ndarray]]:
    """{label: {size: features}} of the images given per label; whatever is
    not in memory or on disk is extracted in one pass over those labels'
    images (in label order)."""
    cache = self.cache_dir or reference_features_dir()
    out: Dict[Any, Dict[int, np.ndarray]] = {}
    missing = []
    for label, images in per_label.items():
      pixels = fid.quantize(images)
      digest = fid._pixels_hash(pixels)  # pylint: disable=protected-access
      out[label] = {}
      for size in sizes:
        key = (label, size, len(pixels), digest)
        feats = self._memory.get(key)
        path = _features_path(
            cache, self.dataset, self.split, label, size, len(pixels), digest
        )
        if feats is None and self.use_cache:
          feats = _load(path)
          if feats is not None and feats.shape != (len(pixels), size):
            feats = None
        if feats is None:
          missing.append((label, size, key, path))
        else:
          self._memory[key] = out[label][size] = feats
    labels = [l for l in per_label if any(m[0] == l for m in missing)]
    if labels:
      pixels = np.concatenate([fid.quantize(per_label[l]) for l in labels])
      taps = sorted({m[1] for m in missing})
      feats = self.extract(pixels, taps, desc)
      start, offsets = 0, {}
      for label in labels:
        offsets[label] = (start, start + len(per_label[label]))
        start += len(per_label[label])
      for label, size, key, path in missing:
        lo, hi = offsets[label]
        value = np.ascontiguousarray(feats[size][lo:hi])
        self._memory[key] = out[label][size] = value
        if self.use_cache:
          _save(path, value)
    return out


_SIDES = {"fake": "generated", "real": "real", "train": "training"}


class ClassData:
  """What a metric's `compute` reads for one class.

  Attributes:
    label: the class.
    count: n, the samples of each side the feature metrics use.
    fake_images: every generated image of the class, [-1, 1].
    real_images: the first n real images of the class (None when no metric
      reads them).
    predicted: the classifier's labels for `fake_images` (when asked for).
  """

  def __init__(
      self,
      label,
      count: int,
      fake_images,
      real_images,
      predicted,
      features: Dict[str, Dict[int, np.ndarray]],
  ):
    self.label = label
    self.count = count
    self.fake_images = fake_images
    self.real_images = real_images
    self.predicted = predicted
    self._features = features
    self._checked: Dict[Tuple[str, int], np.ndarray] = {}
    self._inner: Dict[Tuple[str, str, int], np.ndarray] = {}
    self._distances: Dict[Tuple[str, str, int], np.ndarray] = {}

  def features(self, side: str, size: int) -> np.ndarray:
    """Features (float64, checked finite) of side 'fake', 'real' or
    'train' at an Inception tap the metric asked for."""
    key = (side, size)
    if key not in self._checked:
      try:
        raw = self._features[side][size]
      except KeyError:
        raise KeyError(
            f"class {self.label}: no {side} features at {size}; "
            "a metric reads only what its NEEDS asks for"
        ) from None
      self._checked[key] = distances.check_features(
          raw, f"{_SIDES.get(side, side)}, label {self.label} features"
      )
    return self._checked[key]

  def release(self) -> None:
    """Drops the float64 copies and shared matrices (kept per class only
    while its metrics run)."""
    self._checked.clear()
    self._inner.clear()
    self._distances.clear()

  def fake_features(self, size: int) -> np.ndarray:
    return self.features("fake", size)

  def real_features(self, size: int) -> np.ndarray:
    return self.features("real", size)

  def train_features(self, size: int) -> np.ndarray:
    return self.features("train", size)

  def inner(self, a: str, b: str, size: int) -> np.ndarray:
    """Inner products between the rows of sides a and b (shared)."""
    key = (a, b, size)
    if key not in self._inner:
      swapped = self._inner.get((b, a, size))
      self._inner[key] = (
          swapped.T
          if swapped is not None
          else distances.inner_products(
              self.features(a, size), self.features(b, size)
          )
      )
    return self._inner[key]

  def distances(self, a: str, b: str, size: int) -> np.ndarray:
    """Euclidean distances between the rows of sides a and b (shared)."""
    key = (a, b, size)
    if key not in self._distances:
      swapped = self._distances.get((b, a, size))
      if swapped is not None:
        self._distances[key] = swapped.T
      else:
        self._distances[key] = distances.distances_from_inner(
            self.inner(a, b, size),
            distances.squared_norms(self.features(a, size)),
            distances.squared_norms(self.features(b, size)),
        )
    return self._distances[key]


@dataclasses.dataclass
class Summary:
  """One name over classes: `value` (what stands for all: the mean unless
  the metric says otherwise), `min`, `max`, `per_class` {label: value}."""

  value: float
  min: float
  max: float
  per_class: Dict[Any, float]


@dataclasses.dataclass
class Report:
  """The result of `score`.

  Attributes:
    summaries: {name: Summary}, in the order asked for.
    counts: {label: n}, the samples per side of the feature metrics.
    generated: {label: number of generated images} (label accuracy's).
    predicted: the classifier's labels of all generated images (None when
      no metric asked for them), in the order given.
  """

  summaries: Dict[str, Summary]
  counts: Dict[Any, int]
  generated: Dict[Any, int]
  predicted: Optional[np.ndarray]

  def scalars(self) -> Dict[str, float]:
    """{name, name_min, name_max, name_<label>}: what in-loop evaluation
    records and writes to TensorBoard."""
    out: Dict[str, float] = {}
    for name, s in self.summaries.items():
      out[name] = s.value
      out[f"{name}_min"] = s.min
      out[f"{name}_max"] = s.max
      for label, v in s.per_class.items():
        out[f"{name}_{label}"] = v
    return out


def _per_label(images, labels, label, n=None):
  idx = np.flatnonzero(labels == label)
  return images[idx if n is None else idx[:n]]


def score(
    names: Sequence[str],
    gen_images,
    gen_labels,
    real=None,
    *,
    labels: Optional[Sequence] = None,
    max_per_class: int = 1000,
    classifier=None,
    train=None,
    store: Optional[FeatureStore] = None,
    train_store: Optional[FeatureStore] = None,
    num_classes: int = 10,
) -> Report:
  """The named metrics of generated samples, per class.

  Args:
    names: metric names (`registry.known_names()`).
    gen_images: generated images in [-1, 1], (N, H, W[, C]).
    gen_labels: their labels (N,).
    real: (images uint8 or [-1, 1], labels) of the real split (test); needed
      when a metric reads real images or features.
    labels: the labels to score (default: those among `gen_labels`).
    max_per_class: at most this many samples per class on each side.
    classifier: a `classifier.Classifier` (when a metric needs one).
    train: (images, labels) of the training split (when a metric reads its
      features).
    store, train_store: the `FeatureStore`s of the real and training images
      (default: new ones, with the disk cache).
    num_classes: labels run 0 .. num_classes - 1 (label accuracy's range).

  Returns:
    A `Report`.
  """
  names = list(names)
  groups = registry.group(names)
  need = registry.needs(names)
  gen_images = np.asarray(gen_images)
  gen_labels = np.asarray(gen_labels).reshape(-1)
  if len(gen_labels) != len(gen_images):
    raise ValueError(
        f"{len(gen_images)} generated images but " f"{len(gen_labels)} labels"
    )
  if labels is None:
    labels = sorted(np.unique(gen_labels).tolist())
  labels = list(labels)
  if not labels:
    raise ValueError("no labels to score")
  if need.real and real is None:
    raise ValueError(
        f"metrics {', '.join(names)} read real images: pass "
        "real=(images, labels)"
    )
  if need.train_features and train is None:
    raise ValueError(
        f"metrics {', '.join(names)} read training images: "
        "pass train=(images, labels)"
    )
  if need.classifier and classifier is None:
    raise ValueError(
        f"metrics {', '.join(names)} need the label "
        "classifier: pass classifier="
    )
  if max_per_class < 1:
    raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
  real_labels = None if real is None else np.asarray(real[1]).reshape(-1)

  counts, generated = {}, {}
  for label in labels:
    n_gen = int(np.sum(gen_labels == label))
    if n_gen == 0:
      raise ValueError(f"label {label}: no generated images")
    generated[label] = n_gen
    n = min(n_gen, int(max_per_class))
    if need.real:
      n_real = int(np.sum(real_labels == label))
      if n_real == 0:
        raise ValueError(f"label {label}: no real images")
      n = min(n, n_real)
    counts[label] = n
  for m, requested in groups.values():
    want = m.needs(requested).min_samples
    for label in labels:
      if counts[label] < want:
        raise distances.TooFewSamplesError(
            f"{', '.join(requested)}: label {label} has {counts[label]} "
            f"samples per side ({generated[label]} generated"
            + (
                f", {int(np.sum(real_labels == label))} real"
                if need.real
                else ""
            )
            + f", at most {max_per_class}); "
            f"{'it needs' if len(requested) == 1 else 'they need'} at least "
            f"{want}"
        )

  predicted = None
  if need.classifier:
    predicted = classifier.predict(gen_images)

  features: Dict[Any, Dict[str, Dict[int, np.ndarray]]] = {
      label: {} for label in labels
  }
  if need.features:
    store = store or FeatureStore()
    real_images = np.asarray(real[0])
    real_feats = store.real(
        {l: _per_label(real_images, real_labels, l, counts[l]) for l in labels},
        need.features,
    )
    sel = np.concatenate(
        [np.flatnonzero(gen_labels == l)[: counts[l]] for l in labels]
    )
    gen_feats = store.extract(
        gen_images[sel], need.features, "generated features"
    )
    start = 0
    for label in labels:
      n = counts[label]
      features[label]["fake"] = {
          s: gen_feats[s][start : start + n] for s in need.features
      }
      features[label]["real"] = real_feats[label]
      start += n
  if need.train_features:
    train_store = train_store or FeatureStore(split="train")
    train_images, train_labels = np.asarray(train[0]), np.asarray(
        train[1]
    ).reshape(-1)
    per = {}
    for label in labels:
      per[label] = _per_label(train_images, train_labels, label)
      if len(per[label]) == 0:
        raise ValueError(f"label {label}: no training images")
    train_feats = train_store.real(
        per, need.train_features, "training features"
    )
    for label in labels:
      features[label]["train"] = train_feats[label]

  values: Dict[str, Dict[Any, float]] = {name: {} for name in names}
  classes: Dict[Any, ClassData] = {}
  for label in labels:
    data = ClassData(
        label,
        counts[label],
        _per_label(gen_images, gen_labels, label),
        None
        if not need.real
        else _per_label(np.asarray(real[0]), real_labels, label, counts[label]),
        None if predicted is None else predicted[gen_labels == label],
        features[label],
    )
    for m, requested in groups.values():
      got = m.compute(data, requested)
      for name in requested:
        if name not in got:
          raise KeyError(
              f"metric module {m.module} returned no {name!r} "
              f"for label {label}"
          )
        values[name][label] = float(got[name])
    data.release()  # one class's matrices in memory at a time
    classes[label] = data

  summaries = {}
  for name in names:
    m = registry.metric(name)
    per_class = values[name]
    arr = np.array(list(per_class.values()), np.float64)
    value = (
        m.summarise(name, per_class, classes)
        if m.summarise
        else float(arr.mean())
    )
    summaries[name] = Summary(
        value=float(value),
        min=float(arr.min()),
        max=float(arr.max()),
        per_class=per_class,
    )
  return Report(
      summaries=summaries,
      counts=counts,
      generated=generated,
      predicted=predicted,
  )
