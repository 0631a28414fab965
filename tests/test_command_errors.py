"""Bad command lines and bad input files end on one plain line that names
the flag or file and what would be valid, and nothing is accepted that is
not what it claims to be."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cign_jax import commands
from cign_jax import models
from cign_jax import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_command_fails(tmp_path, *args):
  """The last stderr line and exit code of `python -m cign_jax.main ARGS`."""
  workdir = tmp_path / "w"
  result = subprocess.run(
      [sys.executable, "-m", "cign_jax.main", f"--workdir={workdir}", *args],
      env=dict(os.environ, PYTHONPATH=ROOT),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert not workdir.exists()  # refused before anything was written
  return result.returncode, lines[-1], result.stderr


@pytest.mark.parametrize("form", ["equals", "separate"])
def test_missing_config_file_is_named(tmp_path, form):
  path = str(tmp_path / "nonexistent.py")
  args = [f"--config={path}"] if form == "equals" else ["--config", path]
  rc, last, stderr = _train_command_fails(tmp_path, *args)
  assert rc == 2
  assert last.startswith(f"error: --config={path}: the config file"), last
  assert "does not exist" in last and "get_config()" in last
  assert "Traceback" not in stderr


def test_config_directory_is_named(tmp_path):
  rc, last, _ = _train_command_fails(tmp_path, f"--config={ROOT}/configs")
  assert rc == 2 and "is a directory" in last, last


def test_unknown_config_variant_is_the_last_line(tmp_path):
  """get_config's own error, not ml_collections' embedded traceback, ends
  the output."""
  rc, last, _ = _train_command_fails(
      tmp_path, f"--config={ROOT}/configs/quick.py:tinyy"
  )
  assert rc == 2
  assert last.startswith("error: "), last
  assert "unknown variant 'tinyy'" in last and "'tiny'" in last, last
  assert last.endswith("(see --help)")


def _npz_error(path):
  with pytest.raises(ValueError) as err:
    sampling.open_npz(str(path), "the inputs file")
  line, known = commands.plain_message(err.value)
  assert known  # printed without a traceback
  assert "the inputs file" in line and str(path) in line, line
  return line


def _saved(tmp_path, name="in.npz", **arrays):
  path = tmp_path / name
  np.savez(path, **arrays)
  return path


def test_truncated_npz_names_flag_and_file(tmp_path):
  path = _saved(
      tmp_path, images=np.zeros((4, 28, 28, 1), np.float32), labels=np.arange(4)
  )
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  assert "cannot be read as an .npz" in _npz_error(path)


def test_damaged_npz_member_fails_on_open(tmp_path):
  """A flipped byte inside an array fails the zip's CRC when the file is
  opened, not later while the arrays are used."""
  images = np.linspace(-1, 1, 4 * 28 * 28, dtype=np.float32)
  path = _saved(tmp_path, images=images.reshape(4, 28, 28, 1))
  data = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo("images.npy")
  # Past the local header and the .npy header: inside the float data.
  data[info.header_offset + 200 + 30] ^= 0xFF
  path.write_bytes(bytes(data))
  assert "cannot be read as an .npz" in _npz_error(path)


def test_text_file_is_not_called_pickled(tmp_path):
  path = tmp_path / "notes.npz"
  path.write_text("hello world\n")
  line = _npz_error(path)
  assert "is not an .npz" in line and "pickle" not in line


def test_single_array_and_empty_file(tmp_path):
  path = tmp_path / "one.npz"
  with open(path, "wb") as f:
    np.save(f, np.zeros(3))
  assert "single array (.npy)" in _npz_error(path)
  empty = tmp_path / "empty.npz"
  empty.write_bytes(b"")
  assert "is empty" in _npz_error(empty)


def test_object_arrays_are_refused(tmp_path):
  path = _saved(tmp_path, labels=np.array([{"a": 1}], dtype=object))
  assert "object arrays" in _npz_error(path)


def test_good_npz_reads_every_array(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (3, 28, 28, 1))
  path = _saved(tmp_path, images=images, labels=np.array([0, 5, 9]))
  arrays = sampling.open_npz(str(path), "the inputs file")
  assert sorted(arrays) == ["images", "labels"]
  np.testing.assert_array_equal(arrays["images"], images)
  np.testing.assert_array_equal(arrays["labels"], [0, 5, 9])


@pytest.mark.parametrize(
    "labels,dtype",
    [
        (np.array(["a", "b"]), "<U1"),
        (np.array([True, False]), "bool"),
        (np.array([b"1", b"2"]), "|S1"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(labels, dtype):
  with pytest.raises(ValueError, match=f"integer class indices.*{dtype}"):
    models.check_labels(labels, 10, 2)


def test_whole_valued_float_labels_are_still_accepted():
  np.testing.assert_array_equal(
      models.check_labels(np.array([0.0, 3.0]), 10, 2), [0, 3]
  )
  with pytest.raises(ValueError, match="labels must be integers"):
    models.check_labels(np.array([0.5, 3.0]), 10, 2)


def test_no_images_is_an_error():
  with pytest.raises(ValueError, match=r"no images: .*\(0, 28, 28, 1\)"):
    models.check_images(np.zeros((0, 28, 28, 1), np.float32))


def test_a_clean_stop_ends_on_its_own_line_and_status():
  """What the train command and the Table 3 script do with a SIGTERM stop
  (`commands.guarded`): its message as the last line, no `error:`, and the
  status a scheduler reads as "ended by SIGTERM"."""
  code = (
      "from cign_jax import commands, stopping\n"
      "def main(argv):\n"
      "  raise stopping.StoppedBySignal(7)\n"
      "commands.guarded(main)([])\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", code],
      env=dict(os.environ, PYTHONPATH=ROOT),
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 143
  last = [l for l in result.stderr.splitlines() if l.strip()][-1]
  assert last == (
      "stopped by SIGTERM at step 7; checkpoint saved; run the "
      "same command to resume"
  ), last
