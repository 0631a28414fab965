"""The feature-space metrics against brute-force implementations of their
published definitions, written here with plain loops (no library code), on
random features; their known cases; and their errors for bad input."""

import math

import numpy as np
import pytest

from cign_jax.evaluation import distances
from cign_jax.evaluation.metrics import duplicates
from cign_jax.evaluation.metrics import kid
from cign_jax.evaluation.metrics import memorisation
from cign_jax.evaluation.metrics import prdc
from cign_jax.evaluation.metrics import spread

# --- Brute force, from the papers' definitions -------------------------------


def _dist(a, b):
  return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _radius(points, i, k):
  """Distance from points[i] to its k-th nearest other point."""
  others = sorted(
      _dist(points[i], points[j]) for j in range(len(points)) if j != i
  )
  return others[k - 1]


def _brute_prdc(real, fake, k):
  n, m = len(real), len(fake)
  r_real = [_radius(real, i, k) for i in range(n)]
  r_fake = [_radius(fake, j, k) for j in range(m)]
  d = [[_dist(real[i], fake[j]) for j in range(m)] for i in range(n)]
  precision = (
      sum(any(d[i][j] <= r_real[i] for i in range(n)) for j in range(m)) / m
  )
  recall = (
      sum(any(d[i][j] <= r_fake[j] for j in range(m)) for i in range(n)) / n
  )
  density = sum(d[i][j] <= r_real[i] for i in range(n) for j in range(m)) / (
      k * m
  )
  coverage = (
      sum(any(d[i][j] <= r_real[i] for j in range(m)) for i in range(n)) / n
  )
  return {
      "precision": precision,
      "recall": recall,
      "density": density,
      "coverage": coverage,
  }


def _poly_kernel(x, y):
  return (sum(float(a) * float(b) for a, b in zip(x, y)) / len(x) + 1) ** 3


def _brute_mmd2(x, y):
  """The unbiased MMD^2 with the cubic kernel, by its formula."""
  m, n = len(x), len(y)
  xx = sum(
      _poly_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j
  ) / (m * (m - 1))
  yy = sum(
      _poly_kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j
  ) / (n * (n - 1))
  xy = sum(_poly_kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (
      m * n
  )
  return xx + yy - 2 * xy


def _brute_kid(real, fake, num_subsets, subset_size, seed):
  """torch-fidelity's procedure: per subset, draw the generated indices,
  then the real ones, without replacement; MMD^2 of the two; mean and
  (population) standard deviation."""
  m = min(subset_size, len(fake), len(real))
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    f = fake[rng.choice(len(fake), m, replace=False)]
    r = real[rng.choice(len(real), m, replace=False)]
    values.append(_brute_mmd2(f, r))
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
  return mean, std


def _nearest_other(points, i):
  return min(_dist(points[i], points[j]) for j in range(len(points)) if j != i)


def _percentile(values, q):
  """Linear interpolation between closest ranks (numpy's default)."""
  s = sorted(values)
  pos = (len(s) - 1) * q / 100
  lo = int(math.floor(pos))
  hi = min(lo + 1, len(s) - 1)
  return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.fixture
def features():
  """Random real and generated features (30 and 25 of dimension 6), the
  generated ones narrower and shifted so every metric is strictly between
  its extremes."""
  rng = np.random.default_rng(0)
  real = rng.normal(size=(30, 6))
  fake = 0.7 * rng.normal(size=(25, 6)) + 0.4
  return real, fake


# --- Against brute force ------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(features, k):
  real, fake = features
  got = prdc.precision_recall_density_coverage(real, fake, k)
  want = _brute_prdc(real, fake, k)
  assert set(got) == set(want)
  for name in want:
    assert got[name] == pytest.approx(want[name], abs=1e-12), name
  assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1


def test_kid_matches_brute_force(features):
  real, fake = features
  mean, std = kid.kernel_inception_distance(
      real, fake, num_subsets=7, max_subset_size=10, seed=3
  )
  want_mean, want_std = _brute_kid(real, fake, 7, 10, 3)
  assert mean == pytest.approx(want_mean, rel=1e-9, abs=1e-12)
  assert std == pytest.approx(want_std, rel=1e-7, abs=1e-12)
  assert std > 0


def test_kid_of_whole_sets_is_their_unbiased_mmd(features):
  real, fake = features
  real = real[:25]  # as many as generated: every subset is the whole set
  mean, std = kid.kernel_inception_distance(real, fake, num_subsets=5)
  assert mean == pytest.approx(_brute_mmd2(fake, real), rel=1e-9)
  assert std == 0.0


def test_kid_does_not_depend_on_the_sample_count():
  """Unbiased: small subsets average to what large ones give (FID would
  grow as the sets shrink); the same distribution on both sides gives
  about 0."""
  rng = np.random.default_rng(1)
  real = rng.normal(size=(1200, 8))
  fake = rng.normal(size=(1200, 8)) * 1.3 + 0.3
  large, _ = kid.kernel_inception_distance(
      real, fake, num_subsets=5, max_subset_size=1200
  )
  small, _ = kid.kernel_inception_distance(
      real, fake, num_subsets=3000, max_subset_size=20
  )
  assert small == pytest.approx(large, rel=0.05)
  same, _ = kid.kernel_inception_distance(
      real[:600], real[600:], num_subsets=5, max_subset_size=600
  )
  assert abs(same) < 0.02 * large


def test_spread_matches_brute_force(features):
  real, fake = features

  def mean_pairwise(points):
    pairs = [
        _dist(points[i], points[j])
        for i in range(len(points))
        for j in range(i + 1, len(points))
    ]
    return sum(pairs) / len(pairs)

  want = mean_pairwise(fake) / mean_pairwise(real)
  assert spread.within_class_spread(real, fake) == pytest.approx(
      want, rel=1e-12
  )
  assert spread.within_class_spread(real, real) == pytest.approx(1.0)


def test_near_duplicates_match_brute_force():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(120, 5))
  fake = rng.normal(size=(120, 5))
  fake[60:] = fake[:60] + 1e-3 * rng.normal(size=(60, 5))  # pairs
  threshold = _percentile([_nearest_other(real, i) for i in range(120)], 1)
  want = sum(_nearest_other(fake, j) < threshold for j in range(120)) / 120
  got = duplicates.near_duplicate_share(real, fake)
  assert got == pytest.approx(want, abs=1e-12)
  assert got == 1.0
  # Real against itself: about 1% of its own samples are that close.
  assert duplicates.near_duplicate_share(real, real) <= 0.02


def test_memorisation_matches_brute_force():
  rng = np.random.default_rng(3)
  train = rng.normal(size=(200, 4))
  test = rng.normal(size=(40, 4))
  fake = np.concatenate([train[:10] + 1e-4, rng.normal(size=(30, 4))])

  def nearest_train(points):
    return [min(_dist(p, t) for t in train) for p in points]

  def median(values):
    return float(np.median(values))

  g, t = nearest_train(fake), nearest_train(test)
  threshold = _percentile(t, 1)
  got = memorisation.memorisation(train, test, fake)
  assert got["memorisation_ratio"] == pytest.approx(
      median(g) / median(t), rel=1e-12
  )
  assert got["memorised"] == pytest.approx(
      sum(d < threshold for d in g) / len(g)
  )
  assert got["memorised"] == pytest.approx(10 / 40)
  copies = memorisation.memorisation(train, test, train[:40])
  assert copies == {"memorisation_ratio": 0.0, "memorised": 1.0}
  fresh = memorisation.memorisation(train, test, rng.normal(size=(400, 4)))
  assert fresh["memorisation_ratio"] == pytest.approx(1.0, abs=0.2)


# --- Known cases -------------------------------------------------------------


@pytest.fixture
def real_set():
  rng = np.random.default_rng(4)
  return rng.normal(size=(80, 32)) * rng.uniform(0.5, 2.0, size=32)


def test_identical_sets(real_set):
  got = prdc.precision_recall_density_coverage(real_set, real_set.copy(), 5)
  assert got["precision"] == 1.0
  assert got["recall"] == 1.0
  assert got["coverage"] == 1.0
  assert spread.within_class_spread(real_set, real_set) == pytest.approx(1.0)


def test_one_real_image_repeated(real_set):
  fake = np.repeat(real_set[:1], 80, axis=0)
  got = prdc.precision_recall_density_coverage(real_set, fake, 3)
  assert got["precision"] == 1.0
  assert got["recall"] <= 1 / 80  # at most the repeated image itself
  assert got["coverage"] <= 1 / 80 + 0.05
  assert duplicates.near_duplicate_share(real_set, fake) == 1.0
  assert spread.within_class_spread(real_set, fake) < 1e-6


def test_shifted_copy(real_set):
  shift = 3.0 * real_set.std(axis=0)
  got = prdc.precision_recall_density_coverage(real_set, real_set + shift, 3)
  assert got["precision"] <= 0.05
  assert got["recall"] <= 0.05
  assert got["coverage"] <= 0.05
  mean, _ = kid.kernel_inception_distance(
      real_set, real_set + shift, num_subsets=3
  )
  same, _ = kid.kernel_inception_distance(
      real_set[:40], real_set[40:], num_subsets=3
  )
  assert mean > 20 * abs(same)


# --- Distances ---------------------------------------------------------------


def test_chunked_distances_match_direct(monkeypatch):
  rng = np.random.default_rng(5)
  a = rng.normal(size=(37, 9))
  b = rng.normal(size=(53, 9))
  direct = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  monkeypatch.setattr(distances, "CHUNK_ELEMENTS", 100)  # 1 row at a time
  np.testing.assert_allclose(
      distances.pairwise_distances(a, b), direct, rtol=1e-10
  )
  np.testing.assert_allclose(
      distances.nearest_distances(a, b), direct.min(axis=1), rtol=1e-10
  )
  within = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
  np.fill_diagonal(within, np.inf)
  np.testing.assert_allclose(
      distances.nearest_distances(a), within.min(axis=1), rtol=1e-10
  )


# --- Bad input ---------------------------------------------------------------


def test_k_not_smaller_than_the_samples(features):
  real, fake = features
  with pytest.raises(
      distances.NeighbourhoodSizeError,
      match=r"k = 25 must be smaller than the generated "
      r"samples \(25\).*allow k up to 24",
  ):
    prdc.precision_recall_density_coverage(real, fake, 25)
  with pytest.raises(distances.NeighbourhoodSizeError, match="k must be >= 1"):
    prdc.precision_recall_density_coverage(real, fake, 0)
  with pytest.raises(distances.NeighbourhoodSizeError, match="whole number"):
    prdc.precision_recall_density_coverage(real, fake, 2.5)


def test_too_few_samples(features):
  real, fake = features
  with pytest.raises(
      distances.TooFewSamplesError,
      match="generated features: 1 samples, this needs at " "least 2",
  ):
    spread.within_class_spread(real, fake[:1])
  with pytest.raises(distances.TooFewSamplesError, match="at least 2"):
    kid.kernel_inception_distance(real, fake, max_subset_size=1)
  with pytest.raises(distances.TooFewSamplesError):
    duplicates.near_duplicate_share(real[:1], fake)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(features, bad):
  real, fake = features
  fake = fake.copy()
  fake[7, 2] = bad
  for call in (
      lambda: prdc.precision_recall_density_coverage(real, fake, 3),
      lambda: kid.kernel_inception_distance(real, fake),
      lambda: spread.within_class_spread(real, fake),
      lambda: duplicates.near_duplicate_share(real, fake),
      lambda: memorisation.memorisation(real, real, fake),
  ):
    with pytest.raises(
        distances.NonFiniteFeaturesError,
        match=r"generated features: 1 of 25 feature rows.*" r"row 7",
    ):
      call()


def test_shapes(features):
  real, fake = features
  with pytest.raises(distances.MetricInputError, match="same feature layer"):
    prdc.precision_recall_density_coverage(real, fake[:, :4], 3)
  with pytest.raises(
      distances.MetricInputError, match=r"\(samples, " r"dimensions\)"
  ):
    kid.kernel_inception_distance(real[0], fake)
  # Every named error is a ValueError, as the library's other input errors.
  assert issubclass(distances.NeighbourhoodSizeError, ValueError)
