"""The declared dependencies (setup.cfg) match the imports of the package.

Every third-party module that `cign_jax/` imports belongs to a declared
distribution; every declared distribution is imported, or its comment in
setup.cfg says "run time:" and why; the tests import only what the package
or the extras declare.
"""

import ast
import configparser
import importlib.metadata
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_CFG = os.path.join(ROOT, "setup.cfg")


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
  return _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def _requirements(value: str) -> list[str]:
  return [
      _requirement_name(line)
      for line in value.splitlines()
      if line.strip() and not line.strip().startswith("#")
  ]


def _setup_cfg():
  parser = configparser.ConfigParser()
  parser.read(SETUP_CFG)
  install = _requirements(parser["options"]["install_requires"])
  extras = {
      name: _requirements(value)
      for name, value in parser["options.extras_require"].items()
  }
  return install, extras


def _run_time_only() -> set[str]:
  """Declared names whose comment block in setup.cfg starts "run time:"."""
  names, comment = set(), ""
  with open(SETUP_CFG) as f:
    for line in f:
      stripped = line.strip()
      if stripped.startswith("#"):
        comment = (comment + " " + stripped.lstrip("# ")).strip()
      elif stripped and line[0].isspace():
        if comment.startswith("run time:"):
          names.add(_requirement_name(stripped))
        comment = ""
      else:
        comment = ""
  return names


def _imported_top_level(directory: str) -> dict[str, str]:
  """Top-level module name -> a file importing it, stdlib and local excluded."""
  found = {}
  for dirpath, _, filenames in os.walk(directory):
    for filename in filenames:
      if not filename.endswith(".py"):
        continue
      path = os.path.join(dirpath, filename)
      with open(path) as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          modules = [node.module]
        else:
          continue
        for module in modules:
          top = module.split(".")[0]
          if top not in sys.stdlib_module_names and top != "cign_jax":
            found.setdefault(top, os.path.relpath(path, ROOT))
  return found


def _distributions(imports: dict[str, str]) -> dict[str, set[str]]:
  """Top-level module -> the installed distributions that provide it."""
  provided_by = importlib.metadata.packages_distributions()
  return {
      module: {_normalise(d) for d in provided_by.get(module, [])}
      for module in imports
  }


def test_setup_cfg_is_the_metadata_and_pyproject_only_the_build():
  install, extras = _setup_cfg()
  assert "jax" in install and set(extras) == {
      "cuda",
      "cuda12",
      "cuda13",
      "tf",
      "torch",
      "test",
  }
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    pyproject = f.read()
  assert "[project]" not in pyproject and "[build-system]" in pyproject


def test_every_import_of_the_package_is_declared():
  install, _ = _setup_cfg()
  imports = _imported_top_level(os.path.join(ROOT, "cign_jax"))
  undeclared = {
      module: (imports[module], sorted(dists))
      for module, dists in _distributions(imports).items()
      if not dists & set(install)
  }
  assert not undeclared, (
      f"imported by cign_jax but not in setup.cfg install_requires "
      f"(module: (file, distributions)): {undeclared}"
  )


def test_every_declared_dependency_is_used():
  install, _ = _setup_cfg()
  imports = _imported_top_level(os.path.join(ROOT, "cign_jax"))
  imported = set().union(*_distributions(imports).values())
  run_time = _run_time_only()
  unused = [
      name for name in install if name not in imported and name not in run_time
  ]
  assert not unused, (
      f"declared in setup.cfg but imported nowhere in cign_jax/ and not "
      f"marked '# run time: <who needs it>': {unused}"
  )
  # A "run time:" dependency must really not be imported (else drop the
  # comment), and must be installed for whoever needs it.
  for name in run_time:
    assert name not in imported, f"{name} is imported; its comment is stale"
    importlib.metadata.distribution(name)


def test_extras():
  install, extras = _setup_cfg()
  # jax[cuda12] / jax[cuda13]: the CUDA plugin only; `cuda` is CUDA 12.
  assert extras["cuda"] == extras["cuda12"] == extras["cuda13"] == ["jax"]
  parser = configparser.ConfigParser()
  parser.read(SETUP_CFG)
  declared = parser["options.extras_require"]
  for name, cuda in (
      ("cuda", "cuda12"),
      ("cuda12", "cuda12"),
      ("cuda13", "cuda13"),
  ):
    assert f"jax[{cuda}]" in declared[name], name
  assert extras["tf"] == ["tensorflow-cpu"]
  assert extras["torch"] == ["torch"]
  assert "tensorflow" not in install and "tensorflow-cpu" not in install
  assert "torch" not in install
  # The tests import only what the package, its extras or the test's own
  # directory provide.
  declared = set(install).union(*extras.values())
  imports = _imported_top_level(os.path.join(ROOT, "tests"))
  local = {
      f[:-3]
      for f in os.listdir(os.path.join(ROOT, "tests"))
      if f.endswith(".py")
  }
  undeclared = {
      module: (imports[module], sorted(dists))
      for module, dists in _distributions(imports).items()
      if module not in local and not dists & declared
  }
  assert (
      not undeclared
  ), f"imported by the tests but declared nowhere in setup.cfg: {undeclared}"


def test_the_checker_sees_known_imports():
  imports = _imported_top_level(os.path.join(ROOT, "cign_jax"))
  assert {"jax", "flax", "numpy", "tensorboard"} <= set(imports)
  assert "os" not in imports and "cign_jax" not in imports
  assert "orbax-checkpoint" in _distributions(imports)["orbax"]
  assert "importlib-resources" in _run_time_only()


def test_suite_collects_without_the_torch_extra():
  """`pip install -e ".[test]"` has no PyTorch: every test module still
  imports, the PyTorch cross-checks skipping themselves."""
  import subprocess  # pylint: disable=import-outside-toplevel

  code = (
      "import sys; sys.modules['torch'] = None; import pytest; "
      "sys.exit(pytest.main(['-q', '--collect-only', '-p', "
      "'no:cacheprovider', sys.argv[1]]))"
  )
  result = subprocess.run(
      [sys.executable, "-c", code, os.path.join(ROOT, "tests")],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "error" not in result.stdout.splitlines()[-1].lower()
