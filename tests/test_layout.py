"""The package's layout: no import cycle, and imports point one way.

The import graph is read from the source with `ast` (every import statement,
also those inside functions), so nothing is imported to build it. Layers,
from the top: commands -> evaluation / interop -> train, checkpoints,
sampling -> models, losses, train_step -> ops -> kernels; data and config
stand beside the core (see docs/design.md).
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(ROOT, "cign_jax")

# `python -m cign_jax.main` / sample / evaluate / convert / classifier: the
# commands' names; each only runs a module of commands/.
ENTRY_POINTS = {
    "cign_jax.main",
    "cign_jax.sample",
    "cign_jax.evaluate",
    "cign_jax.convert",
    "cign_jax.classifier",
}
CORE = {
    "cign_jax.config",
    "cign_jax.utils",
    "cign_jax.ops",
    "cign_jax.models",
    "cign_jax.dropout",
    "cign_jax.losses",
    "cign_jax.train_step",
    "cign_jax.train",
    "cign_jax.checkpoints",
    "cign_jax.sampling",
    "cign_jax.sharding",
    "cign_jax.metric_writers",
    "cign_jax.validation",
}
SIDE_PACKAGES = (
    "cign_jax.commands",
    "cign_jax.evaluation",
    "cign_jax.interop",
    "cign_jax.sweeps",  # many runs in one program, above train
)
CORE.add("cign_jax.run_dir")  # lock, atomic writes, digests of a run dir
CORE.add("cign_jax.grouped")  # the batched loss calls (an alternative)
CORE.add("cign_jax.step_programs")  # the compiled train steps a process keeps
CORE.add("cign_jax.stopping")  # SIGTERM and time limits, agreed by processes


def _module_name(path):
  rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
  if rel[-1] == "__init__":
    rel = rel[:-1]
  return ".".join(rel)


def _modules():
  found = {}
  for folder, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        found[_module_name(path)] = path
  return found


def _resolve(name, modules):
  """The longest prefix of a dotted name that is one of our modules."""
  parts = name.split(".")
  for end in range(len(parts), 0, -1):
    candidate = ".".join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def import_graph():
  """{module: set of cign_jax modules it imports}."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    targets = set()
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = module.split(".")
          if not is_package:
            anchor = anchor[:-1]
          anchor = anchor[: len(anchor) - (node.level - 1)]
          base = ".".join(anchor + ([base] if base else []))
        # `from package import name`: the submodule if there is one.
        names = [f"{base}.{alias.name}" for alias in node.names]
      for name in names:
        if name.split(".")[0] != "cign_jax":
          continue
        target = _resolve(name, modules)
        if target is not None and target != module:
          targets.add(target)
    graph[module] = targets
  return graph


def _in(module, package):
  return module == package or module.startswith(package + ".")


def _find_cycle(graph):
  state = {}
  stack = []

  def visit(node):
    state[node] = "active"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "active":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_graph_sees_known_imports():
  """The parser finds imports written in each of the styles used."""
  graph = import_graph()
  # from cign_jax import ops
  assert "cign_jax.ops" in graph["cign_jax.models.layers"]
  assert "cign_jax.kernels.cpu_conv" in graph["cign_jax.ops"]
  assert "cign_jax.data.reader" in graph["cign_jax.train"]
  # in a function
  assert "cign_jax.evaluation.in_loop" in graph["cign_jax.commands.train"]
  assert "cign_jax.data" in graph["cign_jax.data.reader"]  # a package's name


def test_no_import_cycle():
  assert _find_cycle(import_graph()) is None, _find_cycle(import_graph())


def test_the_detector_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
      "a",
      "b",
      "c",
      "a",
  ]
  assert _find_cycle({"a": {"b"}, "b": set()}) is None


def _offending(rule):
  graph = import_graph()
  return sorted(
      (module, target)
      for module, targets in graph.items()
      for target in targets
      if rule(module, target)
  )


@pytest.mark.parametrize("package", SIDE_PACKAGES)
def test_core_never_imports_side_packages(package):
  bad = _offending(lambda m, t: m in CORE and _in(t, package))
  assert not bad, bad


def test_every_core_module_is_listed():
  """A new module at the top level is a decision: core, or a sub-package."""
  top = {
      m
      for m, path in _modules().items()
      if m.count(".") == 1 and not path.endswith("__init__.py")
  }
  assert top <= CORE | ENTRY_POINTS, top - CORE - ENTRY_POINTS


def test_only_commands_import_commands():
  bad = _offending(
      lambda m, t: _in(t, "cign_jax.commands")
      and not _in(m, "cign_jax.commands")
      and m not in ENTRY_POINTS
      and m != "cign_jax.data.__main__"
  )
  assert not bad, bad


def test_evaluation_and_interop_below_commands():
  bad = _offending(
      lambda m, t: (_in(m, "cign_jax.evaluation") or _in(m, "cign_jax.interop"))
      and _in(t, "cign_jax.commands")
  )
  assert not bad, bad


def test_kernels_import_only_kernels_and_utils():
  bad = _offending(
      lambda m, t: _in(m, "cign_jax.kernels")
      and not _in(t, "cign_jax.kernels")
      and t != "cign_jax.utils"
  )
  assert not bad, bad


def test_ops_and_models_do_not_import_training():
  training = (
      "cign_jax.train",
      "cign_jax.train_step",
      "cign_jax.checkpoints",
      "cign_jax.sampling",
      "cign_jax.sharding",
      "cign_jax.data",
  )
  lower = (
      "cign_jax.ops",
      "cign_jax.models",
      "cign_jax.losses",
      "cign_jax.dropout",
  )
  bad = _offending(lambda m, t: m in lower and any(_in(t, p) for p in training))
  assert not bad, bad


def test_data_and_configs_depend_only_on_config_and_utils():
  bad = _offending(
      lambda m, t: (_in(m, "cign_jax.data") or _in(m, "cign_jax.configs"))
      and m != "cign_jax.data.__main__"
      and not _in(t, "cign_jax.data")
      # a config may build on another (fashion_mnist.py:quick on quick.py)
      and not (_in(m, "cign_jax.configs") and _in(t, "cign_jax.configs"))
      and t not in ("cign_jax.config", "cign_jax.utils")
  )
  assert not bad, bad


def test_the_package_never_imports_torch():
  """PyTorch is a test oracle (tests/torch_reference.py), not a dependency:
  the PyTorch archives are read without it."""
  bad = []
  for module, path in _modules().items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
      names = (
          [a.name for a in node.names]
          if isinstance(node, ast.Import)
          else [node.module or ""]
          if isinstance(node, ast.ImportFrom)
          else []
      )
      bad += [(module, n) for n in names if n.split(".")[0] == "torch"]
  assert not bad, bad
