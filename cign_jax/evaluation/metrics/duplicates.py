"""Near-duplicates among generated samples (mode collapse).

threshold = the 1st percentile of the real samples' nearest-neighbour
distances (each real sample to its nearest other real sample of the
class); duplicates = the share of generated samples whose nearest other
generated sample is closer than that. Real data has about 1% of its
samples that close by construction; a model that draws one image whatever
the noise has nearly all. Compare sets of equal size (the evaluation takes
as many generated as real samples per class): nearest-neighbour distances
shrink as a set grows.
"""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import distances
from cign_jax.evaluation import registry

PERCENTILE = 1.0
FEATURES = 2048  # the FID Inception's pool features

NAMES = {"duplicates": registry.LOWER}
TITLES = {"duplicates": "near-duplicates"}
NEEDS = registry.Needs(features=(FEATURES,), real=True, min_samples=2)


def compute(data, names):
  del names
  return {
      "duplicates": from_distances(
          data.distances("real", "real", FEATURES),
          data.distances("fake", "fake", FEATURES),
      )
  }


def _nearest_other(within: np.ndarray) -> np.ndarray:
  if len(within) < 2:
    raise distances.TooFewSamplesError(
        f"a nearest other sample needs at least 2 samples, got "
        f"{len(within)}"
    )
  d = np.array(within, np.float64, copy=True)
  np.fill_diagonal(d, np.inf)
  return d.min(axis=1)


def from_distances(
    real_real: np.ndarray, fake_fake: np.ndarray, percentile: float = PERCENTILE
) -> float:
  threshold = np.percentile(_nearest_other(real_real), percentile)
  return float(np.mean(_nearest_other(fake_fake) < threshold))


def near_duplicate_share(
    real_features, fake_features, percentile: float = PERCENTILE
) -> float:
  """The share of generated samples closer to another generated sample than
  the `percentile`-th percentile of real nearest-neighbour distances.

  Raises:
    TooFewSamplesError: fewer than 2 samples on a side.
    NonFiniteFeaturesError: a NaN or infinite feature.
    MetricInputError: mismatched shapes.
  """
  real = distances.check_features(real_features, "real features", 2)
  fake = distances.check_features(fake_features, "generated features", 2)
  distances.check_same_dimension(
      real, fake, "real features", "generated features"
  )
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f"percentile must be in [0, 100], got {percentile}")
  return from_distances(
      distances.pairwise_distances(real, real),
      distances.pairwise_distances(fake, fake),
      percentile,
  )
