"""Kernel Inception Distance (Binkowski et al., ICLR 2018).

The squared maximum mean discrepancy between generated and real features
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (d: the feature
dimension), in its unbiased form: for sets X (generated) and Y (real) of m
each,

  MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1))
        + sum_{i != j} k(y_i, y_j) / (m (m - 1))
        - 2 sum_{i, j} k(x_i, y_j) / m^2.

As torch-fidelity and clean-fid report it: MMD^2 on `num_subsets` (100)
random subsets of m = min(`max_subset_size` (1000), #generated, #real)
drawn without replacement from each set, then the mean over subsets (KID)
and their standard deviation (numpy's, ddof 0). Unbiased: its expectation
does not depend on m, so per-class KID of runs scored on different sample
counts compare, which FID's do not. It can be slightly negative when the
sets come from one distribution.

Subsets are drawn with `numpy.random.default_rng(seed)`, for each subset
first the generated indices, then the real ones (`rng.choice(n, m,
replace=False)`). When m equals both set sizes every subset is the whole
set and the standard deviation is 0.

The kernel sums are taken from the full kernel matrices once per class
(through the shared inner products), each subset's sums as indicator-vector
products, so 100 subsets cost little beyond the three matrix products.
"""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import distances
from cign_jax.evaluation import registry

NUM_SUBSETS = 100
MAX_SUBSET_SIZE = 1000
SEED = 0
FEATURES = 2048  # the FID Inception's pool features

NAMES = {"kid": registry.LOWER, "kid_std": None}
TITLES = {"kid": "KID", "kid_std": "KID std over subsets"}
NEEDS = registry.Needs(features=(FEATURES,), real=True, min_samples=2)


def compute(data, names):
  del names
  mean, std = from_inner_products(
      data.inner("fake", "fake", FEATURES),
      data.inner("real", "real", FEATURES),
      data.inner("fake", "real", FEATURES),
      FEATURES,
  )
  return {"kid": mean, "kid_std": std}


def _kernel(inner: np.ndarray, dim: int) -> np.ndarray:
  return (inner / dim + 1.0) ** 3


def subset_indices(
    n_fake: int, n_real: int, num_subsets: int, max_subset_size: int, seed: int
):
  """(m, generated index sets, real index sets): the subsets drawn, in the
  order described in the module docstring."""
  m = min(int(max_subset_size), n_fake, n_real)
  rng = np.random.default_rng(seed)
  fake_sets, real_sets = [], []
  for _ in range(num_subsets):
    fake_sets.append(rng.choice(n_fake, m, replace=False))
    real_sets.append(rng.choice(n_real, m, replace=False))
  return m, fake_sets, real_sets


def _indicators(sets, n: int) -> np.ndarray:
  w = np.zeros((n, len(sets)), np.float64)
  for t, idx in enumerate(sets):
    w[idx, t] = 1.0
  return w


def from_inner_products(
    fake_fake: np.ndarray,
    real_real: np.ndarray,
    fake_real: np.ndarray,
    dim: int,
    num_subsets: int = NUM_SUBSETS,
    max_subset_size: int = MAX_SUBSET_SIZE,
    seed: int = SEED,
) -> tuple[float, float]:
  """(KID, its standard deviation over subsets) from the inner products of
  generated-generated (M, M), real-real (N, N) and generated-real (M, N)
  features of dimension `dim`."""
  n_fake, n_real = fake_real.shape
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  m, fake_sets, real_sets = subset_indices(
      n_fake, n_real, num_subsets, max_subset_size, seed
  )
  if m < 2:
    raise distances.TooFewSamplesError(
        f"KID needs subsets of at least 2 samples; got {n_fake} generated, "
        f"{n_real} real and max_subset_size {max_subset_size}"
    )
  k_ff = _kernel(fake_fake, dim)
  k_rr = _kernel(real_real, dim)
  k_fr = _kernel(fake_real, dim)
  if m == n_fake == n_real:
    # Every subset is the whole of both sets: one MMD, computed once (the
    # same sums in another order would differ only by rounding).
    fake_sets, real_sets = fake_sets[:1], real_sets[:1]
  w_f = _indicators(fake_sets, n_fake)
  w_r = _indicators(real_sets, n_real)
  # Per subset t: w_t' K w_t sums the kernel over all pairs of the subset;
  # the diagonal terms (i = j) are taken out again.
  within_f = np.einsum("it,it->t", w_f, k_ff @ w_f) - w_f.T @ np.diag(k_ff)
  within_r = np.einsum("it,it->t", w_r, k_rr @ w_r) - w_r.T @ np.diag(k_rr)
  across = np.einsum("it,it->t", w_f, k_fr @ w_r)
  mmd2 = (within_f + within_r) / (m * (m - 1)) - 2.0 * across / (m * m)
  return float(mmd2.mean()), float(mmd2.std())


def kernel_inception_distance(
    real_features,
    fake_features,
    num_subsets: int = NUM_SUBSETS,
    max_subset_size: int = MAX_SUBSET_SIZE,
    seed: int = SEED,
) -> tuple[float, float]:
  """KID of generated against real features: (mean, standard deviation)
  over `num_subsets` subsets of min(max_subset_size, M, N) samples.

  Raises:
    TooFewSamplesError: fewer than 2 samples in a subset.
    NonFiniteFeaturesError: a NaN or infinite feature.
    MetricInputError: shapes that are not (N, D) and (M, D).
  """
  real = distances.check_features(real_features, "real features", 2)
  fake = distances.check_features(fake_features, "generated features", 2)
  distances.check_same_dimension(
      real, fake, "real features", "generated features"
  )
  return from_inner_products(
      distances.inner_products(fake, fake),
      distances.inner_products(real, real),
      distances.inner_products(fake, real),
      real.shape[1],
      num_subsets,
      max_subset_size,
      seed,
  )
