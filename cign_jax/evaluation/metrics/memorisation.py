"""Memorisation: are generated samples closer to training images than
unseen real images are?

For each generated sample of a class, the distance to its nearest training
image of the class; for each real test image of the class, the same. Two
numbers:

- memorisation_ratio: median generated-to-train distance / median
  test-to-train distance. About 1 or above for a model that generalises;
  well below 1 when samples sit on training images. Far above 1 says only
  that the samples are far from the data, so it ranks nothing.
- memorised: the share of generated samples closer to a training image
  than the 1st percentile of the test-to-train distances (copies, or near
  copies, of training images); lower is better.

It needs the Inception features of the class's training images: a pass
over the training split (about 6,000 images a class for MNIST), cached on
disk after the first evaluation, and so it is in no default metric list.
"""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import distances
from cign_jax.evaluation import registry

PERCENTILE = 1.0
FEATURES = 2048  # the FID Inception's pool features

NAMES = {"memorisation_ratio": None, "memorised": registry.LOWER}
TITLES = {"memorisation_ratio": "memorisation ratio", "memorised": "memorised"}
NEEDS = registry.Needs(
    features=(FEATURES,), real=True, train_features=(FEATURES,), min_samples=1
)


def compute(data, names):
  train = data.train_features(FEATURES)
  out = from_nearest(
      distances.nearest_distances(data.fake_features(FEATURES), train),
      distances.nearest_distances(data.real_features(FEATURES), train),
  )
  return {n: out[n] for n in names}


def from_nearest(
    fake_to_train: np.ndarray,
    test_to_train: np.ndarray,
    percentile: float = PERCENTILE,
) -> dict:
  test_median = float(np.median(test_to_train))
  if test_median <= 0.0:
    raise distances.MetricInputError(
        "the test images of the class lie on training images (median "
        "distance 0): the ratio is undefined; are the test and training "
        "images the same?"
    )
  threshold = np.percentile(test_to_train, percentile)
  return {
      "memorisation_ratio": float(np.median(fake_to_train)) / test_median,
      "memorised": float(np.mean(fake_to_train < threshold)),
  }


def memorisation(
    train_features, test_features, fake_features, percentile: float = PERCENTILE
) -> dict:
  """{'memorisation_ratio', 'memorised'} of generated features against the
  training set, with the test set's distances to it as the reference.

  Raises:
    TooFewSamplesError: an empty set.
    NonFiniteFeaturesError: a NaN or infinite feature.
    MetricInputError: mismatched shapes.
  """
  train = distances.check_features(train_features, "training features", 1)
  test = distances.check_features(test_features, "test features", 1)
  fake = distances.check_features(fake_features, "generated features", 1)
  distances.check_same_dimension(
      train, test, "training features", "test features"
  )
  distances.check_same_dimension(
      train, fake, "training features", "generated features"
  )
  return from_nearest(
      distances.nearest_distances(fake, train),
      distances.nearest_distances(test, train),
      percentile,
  )
