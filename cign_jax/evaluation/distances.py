"""Euclidean distances between feature sets, and the errors of bad input.

The nearest-neighbour metrics (`cign_jax.evaluation.metrics`: precision and
recall, density and coverage, spread, near-duplicates, memorisation) and KID
work on feature sets (N, D). Here:

- `check_features`: 2-D, finite, the same dimension on both sides; named
  errors otherwise (`NonFiniteFeaturesError`, `TooFewSamplesError`).
- `inner_products` / `pairwise_distances`: float64, in row chunks, so that
  1000 x 1000 and 1000 x 60,000 pairs stay within a few tens of MiB at once;
  distances through |a|^2 + |b|^2 - 2 a.b (one matrix product per chunk,
  clipped at 0 against rounding).
- `nearest_distances`: each row's distance to its nearest row of another set
  (or of the same set, itself excluded), never holding the whole matrix.
- `kth_neighbour_distances`: the radius of each sample's k-nearest-neighbour
  ball within its own set, itself excluded (`NeighbourhoodSizeError` when k
  is not smaller than the set).
"""

from __future__ import annotations

import numpy as np

# Elements of one chunk of a distance matrix (float64): 32 MiB.
CHUNK_ELEMENTS = 1 << 22


class MetricInputError(ValueError):
  """Input a metric cannot be computed on (the message says what and why)."""


class NonFiniteFeaturesError(MetricInputError):
  """Features hold NaN or infinite values."""


class TooFewSamplesError(MetricInputError):
  """A set (a class) has fewer samples than the metric needs."""


class NeighbourhoodSizeError(MetricInputError):
  """k of a k-nearest-neighbour ball is not smaller than its set."""


def check_features(features, what: str, min_samples: int = 1) -> np.ndarray:
  """`features` as a float64 (N, D) array; a named error when they are not
  2-D, hold fewer than `min_samples` rows or any non-finite value."""
  f = np.asarray(features)
  if f.ndim != 2:
    raise MetricInputError(
        f"{what}: features must be (samples, dimensions), "
        f"got shape {f.shape}"
    )
  if not (
      np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)
  ):
    raise MetricInputError(
        f"{what}: features must be numbers, got dtype " f"{f.dtype}"
    )
  f = f.astype(np.float64, copy=False)
  if len(f) < min_samples:
    raise TooFewSamplesError(
        f"{what}: {len(f)} samples, this needs at least " f"{min_samples}"
    )
  bad = ~np.isfinite(f).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise NonFiniteFeaturesError(
        f"{what}: {len(rows)} of {len(f)} feature rows hold NaN or infinite "
        f"values (first: row {int(rows[0])}); the images they came from are "
        "likely non-finite too"
    )
  return f


def check_same_dimension(
    a: np.ndarray, b: np.ndarray, what_a: str, what_b: str
) -> None:
  if a.shape[1] != b.shape[1]:
    raise MetricInputError(
        f"{what_a} have {a.shape[1]} dimensions, {what_b} "
        f"{b.shape[1]}: they must come from the same "
        "feature layer"
    )


def check_k(k, sizes: dict) -> int:
  """k as an int; `NeighbourhoodSizeError` unless 1 <= k < every size in
  `sizes` ({set name: samples}): a sample's k-th neighbour is another
  sample of its set."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise NeighbourhoodSizeError(f"k must be a whole number, got {k!r}")
  k = int(k)
  if k < 1:
    raise NeighbourhoodSizeError(f"k must be >= 1, got {k}")
  for name, n in sizes.items():
    if k >= n:
      raise NeighbourhoodSizeError(
          f"k = {k} must be smaller than the {name} samples ({n}): each "
          f"sample's k-th nearest neighbour is another sample of its set, "
          f"so {n} samples allow k up to {n - 1}"
      )
  return k


def squared_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _rows_per_chunk(columns: int) -> int:
  return max(1, CHUNK_ELEMENTS // max(columns, 1))


def inner_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """a @ b.T in float64, (len(a), len(b))."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  out = np.empty((len(a), len(b)), np.float64)
  step = _rows_per_chunk(len(b))
  for start in range(0, len(a), step):
    np.matmul(a[start : start + step], b.T, out=out[start : start + step])
  return out


def distances_from_inner(
    inner: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray
) -> np.ndarray:
  """Euclidean distances from a @ b.T and the squared norms of the rows."""
  d2 = norms_a[:, None] + norms_b[None, :] - 2.0 * inner
  np.maximum(d2, 0.0, out=d2)
  return np.sqrt(d2, out=d2)


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Euclidean distances between the rows of a and of b, (len(a), len(b))."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return distances_from_inner(
      inner_products(a, b), squared_norms(a), squared_norms(b)
  )


def nearest_distances(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
  """For each row of a, the distance to its nearest row of b; b None: of a,
  the row itself excluded. Chunked: at most CHUNK_ELEMENTS distances at
  once, whatever len(b) (a generated class against 60,000 training
  images)."""
  a = np.asarray(a, np.float64)
  same = b is None
  b = a if same else np.asarray(b, np.float64)
  if len(b) < (2 if same else 1):
    raise TooFewSamplesError(
        f"nearest neighbours need at least "
        f"{2 if same else 1} samples, got {len(b)}"
    )
  norms_b = squared_norms(b)
  out = np.empty(len(a), np.float64)
  step = _rows_per_chunk(len(b))
  for start in range(0, len(a), step):
    block = a[start : start + step]
    d = distances_from_inner(block @ b.T, squared_norms(block), norms_b)
    if same:
      rows = np.arange(len(block))
      d[rows, start + rows] = np.inf
    out[start : start + len(block)] = d.min(axis=1)
  return out


def kth_neighbour_distances(
    within: np.ndarray, k: int, what: str = "set's"
) -> np.ndarray:
  """For each sample, the distance to its k-th nearest other sample, from
  the set's distance matrix (n, n); its diagonal is ignored. `what` names
  the set in the error for a k that is not smaller than n."""
  d = np.array(within, np.float64, copy=True)
  k = check_k(k, {what: len(d)})
  np.fill_diagonal(d, np.inf)
  return np.partition(d, k - 1, axis=1)[:, k - 1]
