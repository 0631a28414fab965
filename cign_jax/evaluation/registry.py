"""The metrics of an evaluation: one module each, found by name.

Every module of `cign_jax/evaluation/metrics/` is a metric. It declares:

- `NAMES`: {name: LOWER | HIGHER | None}, the numbers it computes and
  whether lower or higher is better (None: neither side is better, e.g. a
  ratio whose ideal is the data's 1; such a number ranks no checkpoint);
- `NEEDS`: a `Needs`, or a function of the requested names returning one:
  Inception feature taps of generated and real images, real images, the
  label classifier, features of the training images, and the fewest
  samples per class it can work with;
- `compute(data, names)`: {name: value} for one class from a `ClassData`
  (`cign_jax.evaluation.scoring`), which holds what `NEEDS` asked for;

and optionally `TITLES` ({name: what a table calls it}) and
`summarise(name, values, classes)`, the number that stands for all classes
(default: the mean of `values`, {label: value}; label accuracy counts every
sample instead).

`config.eval_metrics`, `python -m cign_jax.evaluate --metrics` and
`experiments/reproduce_table3.py` name metrics by these names;
`cign_jax.evaluation.scoring.score` computes them, each over classes as
mean / min / max, with every feature tap extracted once and shared. A new
metric is a new module in `metrics/` and its name in a config (example in
docs/design.md).

The directions are handed to `cign_jax.validation` when the modules are
loaded, so that the best checkpoint by any of these names is kept the right
way round.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import types
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from cign_jax import validation
from cign_jax.evaluation import distances
from cign_jax.evaluation import inception

LOWER = "lower"
HIGHER = "higher"
_DIRECTIONS = (LOWER, HIGHER, None)
METRICS_PACKAGE = "cign_jax.evaluation.metrics"

# The numbers `python -m cign_jax.evaluate` and the Table 3 script report
# beside FID and label accuracy (memorisation is left out: it needs an
# Inception pass over the training split).
DIVERSITY = (
    "precision",
    "recall",
    "density",
    "coverage",
    "kid",
    "kid_std",
    "spread",
    "duplicates",
)


class UnknownMetricError(ValueError):
  """A metric name no module in `metrics/` declares."""


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a metric reads. The evaluation gets each once and shares it.

  Attributes:
    features: Inception feature taps (64, 192, 768, 2048) of the generated
      and the real images of each class.
    real: real images of each class (as many as generated, at most the
      evaluation's per-class cap).
    classifier: the label classifier's predictions of the generated images.
    train_features: Inception taps of the class's training images.
    min_samples: the fewest samples per class (each side) it can use.
  """

  features: Tuple[int, ...] = ()
  real: bool = False
  classifier: bool = False
  train_features: Tuple[int, ...] = ()
  min_samples: int = 1

  def __post_init__(self):
    for field in ("features", "train_features"):
      sizes = tuple(int(s) for s in getattr(self, field))
      bad = [s for s in sizes if s not in inception.FEATURE_SIZES]
      if bad:
        raise ValueError(
            f"Needs.{field}: unknown Inception tap(s) {bad}; "
            f"available: {inception.FEATURE_SIZES}"
        )
      object.__setattr__(self, field, sizes)

  def __or__(self, other: "Needs") -> "Needs":
    return Needs(
        features=tuple(sorted(set(self.features) | set(other.features))),
        real=self.real or other.real,
        classifier=self.classifier or other.classifier,
        train_features=tuple(
            sorted(set(self.train_features) | set(other.train_features))
        ),
        min_samples=max(self.min_samples, other.min_samples),
    )


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric module, as the registry reads it."""

  module: str
  names: Mapping[str, Optional[str]]
  titles: Mapping[str, str]
  _needs: object
  compute: Callable
  summarise: Optional[Callable]

  def needs(self, names: Sequence[str]) -> Needs:
    needs = self._needs(tuple(names)) if callable(self._needs) else self._needs
    if not isinstance(needs, Needs):
      raise TypeError(
          f"{self.module}: NEEDS must be a registry.Needs or a "
          f"function returning one, got {type(needs).__name__}"
      )
    if needs.features or needs.train_features:
      needs = dataclasses.replace(needs, real=True)
    return needs

  def title(self, name: str) -> str:
    return self.titles.get(name, name)


def _read_module(module: types.ModuleType) -> Metric:
  short = module.__name__.rsplit(".", 1)[-1]
  for attr in ("NAMES", "NEEDS", "compute"):
    if not hasattr(module, attr):
      raise TypeError(
          f"metric module {module.__name__} has no {attr}; a "
          "metric declares NAMES, NEEDS and compute (see "
          "cign_jax.evaluation.registry)"
      )
  names = dict(module.NAMES)
  for name, direction in names.items():
    if direction not in _DIRECTIONS:
      raise TypeError(
          f"{module.__name__}: NAMES[{name!r}] must be "
          f"registry.LOWER, registry.HIGHER or None, got "
          f"{direction!r}"
      )
  return Metric(
      module=short,
      names=names,
      titles=dict(getattr(module, "TITLES", {})),
      _needs=module.NEEDS,
      compute=module.compute,
      summarise=getattr(module, "summarise", None),
  )


@functools.lru_cache(maxsize=None)
def _discover() -> Dict[str, Metric]:
  package = importlib.import_module(METRICS_PACKAGE)
  by_name: Dict[str, Metric] = {}
  for info in sorted(
      pkgutil.iter_modules(package.__path__), key=lambda i: i.name
  ):
    if info.name.startswith("_"):
      continue
    metric = _read_module(
        importlib.import_module(f"{METRICS_PACKAGE}.{info.name}")
    )
    for name in metric.names:
      if name in by_name:
        raise TypeError(
            f"metric name {name!r} is declared by both "
            f"{by_name[name].module} and {metric.module}"
        )
      by_name[name] = metric
  validation.declare_directions(
      {
          name: (None if m.names[name] is None else m.names[name] == LOWER)
          for name, m in by_name.items()
      }
  )
  return by_name


def known_names() -> Tuple[str, ...]:
  return tuple(_discover())


def metric(name: str) -> Metric:
  """The metric that computes `name`."""
  found = _discover().get(name)
  if found is None:
    raise UnknownMetricError(
        f"unknown metric {name!r}; known: {', '.join(known_names())} (each a "
        f"module in {METRICS_PACKAGE.replace('.', '/')}/)"
    )
  return found


def direction(name: str) -> Optional[str]:
  """LOWER, HIGHER, or None for a number that ranks nothing."""
  return metric(name).names[name]


def title(name: str) -> str:
  return metric(name).title(name)


def group(names: Iterable[str]) -> Dict[str, Tuple[Metric, Tuple[str, ...]]]:
  """{module: (metric, its requested names)}, modules in the order of their
  first requested name; an UnknownMetricError for a name none declares, a
  ValueError for a name given twice."""
  names = list(names)
  seen = set()
  out: Dict[str, Tuple[Metric, Tuple[str, ...]]] = {}
  for name in names:
    if name in seen:
      raise ValueError(f"metric {name!r} is listed twice")
    seen.add(name)
    m = metric(name)
    previous = out.get(m.module, (m, ()))[1]
    out[m.module] = (m, previous + (name,))
  return out


def needs(names: Iterable[str]) -> Needs:
  """Everything the named metrics need together."""
  total = Needs()
  for m, requested in group(names).values():
    total = total | m.needs(requested)
  return total


def check_samples(
    names: Iterable[str],
    samples_per_class: int,
    what: str = "samples per class",
) -> None:
  """TooFewSamplesError naming the metric when `samples_per_class` is fewer
  than one of the named metrics needs."""
  for m, requested in group(names).values():
    need = m.needs(requested).min_samples
    if samples_per_class < need:
      raise distances.TooFewSamplesError(
          f"{', '.join(requested)} need{'s' if len(requested) == 1 else ''} "
          f"at least {need} samples per class; {what} is {samples_per_class}"
      )


def check_best_metric(best_metric: str, names: Iterable[str]) -> None:
  """A ValueError when `best_metric` is one of the registry's names that
  ranks nothing (direction None)."""
  if best_metric in _discover() and direction(best_metric) is None:
    rankable = [
        n for n in names if n in _discover() and direction(n) is not None
    ]
    raise ValueError(
        f"config.best_metric: {best_metric!r} ranks nothing (neither a "
        f"lower nor a higher value is better); choose one of "
        f"{rankable or ['val_loss']} or '' (no best checkpoint)"
    )
