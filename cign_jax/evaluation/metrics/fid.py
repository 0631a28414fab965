"""Per-class FID, the CIGN paper's Table 3 (`cign_jax.evaluation.fid` has
the protocol): names fid64, fid192, fid768 and fid2048, one per Inception
feature tap, each needing at least as many samples per class as features
(fewer make the covariance singular)."""

from __future__ import annotations

from cign_jax.evaluation import fid as fid_lib
from cign_jax.evaluation import registry

NAMES = {f"fid{s}": registry.LOWER for s in fid_lib.FEATURE_SIZES}
TITLES = {f"fid{s}": f"FID{s}" for s in fid_lib.FEATURE_SIZES}


def size(name: str) -> int:
  return int(name[len("fid") :])


def NEEDS(names):  # pylint: disable=invalid-name
  sizes = tuple(size(n) for n in names)
  return registry.Needs(features=sizes, real=True, min_samples=max(sizes))


def compute(data, names):
  # Generated first, as the paper's pytorch-fid and `per_class_fid` order
  # them (the square root of s1 s2, not of s2 s1).
  return {
      name: fid_lib.frechet_distance(
          *fid_lib.statistics(data.fake_features(size(name))),
          *fid_lib.statistics(data.real_features(size(name))),
      )
      for name in names
  }
