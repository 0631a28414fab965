"""The package as a user installs it: a wheel of this checkout, installed (not
editable) into a fresh virtual environment, trains from outside the checkout
with the config files that travel inside the package.

Needs (marker `wheel`): setuptools and wheel in the test environment (the
wheel is built with `--no-build-isolation`, so nothing is downloaded). The
fresh environment has no pip packages of its own: a .pth file puts this
environment's site-packages on its path for the dependencies, whose .pth
files (the editable install of cign_jax among them) are not processed there,
so `import cign_jax` finds only the installed wheel.
"""

import os
import subprocess
import sys
import sysconfig
import venv

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
PAPER_CONFIGS = (
    "channel_small",
    "channel_large",
    "filter_small",
    "filter_large",
)

pytestmark = pytest.mark.wheel


def _clean_env():
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
  }
  env["PYTHONPATH"] = ""
  return env


def _run(cmd, cwd, timeout=600):
  result = subprocess.run(
      cmd,
      cwd=cwd,
      env=_clean_env(),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert result.returncode == 0, (
      f"{cmd} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n"
      f"{result.stderr[-5000:]}"
  )
  return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(python of the fresh environment, a directory outside the checkout)."""
  base = tmp_path_factory.mktemp("wheel")
  dist = base / "dist"
  _run(
      [
          sys.executable,
          "-m",
          "pip",
          "wheel",
          "--no-deps",
          "--no-build-isolation",
          "--no-index",
          "-q",
          "-w",
          str(dist),
          ROOT,
      ],
      cwd=str(base),
  )
  wheels = [f for f in os.listdir(dist) if f.endswith(".whl")]
  assert len(wheels) == 1, wheels
  env_dir = base / "env"
  venv.EnvBuilder(with_pip=False).create(str(env_dir))
  python = str(env_dir / "bin" / "python")
  _run(
      [
          sys.executable,
          "-m",
          "pip",
          "--python",
          python,
          "install",
          "--no-deps",
          "--no-index",
          "-q",
          str(dist / wheels[0]),
      ],
      cwd=str(base),
  )
  site = _run(
      [
          python,
          "-c",
          "import sysconfig; " "print(sysconfig.get_paths()['purelib'])",
      ],
      cwd=str(base),
  ).stdout.strip()
  with open(os.path.join(site, "test_dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  work = base / "work"
  work.mkdir()
  where = _run(
      [
          python,
          "-c",
          "import cign_jax, cign_jax.configs as c, os; "
          "print(os.path.dirname(cign_jax.__file__)); "
          "print(os.path.dirname(c.__file__))",
      ],
      cwd=str(work),
  ).stdout.split()
  assert where[0].startswith(
      str(env_dir)
  ), f"cign_jax imported from {where[0]}, not from the installed wheel"
  assert not where[0].startswith(ROOT)
  for name in ("quick", *PAPER_CONFIGS):
    assert os.path.isfile(os.path.join(where[1], f"{name}.py")), name
  assert os.path.isfile(
      os.path.join(where[0], "kernels", "native", "conv_kernels.cc")
  )
  return python, str(work), where[1]


def test_paper_configs_load_and_the_first_trains_a_step(installed):
  """The paper configs load from the installed package; the first
  (channel_small, the paper's base model at its full size) trains one step
  (batch 8, on the small synthetic dataset). One config only: a first step
  of each large model would cost CI about a minute apiece on 2 cores."""
  python, work, configs_dir = installed
  script = f"""
import os, sys
sys.path.append({TESTS!r})  # tests/synthetic.py only; cign_jax is the wheel's
import synthetic
from cign_jax import config as config_lib, train
for name in {PAPER_CONFIGS!r}:
  config = config_lib.load_config_file(os.path.join({configs_dir!r}, name + ".py"))
  print(name, "loaded", config.model.conditioning, config.model.latent_dim)
config = config_lib.load_config_file(os.path.join({configs_dir!r},
                                                  "channel_small.py"))
config.num_train_steps = 1
config.batch_size = 8
# The paper configs keep the best checkpoint by validation loss: a test split.
state = train.train_and_evaluate(
    config, "run", dataset={{"train": synthetic.dataset(),
                            "test": synthetic.dataset(seed=1)}})
assert os.path.isfile(os.path.join("run", "samples.png"))
print("trained to step", int(state.step))
"""
  result = _run([python, "-c", script], cwd=work, timeout=900)
  for name in PAPER_CONFIGS:
    assert f"{name} loaded" in result.stdout
  assert "trained to step 1" in result.stdout


@pytest.mark.data
def test_train_command_with_the_packaged_quick_config(installed):
  """`python -m cign_jax.main --config=<installed package>/configs/quick.py:tiny`
  from outside the checkout, on MNIST, then `python -m cign_jax.sample`."""
  python, work, configs_dir = installed
  workdir = os.path.join(work, "tiny")
  _run(
      [
          python,
          "-m",
          "cign_jax.main",
          f"--config={os.path.join(configs_dir, 'quick.py')}:tiny",
          f"--workdir={workdir}",
      ],
      cwd=work,
  )
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))
  _run(
      [
          python,
          "-m",
          "cign_jax.sample",
          f"--workdir={workdir}",
          f"--out={work}/s.npz",
          "--labels=1",
          "--num_per_label=2",
      ],
      cwd=work,
  )
  assert os.path.isfile(os.path.join(work, "s.npz"))
