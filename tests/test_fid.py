"""cign_jax.evaluation.fid: distance, statistics, preprocessing, per-class protocol.

These tests need neither PyTorch nor the Inception weights: the per-class
protocol runs with a stand-in feature extractor (a fixed random projection of
the pixels). `tests/test_inception.py` checks the network itself.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from cign_jax.evaluation import fid

# ---------------------------------------------------------------------------
# The distance.


def _random_gaussian(rng, dim):
  mu = rng.normal(size=dim)
  a = rng.normal(size=(dim, dim))
  sigma = a @ a.T / dim + 0.1 * np.eye(dim)
  return mu, sigma


def _fid_formula(mu1, s1, mu2, s2):
  """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 s2)), directly."""
  root = scipy.linalg.sqrtm(s1 @ s2)
  return (
      np.sum((mu1 - mu2) ** 2)
      + np.trace(s1)
      + np.trace(s2)
      - 2 * np.trace(root).real
  )


@pytest.mark.parametrize("dim", [1, 8, 64, 128])
def test_frechet_distance_matches_formula(dim):
  rng = np.random.default_rng(dim)
  mu1, s1 = _random_gaussian(rng, dim)
  mu2, s2 = _random_gaussian(rng, dim)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  want = _fid_formula(mu1, s1, mu2, s2)
  assert isinstance(got, float)
  assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
  # Independent check: the eigenvalues of s1 s2 (both SPD) are real and
  # positive, and tr(sqrtm(s1 s2)) is the sum of their square roots.
  eig = np.linalg.eigvals(s1 @ s2).real
  trace_root = np.sum(np.sqrt(eig))
  want2 = (
      np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
  )
  assert got == pytest.approx(want2, rel=1e-7, abs=1e-7)
  # Symmetric, and zero for identical Gaussians.
  assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-7)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  for dim, n in [(64, 500), (192, 400)]:
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, : dim // 2] *= 3.0
    assert abs(fid.fid_from_features(features, features)) < 1e-6


def test_frechet_distance_one_dimensional_closed_form():
  # For 1-D Gaussians FID = (m1 - m2)^2 + (s1 - s2)^2 (s = std).
  got = fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]])
  assert got == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2, rel=1e-12)


def test_non_finite_sqrtm_retries_with_offset(monkeypatch):
  rng = np.random.default_rng(1)
  mu1, s1 = _random_gaussian(rng, 5)
  mu2, s2 = _random_gaussian(rng, 5)
  calls = []
  real_sqrtm = fid._sqrtm

  def flaky(a):
    calls.append(a.copy())
    if len(calls) == 1:
      return np.full_like(a, np.nan)
    return real_sqrtm(a)

  monkeypatch.setattr(fid, "_sqrtm", flaky)
  with pytest.warns(RuntimeWarning, match="singular"):
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  offset = 1e-6 * np.eye(5)
  np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
  want = (
      np.sum((mu1 - mu2) ** 2)
      + np.trace(s1)
      + np.trace(s2)
      - 2 * np.trace(real_sqrtm((s1 + offset) @ (s2 + offset))).real
  )
  assert got == pytest.approx(want, rel=1e-12)


def test_complex_sqrtm(monkeypatch):
  mu = np.zeros(3)
  s = np.eye(3)
  monkeypatch.setattr(
      fid, "_sqrtm", lambda a: np.eye(3) + 1e-5j * np.ones((3, 3))
  )
  # Small imaginary part: the real part is used.
  assert fid.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)
  monkeypatch.setattr(fid, "_sqrtm", lambda a: np.eye(3) + 0.1j * np.eye(3))
  with pytest.raises(ValueError, match="imaginary"):
    fid.frechet_distance(mu, s, mu, s)


def test_statistics_float64_unbiased():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(50, 7)).astype(np.float32)
  mu, sigma = fid.statistics(features)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  x = features.astype(np.float64)
  centred = x - x.mean(axis=0)
  np.testing.assert_allclose(mu, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(
      sigma, centred.T @ centred / (50 - 1), rtol=1e-10, atol=1e-12
  )
  with pytest.raises(ValueError, match="at least 2"):
    fid.statistics(features[:1])


# ---------------------------------------------------------------------------
# Preprocessing.


def _reference_resize(image, out_h, out_w):
  """Bilinear, half-pixel centres (align_corners=False), no antialias: a
  plain loop over output pixels. image: (H, W, C) float64."""
  in_h, in_w, _ = image.shape
  out = np.zeros((out_h, out_w, image.shape[2]))

  def source(i, in_size, out_size):
    s = (i + 0.5) * in_size / out_size - 0.5
    s = max(s, 0.0)
    i0 = min(int(math.floor(s)), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    return i0, i1, s - i0

  for i in range(out_h):
    y0, y1, fy = source(i, in_h, out_h)
    for j in range(out_w):
      x0, x1, fx = source(j, in_w, out_w)
      top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
      bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
      out[i, j] = (1 - fy) * top + fy * bottom
  return out


@pytest.mark.parametrize(
    "in_hw,out_hw",
    [((28, 28), (299, 299)), ((28, 20), (61, 45)), ((40, 33), (17, 12))],
)
def test_resize_matches_reference_bilinear(in_hw, out_hw):
  rng = np.random.default_rng(3)
  images = rng.uniform(size=(2,) + in_hw + (3,)).astype(np.float32)
  got = np.asarray(fid.resize_bilinear(jnp.asarray(images), out_hw))
  for b in range(2):
    want = _reference_resize(images[b].astype(np.float64), *out_hw)
    np.testing.assert_allclose(got[b], want, atol=2e-6, rtol=0)


def test_resize_upsampling_matches_jax_image_resize():
  # jax.image.resize antialiases only when shrinking; growing 28 -> 299 it is
  # the same half-pixel bilinear interpolation.
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.uniform(size=(3, 28, 28, 1)).astype(np.float32))
  ours = fid.resize_bilinear(images, (299, 299))
  theirs = jax.image.resize(images, (3, 299, 299, 1), "bilinear")
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-6)


def test_resize_matches_torch_interpolate():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(5)
  images = rng.uniform(size=(2, 28, 28, 3)).astype(np.float32)
  ours = np.asarray(fid.resize_bilinear(jnp.asarray(images), (299, 299)))
  theirs = (
      torch.nn.functional.interpolate(
          torch.from_numpy(images).permute(0, 3, 1, 2),
          size=(299, 299),
          mode="bilinear",
          align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
  )
  np.testing.assert_allclose(ours, theirs, atol=2e-6)


def test_quantize():
  levels = np.arange(256, dtype=np.uint8)
  # The library's [-1, 1] range (x / 255 - 0.5) * 2 round-trips exactly.
  x = ((levels.astype(np.float32) / 255 - 0.5) * 2).reshape(1, 16, 16)
  np.testing.assert_array_equal(
      fid.quantize(x)[0, ..., 0], levels.reshape(16, 16)
  )
  q = fid.quantize(np.array([[[-1.0, 1.0, 0.0, -3.0, 2.0]]], np.float32))
  np.testing.assert_array_equal(q[0, 0, :, 0], [0, 255, 128, 0, 255])
  assert fid.quantize(np.zeros((2, 4, 4, 1), np.uint8)).dtype == np.uint8
  with pytest.raises(ValueError, match="NaN"):
    fid.quantize(np.full((1, 2, 2), np.nan, np.float32))
  with pytest.raises(ValueError, match="shape"):
    fid.quantize(np.zeros((2, 4, 4, 2), np.float32))


class _RecordingExtractor:
  """Stands in for inception.FeatureExtractor: records what it is given."""

  def __init__(self):
    self.seen = []

  def extract(self, pixels, max_features, preprocess=None, progress=None):
    self.seen.append((pixels, max_features, preprocess))
    if progress:
      progress(len(pixels))
    return {
        s: np.zeros((len(pixels), s), np.float32)
        for s in fid.FEATURE_SIZES
        if s <= max_features
    }


def test_preprocessing_quantises():
  rng = np.random.default_rng(6)
  u8 = rng.integers(0, 256, size=(3, 28, 28, 1)).astype(np.uint8)
  # Images within less than half a quantisation step (1/255 in [-1, 1]) of
  # the 8-bit levels quantise back to exactly those levels.
  x = (u8 / 255 - 0.5) * 2 + rng.uniform(-0.9, 0.9, u8.shape) / 255
  x = np.clip(x, -1, 1).astype(np.float32)
  q1 = fid.quantize(x)
  np.testing.assert_array_equal(q1, u8)
  # Feature extraction hands the network the 8-bit pixels, with the
  # pytorch-fid preprocessing, and only up to the deepest requested tap.
  recorder = _RecordingExtractor()
  feats = fid.extract_features(
      x[..., 0], (64, 192), extractor=recorder, progress=True
  )
  pixels, deepest, preprocess = recorder.seen[0]
  assert pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, u8)
  assert deepest == 192 and preprocess is fid.preprocess_pixels
  assert set(feats) == {64, 192}
  # The network input is a function of the 8-bit pixels only.
  out = np.asarray(fid.preprocess_pixels(jnp.asarray(q1)))
  assert out.shape == (3, 299, 299, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], out[..., 2])  # grey -> RGB
  assert out.min() >= -1.0 and out.max() <= 1.0
  # pytorch-fid's order: u8 / 255, resize, 2x - 1.
  want = _reference_resize(q1[0].astype(np.float64) / 255, 299, 299) * 2 - 1
  np.testing.assert_allclose(out[0, ..., :1], want, atol=3e-6)
  # Corner pixels of an upsampled image are the corner input pixels.
  np.testing.assert_allclose(
      out[0, 0, 0, 0], q1[0, 0, 0, 0] / 127.5 - 1, atol=1e-6
  )


class _PixelSumExtractor(_RecordingExtractor):
  """Records its inputs and answers, at every tap, each image's pixel sum
  and its first pixel: features that tell images apart."""

  def extract(self, pixels, max_features, preprocess=None, progress=None):
    super().extract(pixels, max_features, preprocess, progress)
    flat = pixels.reshape(len(pixels), -1).astype(np.float32)
    feats = np.stack([flat.sum(axis=1), flat[:, 0]], axis=1)
    return {
        s: np.tile(feats, (1, s // 2))
        for s in fid.FEATURE_SIZES
        if s <= max_features
    }


def test_repeated_images_are_extracted_once():
  rng = np.random.default_rng(3)
  a, b, c = rng.integers(0, 256, size=(3, 28, 28, 1)).astype(np.uint8)
  images = np.stack([a, b, a, a, c, b])
  recorder = _PixelSumExtractor()
  feats = fid.extract_features(images, (64, 2048), extractor=recorder)
  ((pixels, deepest, _),) = recorder.seen
  assert len(pixels) == 3 and deepest == 2048
  want = _PixelSumExtractor().extract(images, 2048)
  for size in (64, 2048):
    np.testing.assert_array_equal(feats[size], want[size])
  # Distinct images keep their order and their single pass.
  recorder = _PixelSumExtractor()
  fid.extract_features(images[[4, 1, 0]], (64,), extractor=recorder)
  np.testing.assert_array_equal(recorder.seen[0][0], images[[4, 1, 0]])


# ---------------------------------------------------------------------------
# Per-class protocol, with a stand-in feature extractor.


class _FakeFeatures:
  """Deterministic features from the 8-bit pixels (a random projection and
  tanh), counting the images it is asked for."""

  def __init__(self):
    rng = np.random.default_rng(123)
    self.proj = rng.normal(size=(28 * 28, 2048)).astype(np.float32) / 28
    self.calls = []

  def __call__(self, images, feature_sizes=(2048,), **kwargs):
    del kwargs
    pixels = fid.quantize(images).reshape(len(images), -1)
    self.calls.append(len(images))
    feats = np.tanh((pixels.astype(np.float32) / 127.5 - 1) @ self.proj)
    return {int(s): feats[:, :s] for s in feature_sizes}


def _toy_data(rng, per_class, classes=3):
  labels = np.repeat(np.arange(classes), per_class)
  rng.shuffle(labels)
  images = np.zeros((len(labels), 28, 28, 1), np.float32) - 1
  for i, label in enumerate(labels):
    row = 4 + 6 * label
    images[i, row : row + 4, 4:24, 0] = 1.0
    images[i] += rng.normal(scale=0.3, size=(28, 28, 1))
  return np.clip(images, -1, 1).astype(np.float32), labels


@pytest.fixture
def fake(monkeypatch):
  extractor = _FakeFeatures()
  monkeypatch.setattr(fid, "extract_features", extractor)
  return extractor


def test_per_class_fid_protocol_and_cache(fake, tmp_path):
  rng = np.random.default_rng(7)
  real, real_labels = _toy_data(rng, 250)
  gen, gen_labels = _toy_data(rng, 270)
  result = fid.per_class_fid(
      gen,
      gen_labels,
      real,
      real_labels,
      feature_sizes=(64, 192),
      cache_dir=tmp_path,
      progress=False,
  )
  assert result.feature_sizes == (64, 192) and result.notes == []
  assert result.counts == {0: 250, 1: 250, 2: 250}
  for size in (64, 192):
    values = list(result.per_class[size].values())
    assert len(values) == 3 and all(np.isfinite(values))
    assert result.mean[size] == pytest.approx(np.mean(values))
    assert result.min[size] == min(values)
    assert result.max[size] == max(values)
  assert fake.calls == [750, 750]  # real once, generated once
  assert len(list(tmp_path.glob("*.npz"))) == 6

  # The same protocol by hand for one class and size.
  real_idx = np.flatnonzero(real_labels == 1)[:250]
  gen_idx = np.flatnonzero(gen_labels == 1)[:250]
  want = fid.fid_from_features(
      fake(real[real_idx], (192,))[192], fake(gen[gen_idx], (192,))[192]
  )
  assert result.per_class[192][1] == pytest.approx(want, rel=1e-10)

  # Second call: the reference statistics come from the cache.
  fake.calls.clear()
  again = fid.per_class_fid(
      gen,
      gen_labels,
      real,
      real_labels,
      feature_sizes=(64, 192),
      cache_dir=tmp_path,
      progress=False,
  )
  assert fake.calls == [750]
  assert again.per_class == result.per_class

  # A changed real image invalidates that class's statistics only.
  real2 = real.copy()
  real2[np.flatnonzero(real_labels == 2)[0]] *= -1
  fake.calls.clear()
  fid.per_class_fid(
      gen,
      gen_labels,
      real2,
      real_labels,
      feature_sizes=(64, 192),
      cache_dir=tmp_path,
      progress=False,
  )
  assert fake.calls == [250, 750]


def test_per_class_fid_default_sizes_skip_2048(fake, tmp_path, monkeypatch):
  # Only which sizes get computed matters here: a stub distance keeps the
  # 768-dimensional matrix square roots out of the test's time.
  monkeypatch.setattr(fid, "frechet_distance", lambda *args: 1.0)
  rng = np.random.default_rng(11)
  real, real_labels = _toy_data(rng, 770, classes=2)
  result = fid.per_class_fid(
      real, real_labels, real, real_labels, cache_dir=tmp_path, progress=False
  )
  assert result.feature_sizes == (64, 192, 768)
  assert len(result.notes) == 1 and "FID2048 skipped" in result.notes[0]
  assert result.counts == {0: 770, 1: 770}
  assert fake.calls == [1540, 1540]


def test_per_class_fid_same_images_is_zero(fake, tmp_path):
  rng = np.random.default_rng(8)
  real, labels = _toy_data(rng, 300, classes=2)
  result = fid.per_class_fid(
      real,
      labels,
      real,
      labels,
      feature_sizes=(64, 192),
      cache_dir=tmp_path,
      progress=False,
  )
  for size in (64, 192):
    assert max(abs(v) for v in result.per_class[size].values()) < 1e-6


def test_per_class_fid_max_per_class(fake, tmp_path):
  rng = np.random.default_rng(9)
  real, real_labels = _toy_data(rng, 300, classes=2)
  gen, gen_labels = _toy_data(rng, 250, classes=2)
  result = fid.per_class_fid(
      gen,
      gen_labels,
      real,
      real_labels,
      feature_sizes=(64, 192),
      max_per_class=220,
      cache_dir=tmp_path,
      progress=False,
  )
  assert result.counts == {0: 220, 1: 220}
  result = fid.per_class_fid(
      gen,
      gen_labels,
      real,
      real_labels,
      feature_sizes=(64,),
      cache_dir=tmp_path,
      progress=False,
  )
  assert result.counts == {0: 250, 1: 250}


def test_too_few_samples_is_an_error(fake, tmp_path):
  rng = np.random.default_rng(10)
  real, real_labels = _toy_data(rng, 300)
  gen, gen_labels = _toy_data(rng, 300)
  # Default sizes include 768: 300 samples per class is too few.
  with pytest.raises(ValueError, match="too few for FID at 768"):
    fid.per_class_fid(
        gen, gen_labels, real, real_labels, cache_dir=tmp_path, progress=False
    )
  # 2048 asked for explicitly with 1000 per class at most: an error too.
  real, real_labels = _toy_data(rng, 1000, classes=1)
  with pytest.raises(ValueError, match="too few for FID at 2048"):
    fid.per_class_fid(
        real,
        real_labels,
        real,
        real_labels,
        feature_sizes=(64, 2048),
        cache_dir=tmp_path,
        progress=False,
    )
  assert fake.calls == []  # checked before any feature is computed
  with pytest.raises(ValueError, match="too few"):
    fid.fid(real[:100], real[:100], feature_sizes=(192,), progress=False)
  with pytest.raises(ValueError, match="no generated images"):
    fid.per_class_fid(
        gen[gen_labels != 1],
        gen_labels[gen_labels != 1],
        real,
        np.zeros(len(real), int) + 1,
        cache_dir=tmp_path,
        progress=False,
    )
  with pytest.raises(ValueError, match="feature sizes"):
    fid.per_class_fid(
        gen,
        gen_labels,
        gen,
        gen_labels,
        feature_sizes=(100,),
        cache_dir=tmp_path,
        progress=False,
    )
