"""Within-class spread: how varied the generated samples of a class are,
against the real ones.

spread = mean distance between two generated samples of the class / mean
distance between two real samples of it (all pairs, i < j, in the feature
space). 1: as varied as the data; below 1: less varied (a collapsed class
is near 0); above 1: more varied than the data (noise, or other classes'
shapes). No side of 1 is better in itself, so the metric ranks no
checkpoint.
"""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import distances
from cign_jax.evaluation import registry

FEATURES = 2048  # the FID Inception's pool features

NAMES = {"spread": None}
TITLES = {"spread": "within-class spread"}
NEEDS = registry.Needs(features=(FEATURES,), real=True, min_samples=2)


def compute(data, names):
  del names
  return {
      "spread": from_distances(
          data.distances("real", "real", FEATURES),
          data.distances("fake", "fake", FEATURES),
      )
  }


def mean_pairwise(within: np.ndarray) -> float:
  """Mean of the off-diagonal entries of a set's distance matrix."""
  n = len(within)
  if n < 2:
    raise distances.TooFewSamplesError(
        f"a mean pairwise distance needs at least 2 samples, got {n}"
    )
  total = within.sum() - np.trace(within)
  return float(total / (n * (n - 1)))


def from_distances(real_real: np.ndarray, fake_fake: np.ndarray) -> float:
  real = mean_pairwise(real_real)
  if real <= 0.0:
    raise distances.MetricInputError(
        "the real samples of the class are all one point in feature space: "
        "their spread is 0 and the ratio is undefined"
    )
  return mean_pairwise(fake_fake) / real


def within_class_spread(real_features, fake_features) -> float:
  """Mean pairwise distance of generated features over that of real ones.

  Raises:
    TooFewSamplesError: fewer than 2 samples on a side.
    NonFiniteFeaturesError: a NaN or infinite feature.
    MetricInputError: mismatched shapes, or real features all equal.
  """
  real = distances.check_features(real_features, "real features", 2)
  fake = distances.check_features(fake_features, "generated features", 2)
  distances.check_same_dimension(
      real, fake, "real features", "generated features"
  )
  return from_distances(
      distances.pairwise_distances(real, real),
      distances.pairwise_distances(fake, fake),
  )
