"""Runs the notebooks headless with small settings, and checks how they are
stored (no outputs) and how the quickstart installs (independent of the
working directory).

The quickstart runs once per module (a fixture), offline on random strokes
with the tiny config; the explore notebook then loads that run, so the two
tests train one model between them.
"""

import os
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("quickstart.ipynb", "explore.ipynb")


def _read(name):
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def _parameters_cell(nb):
  cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(cells) == 1, "a notebook has exactly one cell tagged 'parameters'"
  return cells[0]


def _install_cell(nb):
  cells = [c for c in nb.cells if c.cell_type == "code" and "pip" in c.source]
  assert len(cells) == 1, "a notebook has exactly one install cell"
  return cells[0]


def _execute(nb, parameters: str, cwd: str):
  """Replaces the parameters cell and runs the notebook in `cwd`, in a kernel
  that sees this checkout (as an installed package would be seen)."""
  _parameters_cell(nb).source = parameters
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH", "")) if p
  )
  env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = NotebookClient(
      nb,
      timeout=1800,
      kernel_name="python3",
      resources={"metadata": {"path": cwd}},
  )
  client.execute(env=env)
  return nb


def _text(nb):
  return "".join(
      o.get("text", "")
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.get("outputs", [])
  )


def _images(nb):
  return [
      o
      for c in nb.cells
      if c.cell_type == "code"
      for o in c.get("outputs", [])
      if "image/png" in o.get("data", {})
  ]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  """The quickstart executed from a folder that is not notebooks/: 2 steps of
  the tiny config on random strokes. Returns (executed notebook, workdir)."""
  elsewhere = str(tmp_path_factory.mktemp("elsewhere"))
  workdir = os.path.join(str(tmp_path_factory.mktemp("quickstart")), "run")
  parameters = (
      # A source that cannot be installed: the install cell must not try.
      "PACKAGE_SOURCE = 'git+https://invalid.invalid/cign_jax'\n"
      "CONFIG = 'quick.py:tiny'\n"
      "NUM_STEPS = 2\n"
      "DATA = 'synthetic'\n"
      f"WORKDIR = {workdir!r}\n"
      "LABEL = 3\n"
  )
  nb = _execute(_read("quickstart.ipynb"), parameters, elsewhere)
  return nb, workdir


def test_quickstart_notebook_runs(quickstart_run):
  nb, workdir = quickstart_run
  text = _text(nb)
  assert "cign_jax is importable already: nothing to install" in text
  assert "installing" not in text
  assert os.path.join("cign_jax", "configs") in text
  assert "using CPU" in text or "using GPU" in text
  assert "trained to step 2" in text
  assert "(8, 28, 28, 1)" in text
  assert len(_images(nb)) >= 2  # the grid and the chosen label's figure
  assert os.path.isfile(os.path.join(workdir, "samples.png"))


@pytest.mark.data  # MNIST and Fashion-MNIST test images, classifier, FID
def test_explore_notebook_runs(quickstart_run, tmp_path):
  _, workdir = quickstart_run
  parameters = (
      "PACKAGE_SOURCE = 'git+https://invalid.invalid/cign_jax'\n"
      f"WORKDIR = {workdir!r}\n"
      "TRAIN_CONFIG = 'quick.py:tiny'\n"
      "TRAIN_STEPS = 2\n"
      f"TRAIN_WORKDIR = {str(tmp_path / 'unused')!r}\n"
      # Few samples, so no FID (it needs 64 per class; test_evaluate runs
      # it): the Inception's 2048-d pass over 160 generated and 160 real
      # images instead of 640 each, the suite's longest test otherwise.
      "FID_PER_CLASS = 16\n"
      "SEED = 0\n"
  )
  nb = _execute(_read("explore.ipynb"), parameters, str(tmp_path))
  text = _text(nb)
  assert f"{workdir}: step 2" in text  # the given run, not a new one
  assert not os.path.exists(tmp_path / "unused")
  # Seven plots: labels, f^n images, f^n distances, damaged digits,
  # non-digits, the noise path, the per-label metric bars; each captioned.
  assert len(_images(nb)) == 7
  assert text.count("Look for:") == 7
  for line in ("z → f(z): mean RMS distance", "f²(z) → f³(z): mean RMS"):
    assert line in text
  assert "| label accuracy |" in text and "| KID |" in text
  assert "| recall (k=3) |" in text and "| near-duplicates |" in text
  assert "| FID" not in text
  assert "16 samples per class" in text


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
  nb = _read(name)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [], f"{name}: a cell has stored outputs"
      assert (
          cell.execution_count is None
      ), f"{name}: a cell has an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_install_cell_works_from_any_folder(name, tmp_path):
  """The install cell, run from an unrelated folder with cign_jax importable,
  installs nothing and finds the packaged configs."""
  nb = _read(name)
  script = "\n".join(
      [
          "import subprocess",
          "def refuse(*args, **kwargs):",
          "    raise AssertionError(f'the install cell ran {args!r}')",
          "subprocess.run = subprocess.call = subprocess.check_call = refuse",
          _parameters_cell(nb).source,
          "PACKAGE_SOURCE = 'git+https://invalid.invalid/cign_jax'",
          _install_cell(nb).source,
          "print('CONFIG_DIR', CONFIG_DIR)",
      ]
  )
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT
  proc = subprocess.run(
      [sys.executable, "-c", script],
      cwd=str(tmp_path),
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "nothing to install" in proc.stdout
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("CONFIG_DIR ")]
  config_dir = line.split(" ", 1)[1]
  assert os.path.samefile(config_dir, os.path.join(ROOT, "cign_jax", "configs"))
  assert "cign_jax" not in os.listdir(tmp_path)


# Runs the install cell where `import cign_jax` fails (a meta path finder
# hides it) and pip is replaced by a recorder: prints what would be installed.
_HIDDEN_PACKAGE = r"""
import subprocess, sys

# Wraps a meta path finder so that it finds no `cign_jax` (whether it comes
# from the path or from an editable install's own finder).
class Hidden:

  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "cign_jax":
      return None
    return self.finder.find_spec(name, path, target)

  def invalidate_caches(self):
    if hasattr(self.finder, "invalidate_caches"):
      self.finder.invalidate_caches()

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]

class Installed(Exception):
  pass

def record(args, **kwargs):
  print("PIP", args[1:])
  raise Installed()

subprocess.run = record
PACKAGE_SOURCE = sys.argv[1]
try:
  exec(sys.stdin.read())
except Installed:
  pass
except ValueError as e:
  print("ERROR", e)
"""


@pytest.mark.parametrize(
    "source,requirement",
    [
        (
            "git+https://github.com/someone/cign_jax",
            r"cign_jax(\[cuda\])? @ git\+https://github.com/someone/cign_jax",
        ),
        (
            "/content/cign_jax-0.1.0-py3-none-any.whl",
            r"/content/cign_jax-0\.1\.0-py3-none-any\.whl(\[cuda\])?",
        ),
    ],
)
def test_install_cell_installs_package_source(source, requirement, tmp_path):
  cell = _install_cell(_read("quickstart.ipynb")).source
  proc = subprocess.run(
      [sys.executable, "-c", _HIDDEN_PACKAGE, source],
      input=cell,
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  (line,) = [l for l in proc.stdout.splitlines() if l.startswith("PIP ")]
  args = eval(line[4:])  # the argument list, as repr() printed it
  assert args[:3] == ["-m", "pip", "install"]
  assert re.fullmatch(requirement, args[-1]), args


def test_install_cell_rejects_the_placeholder_source(tmp_path):
  cell = _install_cell(_read("quickstart.ipynb")).source
  source = _parameters_cell(_read("quickstart.ipynb")).source
  (placeholder,) = re.findall(r'PACKAGE_SOURCE = "(.*)"', source)
  proc = subprocess.run(
      [sys.executable, "-c", _HIDDEN_PACKAGE, placeholder],
      input=cell,
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "PIP" not in proc.stdout
  assert "ERROR cign_jax is not installed" in proc.stdout
  assert "PACKAGE_SOURCE" in proc.stdout
