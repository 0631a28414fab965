"""Improved precision and recall; density and coverage.

Each is read off k-nearest-neighbour balls in a feature space: the ball of
a sample is centred on it with the radius of its k-th nearest other sample
of the same set, NND_k. With N real features r_i and M generated f_j:

- precision (Kynkaanniemi et al., NeurIPS 2019): the share of generated
  samples inside some real sample's ball, f_j in B(r_i, NND_k(r_i)).
- recall (the same paper): the share of real samples inside some generated
  sample's ball, r_i in B(f_j, NND_k(f_j)): below 1 when the generated set
  misses parts of the data; near 0 when it collapses onto a few images.
- density (Naeem et al., ICML 2020): (1 / kM) sum_j sum_i 1[f_j in
  B(r_i, NND_k(r_i))], how many real balls a generated sample sits in,
  divided by k; about 1 for samples distributed like the data.
- coverage (the same paper): the share of real samples whose own ball holds
  some generated sample; unlike recall it uses only the real balls, so a
  few outlying generated samples cannot inflate it.

Balls are closed (a distance equal to the radius is inside), as the papers
define them. `precision_recall_density_coverage` takes features of any
extractor; the registry's metric uses the FID Inception's 2048-d pool
features with k = 3 for precision and recall (the first paper's choice)
and k = 5 for density and coverage (the second's).
"""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import distances
from cign_jax.evaluation import registry

PR_K = 3
DC_K = 5
FEATURES = 2048  # the FID Inception's pool features

NAMES = {
    "precision": registry.HIGHER,
    "recall": registry.HIGHER,
    "density": registry.HIGHER,
    "coverage": registry.HIGHER,
}
TITLES = {
    "precision": f"precision (k={PR_K})",
    "recall": f"recall (k={PR_K})",
    "density": f"density (k={DC_K})",
    "coverage": f"coverage (k={DC_K})",
}


def NEEDS(names):  # pylint: disable=invalid-name
  k = max(PR_K if n in ("precision", "recall") else DC_K for n in names)
  return registry.Needs(features=(FEATURES,), real=True, min_samples=k + 1)


def compute(data, names):
  real_real = data.distances("real", "real", FEATURES)
  fake_fake = data.distances("fake", "fake", FEATURES)
  real_fake = data.distances("real", "fake", FEATURES)
  out = {}
  if {"precision", "recall"} & set(names):
    out.update(
        {
            n: v
            for n, v in from_distances(
                real_real, fake_fake, real_fake, PR_K
            ).items()
            if n in ("precision", "recall")
        }
    )
  if {"density", "coverage"} & set(names):
    out.update(
        {
            n: v
            for n, v in from_distances(
                real_real, fake_fake, real_fake, DC_K
            ).items()
            if n in ("density", "coverage")
        }
    )
  return out


def from_distances(
    real_real: np.ndarray, fake_fake: np.ndarray, real_fake: np.ndarray, k: int
) -> dict:
  """The four numbers from the distance matrices: real-real (N, N),
  generated-generated (M, M) and real-generated (N, M); diagonals of the
  first two are ignored."""
  n, m = real_fake.shape
  distances.check_k(k, {"real": n, "generated": m})
  real_radius = distances.kth_neighbour_distances(real_real, k, "real")
  fake_radius = distances.kth_neighbour_distances(fake_fake, k, "generated")
  # inside[i, j]: generated j lies in real i's ball.
  inside = real_fake <= real_radius[:, None]
  return {
      "precision": float(inside.any(axis=0).mean()),
      "recall": float((real_fake <= fake_radius[None, :]).any(axis=1).mean()),
      "density": float(inside.sum() / (k * m)),
      "coverage": float(inside.any(axis=1).mean()),
  }


def precision_recall_density_coverage(
    real_features, fake_features, k: int = DC_K
) -> dict:
  """Improved precision and recall, density and coverage of `fake_features`
  against `real_features`, with k-nearest-neighbour balls.

  Args:
    real_features: (N, D) features of real samples.
    fake_features: (M, D) features of generated samples, same extractor.
    k: the neighbour whose distance is a ball's radius; must be smaller than
      N and M.

  Returns:
    {'precision', 'recall', 'density', 'coverage'}: floats; all but density
    in [0, 1], density in [0, N / k].

  Raises:
    NeighbourhoodSizeError: k < 1 or k >= N or M.
    NonFiniteFeaturesError: a NaN or infinite feature.
    MetricInputError: shapes that are not (N, D) and (M, D).
  """
  real = distances.check_features(real_features, "real features", 2)
  fake = distances.check_features(fake_features, "generated features", 2)
  distances.check_same_dimension(
      real, fake, "real features", "generated features"
  )
  k = distances.check_k(k, {"real": len(real), "generated": len(fake)})
  return from_distances(
      distances.pairwise_distances(real, real),
      distances.pairwise_distances(fake, fake),
      distances.pairwise_distances(real, fake),
      k,
  )
