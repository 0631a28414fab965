"""Label accuracy: how often the library's classifier
(`cign_jax.evaluation.classifier`) sees the requested label in a generated
sample. Per class over every generated sample of the class; the number
for all classes counts every sample (the overall accuracy)."""

from __future__ import annotations

import numpy as np

from cign_jax.evaluation import registry

NAMES = {"label_accuracy": registry.HIGHER}
TITLES = {"label_accuracy": "label accuracy"}
NEEDS = registry.Needs(classifier=True)


def _correct(data) -> int:
  return int(np.sum(np.asarray(data.predicted) == data.label))


def compute(data, names):
  del names
  return {"label_accuracy": _correct(data) / len(data.predicted)}


def summarise(name, values, classes):
  del name, values
  correct = sum(_correct(c) for c in classes.values())
  return correct / sum(len(c.predicted) for c in classes.values())
