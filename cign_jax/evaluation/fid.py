"""FID as the CIGN paper measured it (pytorch-fid 0.3.0 protocol), in JAX.

Protocol (`shared/reference/fid.md`):

1. Images in the library's range [-1, 1] are quantised to 8-bit pixels, as the
   paper's samples went through image files: u8 = floor(255 (x + 1) / 2 + 0.5)
   clipped to [0, 255] (what torchvision's `save_image` does). uint8 input is
   taken as pixels already.
2. Pixels are read as RGB in [0, 1] (u8 / 255; a grey image is repeated to 3
   channels), resized to 299x299 bilinearly with half-pixel centres
   (PyTorch's `align_corners=False`) and no antialiasing, then mapped to
   [-1, 1] by 2x - 1.
3. The FID Inception-v3 (`cign_jax.evaluation.inception`) gives features at
   64, 192, 768 and 2048 dimensions.
4. mu, sigma: mean and unbiased covariance of the features in float64;
   FID = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), with
   pytorch-fid's handling of a non-finite or complex square root.

Steps 1-2 run inside the same jitted function as the network
(`preprocess_pixels`), so only the small uint8 images travel to the device.

`per_class_fid` is the paper's per-class FID: for each label, up to
`max_per_class` (1000) real test images of that label against the same number
of generated images with that label; statistics of the real images are cached
on disk per (dataset, split, label, feature size, count), keyed by a hash of
the pixels used, under `$CIGN_JAX_CACHE/fid/reference_stats` (by default
`~/.cache/cign_jax/fid/reference_stats`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import warnings
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from cign_jax import utils
from cign_jax.evaluation import distances
from cign_jax.evaluation import inception

FEATURE_SIZES = inception.FEATURE_SIZES
INCEPTION_SIZE = 299
# Changes whenever the preprocessing or network changes, so cached reference
# statistics from an older protocol are not reused.
PROTOCOL_VERSION = "pytorch-fid-0.3.0/u8/bilinear-halfpixel/fid-inception-v3/1"


# ---------------------------------------------------------------------------
# Preprocessing.


def quantize(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 pixels (N, H, W, C); uint8 passes through.

  (N, H, W) gains a channel axis. u8 = floor(255 (x + 1) / 2 + 0.5), clipped.
  """
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
        f"images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3),"
        f" got shape {x.shape}"
    )
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(
        f"images must be floats in [-1, 1] or uint8 pixels, got "
        f"dtype {x.dtype}"
    )
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or infinite values")
  x01 = (x.astype(np.float32) + np.float32(1.0)) * np.float32(0.5)
  pixels = np.floor(x01 * np.float32(255.0) + np.float32(0.5))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's bilinear resize along one axis.

  align_corners=False: the source coordinate of output pixel i is
  (i + 0.5) * in / out - 0.5, clamped below at 0; it blends pixels floor(src)
  and floor(src) + 1 (clamped to the last pixel). No antialiasing, so when
  shrinking every output still reads only two input pixels.
  """
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    weights[i, i0] += 1.0 - frac
    weights[i, i1] += frac
  return weights


def resize_bilinear(images, out_hw: tuple[int, int]):
  """PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` (no
  antialias), NHWC, as two matrix products (one per axis)."""
  _, h, w, _ = images.shape
  wh = jnp.asarray(bilinear_matrix(h, out_hw[0]), images.dtype)
  ww = jnp.asarray(bilinear_matrix(w, out_hw[1]), images.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", wh, images, precision=hi)
  return jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)


def preprocess_pixels(pixels):
  """uint8 pixels (B, H, W, 1 or 3) -> (B, 299, 299, 3) float32 in [-1, 1],
  pytorch-fid's way: /255, resize (bilinear, half-pixel), 2x - 1."""
  x = pixels.astype(jnp.float32) / jnp.float32(255.0)
  x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
  if x.shape[-1] == 1:  # grey -> RGB (resizing commutes with the repeat)
    x = jnp.broadcast_to(x, x.shape[:3] + (3,))
  return x * jnp.float32(2.0) - jnp.float32(1.0)


# ---------------------------------------------------------------------------
# Features and statistics.

_EXTRACTORS: dict = {}


def get_extractor(batch_size: int | None = None) -> inception.FeatureExtractor:
  """A shared `inception.FeatureExtractor` per batch size (the weights are
  loaded once per process; compiled functions are kept)."""
  if batch_size is None:
    batch_size = inception.default_batch_size()
  key = (int(batch_size), str(inception.fid_cache_dir()))
  if key not in _EXTRACTORS:
    _EXTRACTORS[key] = inception.FeatureExtractor(batch_size=batch_size)
  return _EXTRACTORS[key]


def _deepest(feature_sizes: Iterable[int]) -> int:
  sizes = sorted(set(int(s) for s in feature_sizes))
  bad = [s for s in sizes if s not in FEATURE_SIZES]
  if bad or not sizes:
    raise ValueError(
        f"feature sizes must be among {FEATURE_SIZES}, got "
        f"{tuple(feature_sizes)}"
    )
  return sizes[-1]


def extract_features(
    images,
    feature_sizes: Sequence[int] = (2048,),
    *,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "FID features",
    extractor: inception.FeatureExtractor | None = None,
) -> dict[int, np.ndarray]:
  """Inception features of images in [-1, 1] ((N, H, W) or (N, H, W, C)) or
  uint8 pixels: {size: (N, size) float32} for each requested size. The
  network runs only up to the deepest requested tap, and once per distinct
  8-bit image: a collapsed generator's repeated images cost one pass."""
  pixels = quantize(images)
  flat = pixels.reshape(len(pixels), -1)
  _, first, inverse = np.unique(
      flat, axis=0, return_index=True, return_inverse=True
  )
  if len(first) < len(pixels):
    feats = extract_features(
        pixels[first],
        feature_sizes,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        extractor=extractor,
    )
    return {s: f[inverse.reshape(-1)] for s, f in feats.items()}
  deepest = _deepest(feature_sizes)
  if extractor is None:
    extractor = get_extractor(batch_size)
  bar = None
  if progress:
    bar = tqdm(total=len(pixels), desc=desc, unit="img", leave=False)
  try:
    feats = extractor.extract(
        pixels,
        deepest,
        preprocess=preprocess_pixels,
        progress=bar.update if bar else None,
    )
  finally:
    if bar is not None:
      bar.close()
  return {int(s): feats[int(s)] for s in feature_sizes}


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma): mean and unbiased covariance (rows = samples), float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {f.shape}")
  if f.shape[0] < 2:
    raise ValueError(
        f"need at least 2 samples for a covariance, got " f"{f.shape[0]}"
    )
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance of two Gaussians, as pytorch-fid computes it.

  |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)) in float64, with
  scipy.linalg.sqrtm. A non-finite square root is retried with eps * I added
  to both covariances; a complex one whose diagonal has an imaginary part
  above 1e-3 raises ValueError, otherwise its real part is used.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(
        f"mean vectors differ in shape: {mu1.shape} vs " f"{mu2.shape}"
    )
  if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
        f"covariances {sigma1.shape} / {sigma2.shape} do not fit "
        f"means of shape {mu1.shape}"
    )
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    warnings.warn(
        f"FID: sqrtm(sigma1 sigma2) is singular; adding {eps} * I "
        "to both covariances",
        RuntimeWarning,
        stacklevel=2,
    )
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.abs(np.diagonal(covmean).imag).max()
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
          f"FID: sqrtm(sigma1 sigma2) has an imaginary component "
          f"of {imag:g} on its diagonal"
      )
    covmean = covmean.real
  return float(
      diff.dot(diff)
      + np.trace(sigma1)
      + np.trace(sigma2)
      - 2.0 * np.trace(covmean)
  )


def _sqrtm(a):
  # pytorch-fid calls sqrtm(..., disp=False), which stays quiet about
  # singular matrices; the checks above handle the result.
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(a)


def fid_from_features(features1, features2) -> float:
  """FID between two feature sets (N1, D) and (N2, D)."""
  return frechet_distance(*statistics(features1), *statistics(features2))


def _check_enough(n: int, size: int, what: str) -> None:
  if n < size:
    raise distances.TooFewSamplesError(
        f"{what}: {n} samples is too few for FID at {size} features (the "
        f"covariance would be singular; need at least {size})"
    )


def fid(
    images1,
    images2,
    feature_sizes: Sequence[int] = (2048,),
    *,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[int, float]:
  """FID between two image sets at each feature size: {size: value}."""
  for s in feature_sizes:
    _check_enough(min(len(images1), len(images2)), int(s), "fid")
  f1 = extract_features(
      images1, feature_sizes, batch_size=batch_size, progress=progress
  )
  f2 = extract_features(
      images2, feature_sizes, batch_size=batch_size, progress=progress
  )
  return {int(s): fid_from_features(f1[s], f2[s]) for s in feature_sizes}


# ---------------------------------------------------------------------------
# Per-class FID with cached reference statistics.


def reference_stats_dir() -> pathlib.Path:
  return inception.fid_cache_dir() / "reference_stats"


def _pixels_hash(pixels: np.ndarray) -> str:
  digest = hashlib.sha1()
  digest.update(PROTOCOL_VERSION.encode())
  digest.update(str(pixels.shape).encode())
  digest.update(np.ascontiguousarray(pixels).tobytes())
  return digest.hexdigest()[:16]


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))


def _stats_path(
    cache_dir: pathlib.Path,
    dataset: str,
    split: str,
    label,
    size: int,
    count: int,
    digest: str,
) -> pathlib.Path:
  return cache_dir / (
      f"{_safe(dataset)}_{_safe(split)}_label{_safe(label)}_"
      f"f{size}_n{count}_{digest}.npz"
  )


def _load_stats(path: pathlib.Path):
  try:
    with np.load(path) as data:
      return data["mu"], data["sigma"]
  except (OSError, KeyError, ValueError):
    return None


def _save_stats(path: pathlib.Path, mu, sigma) -> None:
  with utils.atomic_write(path) as f:
    np.savez(f, mu=mu, sigma=sigma)


@dataclasses.dataclass
class PerClassFID:
  """Result of `per_class_fid`.

  per_class[size][label]: FID of that class; mean/min/max[size] over classes;
  counts[label]: samples per side used for that class; feature_sizes: the
  sizes computed; notes: what was skipped and why.
  """

  per_class: dict[int, dict]
  mean: dict[int, float]
  min: dict[int, float]
  max: dict[int, float]
  counts: dict
  feature_sizes: tuple[int, ...]
  notes: list[str]

  def summary(self) -> str:
    lines = [
        f"FID{s}: mean {self.mean[s]:.4f}  min {self.min[s]:.4f}  "
        f"max {self.max[s]:.4f}"
        for s in self.feature_sizes
    ]
    return "\n".join(lines + [f"note: {n}" for n in self.notes])


def per_class_fid(
    gen_images,
    gen_labels,
    real_images,
    real_labels,
    feature_sizes: Sequence[int] | None = None,
    max_per_class: int = 1000,
    *,
    dataset: str = "mnist",
    split: str = "test",
    labels: Sequence | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
    cache_dir: os.PathLike | None = None,
) -> PerClassFID:
  """Per-class FID as the CIGN paper computed it.

  For each label (the labels of `real_labels` unless `labels` is given), the
  first n real images of that label are compared with the first n generated
  images with that label, n = min(#real, #generated, max_per_class).

  feature_sizes: None means (64, 192, 768, 2048) where 2048 is skipped, with
  a note, unless every class has >= 2048 samples. Sizes passed explicitly are
  all required: a class with fewer samples than a requested size raises
  ValueError (the covariance would be singular), never a silent NaN.

  Images: [-1, 1] floats ((N, H, W) or (N, H, W, C)) or uint8 pixels.
  Statistics of the real images are cached in `cache_dir` (default
  `reference_stats_dir()`), keyed by dataset, split, label, size, count and a
  hash of the pixels used, so a changed dataset is recomputed.

  Args:
    gen_images, gen_labels: the generated images and their labels.
    real_images, real_labels: the real images (e.g. a test split) and labels.
    feature_sizes: Inception feature sizes (see above).
    max_per_class: at most this many images per class on each side.
    dataset, split: name the real images in the statistics cache.
    labels: the labels to score (default: those of `real_labels`).
    batch_size: Inception batch (default: the extractor's).
    progress: show a progress bar.
    use_cache: read and write cached real statistics.
    cache_dir: where they are cached.

  Returns:
    A `PerClassFID`: per-class FID per feature size, their mean/min/max, the
    sample counts used, and notes (e.g. a skipped 2048).
  """
  gen_labels = np.asarray(gen_labels).reshape(-1)
  real_labels = np.asarray(real_labels).reshape(-1)
  if len(gen_labels) != len(gen_images):
    raise ValueError(
        f"{len(gen_images)} generated images but " f"{len(gen_labels)} labels"
    )
  if len(real_labels) != len(real_images):
    raise ValueError(
        f"{len(real_images)} real images but {len(real_labels)} " "labels"
    )
  if max_per_class < 2:
    raise ValueError(f"max_per_class must be >= 2, got {max_per_class}")
  if labels is None:
    labels = sorted(np.unique(real_labels).tolist())
  labels = list(labels)
  if not labels:
    raise ValueError("no labels to compute FID for")

  index = {}
  for label in labels:
    real_idx = np.flatnonzero(real_labels == label)
    gen_idx = np.flatnonzero(gen_labels == label)
    n = min(len(real_idx), len(gen_idx), int(max_per_class))
    if len(gen_idx) == 0 or len(real_idx) == 0:
      side = "generated" if len(gen_idx) == 0 else "real"
      raise ValueError(f"label {label}: no {side} images")
    index[label] = (real_idx[:n], gen_idx[:n])
  counts = {label: len(index[label][0]) for label in labels}
  smallest = min(counts.values())

  notes = []
  if feature_sizes is None:
    sizes = [64, 192, 768]
    if smallest >= 2048:
      sizes.append(2048)
    else:
      notes.append(
          f"FID2048 skipped: the smallest class has {smallest} "
          "samples per side, fewer than 2048 features (pass "
          "feature_sizes with 2048 to require it)"
      )
  else:
    sizes = sorted(set(int(s) for s in feature_sizes))
    _deepest(sizes)
  for size in sizes:
    for label in labels:
      _check_enough(counts[label], size, f"per_class_fid, label {label}")
  cache = pathlib.Path(cache_dir) if cache_dir else reference_stats_dir()
  real_stats: dict = {}
  missing = []
  for label in labels:
    real_idx = index[label][0]
    pixels = quantize(np.asarray(real_images)[real_idx])
    digest = _pixels_hash(pixels)
    for size in sizes:
      path = _stats_path(
          cache, dataset, split, label, size, len(real_idx), digest
      )
      stats = _load_stats(path) if use_cache else None
      if stats is None:
        missing.append((label, size, path))
      else:
        real_stats[(label, size)] = stats

  missing_labels = sorted({m[0] for m in missing}, key=labels.index)
  if missing_labels:
    sel = np.concatenate([index[label][0] for label in missing_labels])
    feats = extract_features(
        np.asarray(real_images)[sel],
        sizes,
        batch_size=batch_size,
        progress=progress,
        desc="FID real",
    )
    start = 0
    offsets = {}
    for label in missing_labels:
      offsets[label] = (start, start + counts[label])
      start += counts[label]
    for label, size, path in missing:
      lo, hi = offsets[label]
      stats = statistics(feats[size][lo:hi])
      real_stats[(label, size)] = stats
      if use_cache:
        _save_stats(path, *stats)

  gen_sel = np.concatenate([index[label][1] for label in labels])
  gen_feats = extract_features(
      np.asarray(gen_images)[gen_sel],
      sizes,
      batch_size=batch_size,
      progress=progress,
      desc="FID generated",
  )
  per_class = {size: {} for size in sizes}
  start = 0
  for label in labels:
    n = counts[label]
    for size in sizes:
      mu_g, sigma_g = statistics(gen_feats[size][start : start + n])
      per_class[size][label] = frechet_distance(
          mu_g, sigma_g, *real_stats[(label, size)]
      )
    start += n
  values = {s: np.array(list(per_class[s].values())) for s in sizes}
  return PerClassFID(
      per_class=per_class,
      mean={s: float(values[s].mean()) for s in sizes},
      min={s: float(values[s].min()) for s in sizes},
      max={s: float(values[s].max()) for s in sizes},
      counts=counts,
      feature_sizes=tuple(sizes),
      notes=notes,
  )
