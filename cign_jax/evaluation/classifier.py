"""A small CNN classifier that scores generated samples ("label accuracy").

Trained by the library on a dataset's training split (images in the model
range [-1, 1], the data's shape (N, H, W, C); MNIST's (N, 28, 28, 1)) and
used to check whether a sample shows the label it was asked for. Any
labelled dataset gets one, its input shape and class count the data's.

  python -m cign_jax.classifier train --dataset=mnist [--data_dir=...]
      [--cache_dir=...] [--seed=0] [--retrain]

trains, evaluates on the test split, prints the test accuracy and caches the
parameters in ``<cache_dir>/<dataset>/`` (MNIST and Fashion-MNIST; another
dataset or shape in ``<cache_dir>/<dataset, made a folder name>/<H>x<W>x<C>/``,
`cache_directory`): ``params.msgpack``
(flax.serialization) and ``info.json`` (dataset, image shape, class count,
test accuracy, sha256 of the params file, architecture version, seed,
training time). ``cache_dir``
defaults to ``<cache_root>/classifier`` where ``<cache_root>`` is
``$CIGN_JAX_CACHE`` or ``~/.cache/cign_jax``.

A cached classifier whose files are corrupt, altered (the params' sha256 does
not match info.json), for another dataset or from another architecture
version is never used silently nor retrained silently: ``load_or_train``
raises ``ClassifierCacheError`` naming the file; delete the folder (or pass
``--retrain`` / ``retrain=True``) to train again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import time

import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import optax

from cign_jax import data as data_lib
from cign_jax import utils
from cign_jax.data import reader

# Bump when the network or its training changes: cached params from another
# version are refused.
ARCH_VERSION = 1
PARAMS_FILE = "params.msgpack"
INFO_FILE = "info.json"
# Held while a process trains the cache's classifier (`load_or_train`).
TRAINING_LOCK_FILE = ".training.lock"
PREDICT_BATCH = 1000

# Training recipe (about a minute per dataset on 2 CPU cores).
EPOCHS = 4
BATCH_SIZE = 128
PEAK_LR = 3e-3
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 2  # Random translation (pixels) for augmentation.
# Random shifts of up to MAX_SHIFT pixels: used on MNIST; on Fashion-MNIST
# (centred garments) they cost about 1.5 points of test accuracy in a trial
# (90.2% vs 91.8%), so it trains on the plain images.
# Other datasets train on the plain images.
AUGMENT_SHIFT = {"mnist": True, "fashion_mnist": False}


class ClassifierCacheError(RuntimeError):
  """A cached classifier file is corrupt, altered or does not fit."""


class CNN(nn.Module):
  """Two stride-2 3x3 convolutions (32 and 64 channels) with BatchNorm and
  ReLU, then a 128-unit BatchNorm/ReLU/dropout layer. About 0.4 M parameters.

  Strided convolutions rather than max-pooling: XLA's pooling gradient is
  slow on CPU, and this net trains an MNIST epoch in seconds.
  """

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9
    )
    for features in (32, 64):
      x = nn.Conv(features, (3, 3), strides=(2, 2), use_bias=False)(x)
      x = nn.relu(norm()(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(128, use_bias=False)(x)
    x = nn.relu(norm()(x))
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def default_cache_dir(cache_dir: str = "") -> str:
  """`cache_dir` if given, else <cache_root>/classifier."""
  if cache_dir:
    return os.path.expanduser(cache_dir)
  return os.path.join(utils.cache_root(), "classifier")


def _init_variables(
    model: CNN, seed: int = 0, image_shape=data_lib.IMAGE_SHAPE
):
  return model.init(
      jax.random.PRNGKey(seed),
      jnp.zeros((1, *image_shape), jnp.float32),
  )


def cache_directory(dataset: str, image_shape, cache_dir: str = "") -> str:
  """Where the classifier of `dataset` at `image_shape` (H, W, C) is
  cached: <root>/<dataset> for MNIST and Fashion-MNIST at their shape (the
  layout of earlier versions), else <root>/<name>/<H>x<W>x<C>, the name the
  dataset's with other characters than letters, digits, '.', '_' and '-'
  replaced and a digest of it appended (paths differ in more than those)."""
  root = default_cache_dir(cache_dir)
  shape = tuple(int(v) for v in image_shape)
  if dataset in data_lib.DATASETS and shape == data_lib.IMAGE_SHAPE:
    return os.path.join(root, dataset)
  digest = hashlib.sha256(dataset.encode()).hexdigest()[:8]
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")[-60:]
  return os.path.join(root, f"{name}-{digest}", "x".join(map(str, shape)))


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: CNN, variables, images):
  return model.apply(variables, images, train=False)


class Classifier:
  """A trained CNN: `.predict(images in [-1, 1]) -> int32 labels`."""

  def __init__(
      self,
      variables,
      dataset: str,
      test_accuracy: float | None,
      params_sha256: str = "",
      num_classes: int = 10,
      image_shape=data_lib.IMAGE_SHAPE,
  ):
    self.model = CNN(num_classes=num_classes)
    self.image_shape = tuple(int(v) for v in image_shape)
    self.variables = variables
    self.dataset = dataset
    self.test_accuracy = test_accuracy
    self.params_sha256 = params_sha256
    self.num_classes = num_classes

  def logits(self, images) -> np.ndarray:
    """Logits (N, num_classes) for images in [-1, 1], (N, H, W[, C]) of
    the classifier's shape."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(
          f"expected images of shape (N, {', '.join(map(str, self.image_shape))}"
          f"), got {images.shape}."
      )
    n = len(images)
    out = np.empty((n, self.num_classes), np.float32)
    for start in range(0, n, PREDICT_BATCH):
      chunk = images[start : start + PREDICT_BATCH]
      size = len(chunk)
      if size < PREDICT_BATCH:  # Pad so that one compiled shape serves all.
        pad = np.zeros((PREDICT_BATCH - size, *chunk.shape[1:]), np.float32)
        chunk = np.concatenate([chunk, pad])
      out[start : start + size] = np.asarray(
          _logits(self.model, self.variables, chunk)
      )[:size]
    return out

  def predict(self, images) -> np.ndarray:
    """Predicted labels (int32, (N,)) for images in [-1, 1]."""
    if len(images) == 0:
      return np.zeros((0,), np.int32)
    return self.logits(images).argmax(axis=-1).astype(np.int32)


# --- Training ---------------------------------------------------------------


def _random_shift(rng, images):
  """Translates each image by up to MAX_SHIFT pixels (background -1)."""
  pad = MAX_SHIFT
  padded = jnp.pad(
      images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-1.0
  )
  offsets = jax.random.randint(rng, (images.shape[0], 2), 0, 2 * pad + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), images.shape[1:]
    )

  return jax.vmap(crop)(padded, offsets)


def train(
    dataset: str,
    data_dir: str = "",
    seed: int = 0,
    epochs: int = EPOCHS,
    log=print,
    splits=None,
) -> tuple[Classifier, dict]:
  """Trains a classifier on the training split; returns it and its info.
  `splits`: ((train images uint8, labels), (test images, labels)) instead of
  reading the dataset (a source kind with its default options). The input
  shape and the class count are the data's."""
  data_lib.check_dataset_name(dataset)
  if splits is None:
    train_x, train_y = reader.load_split(dataset, "train", data_dir)
    test_x, test_y = reader.load_split(dataset, "test", data_dir)
  else:
    (train_x, train_y), (test_x, test_y) = splits
  image_shape = tuple(int(v) for v in np.shape(train_x)[1:])
  num_classes = _num_classes(dataset, train_y, test_y)
  batches = reader.TrainBatches(
      train_x, train_y, min(BATCH_SIZE, len(train_y)), seed
  )
  total_steps = epochs * batches.steps_per_epoch

  model = CNN(num_classes=num_classes)
  variables = _init_variables(model, seed, image_shape)
  params, batch_stats = variables["params"], variables["batch_stats"]
  schedule = optax.warmup_cosine_decay_schedule(
      0.0,
      PEAK_LR,
      warmup_steps=min(200, total_steps // 10),
      decay_steps=total_steps,
      end_value=PEAK_LR * 0.01,
  )
  tx = optax.adamw(schedule, weight_decay=WEIGHT_DECAY)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, batch_stats, opt_state, images, labels, rng):
    shift_rng, dropout_rng = jax.random.split(rng)
    if AUGMENT_SHIFT.get(dataset, False):
      images = _random_shift(shift_rng, images)

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats},
          images,
          train=True,
          rngs={"dropout": dropout_rng},
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels
      ).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = jax.random.PRNGKey(seed + 1)
  start = time.time()
  for step in range(total_steps):
    images, labels = batches.batch(step)
    params, batch_stats, opt_state, loss = step_fn(
        params,
        batch_stats,
        opt_state,
        images,
        labels,
        jax.random.fold_in(rng, step),
    )
    if (step + 1) % batches.steps_per_epoch == 0:
      log(
          f"{dataset} classifier: epoch {(step + 1) // batches.steps_per_epoch}"
          f"/{epochs}, loss {float(loss):.4f}, {time.time() - start:.0f} s"
      )
  train_seconds = time.time() - start

  classifier = Classifier(
      {"params": params, "batch_stats": batch_stats},
      dataset,
      None,
      num_classes=num_classes,
      image_shape=image_shape,
  )
  predicted = classifier.predict(reader.to_model_range(test_x))
  classifier.test_accuracy = float(np.mean(predicted == test_y))
  info = {
      "dataset": dataset,
      "image_shape": list(image_shape),
      "num_classes": num_classes,
      "test_accuracy": classifier.test_accuracy,
      "arch_version": ARCH_VERSION,
      "seed": int(seed),
      "epochs": epochs,
      "train_seconds": round(train_seconds, 1),
  }
  return classifier, info


def _num_classes(dataset: str, *labels) -> int:
  """MNIST's and Fashion-MNIST's ten; else the largest label + 1."""
  if dataset in data_lib.DATASETS:
    return data_lib.NUM_CLASSES
  return max(int(np.max(y)) for y in labels if np.size(y)) + 1


# --- Cache ------------------------------------------------------------------


def _write_atomic(path: str, payload: bytes) -> None:
  with utils.atomic_write(path) as f:
    f.write(payload)


def save(classifier: Classifier, info: dict, directory: str) -> dict:
  """Writes params.msgpack and info.json into `directory`; returns the info."""
  os.makedirs(directory, exist_ok=True)
  payload = serialization.to_bytes(jax.device_get(classifier.variables))
  info = dict(
      info,
      params_sha256=hashlib.sha256(payload).hexdigest(),
      params_file=PARAMS_FILE,
  )
  classifier.params_sha256 = info["params_sha256"]
  _write_atomic(os.path.join(directory, PARAMS_FILE), payload)
  _write_atomic(
      os.path.join(directory, INFO_FILE),
      (json.dumps(info, indent=2) + "\n").encode(),
  )
  return info


def load(dataset: str, directory: str) -> Classifier:
  """Loads a cached classifier; ClassifierCacheError names any bad file."""
  info_path = os.path.join(directory, INFO_FILE)
  params_path = os.path.join(directory, PARAMS_FILE)
  try:
    with open(info_path) as f:
      info = json.load(f)
    if not isinstance(info, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise ClassifierCacheError(
        f"Cached classifier info {info_path} is unreadable or corrupt ({e}); "
        "delete it to retrain."
    ) from e
  if info.get("dataset") != dataset:
    raise ClassifierCacheError(
        f"Cached classifier info {info_path} is for dataset "
        f"{info.get('dataset')!r}, not {dataset!r}; delete it to retrain."
    )
  if info.get("arch_version") != ARCH_VERSION:
    raise ClassifierCacheError(
        f"Cached classifier {info_path} is from architecture version "
        f"{info.get('arch_version')!r}, this code is version {ARCH_VERSION}; "
        "delete it to retrain."
    )
  try:
    with open(params_path, "rb") as f:
      payload = f.read()
  except OSError as e:
    raise ClassifierCacheError(
        f"Cached classifier params {params_path} cannot be read ({e}); delete "
        f"{directory} to retrain."
    ) from e
  digest = hashlib.sha256(payload).hexdigest()
  if digest != info.get("params_sha256"):
    raise ClassifierCacheError(
        f"Cached classifier params {params_path} are altered or corrupt "
        f"(sha256 {digest}, {info_path} says {info.get('params_sha256')}); "
        f"delete {directory} to retrain."
    )
  # Earlier versions cached MNIST-shaped classifiers without these keys.
  num_classes = int(info.get("num_classes", data_lib.NUM_CLASSES))
  image_shape = tuple(info.get("image_shape", data_lib.IMAGE_SHAPE))
  template = jax.device_get(
      _init_variables(CNN(num_classes), image_shape=image_shape)
  )
  try:
    variables = serialization.from_bytes(template, payload)
    shapes_ok = jax.tree_util.tree_all(
        jax.tree_util.tree_map(
            lambda a, b: np.shape(a) == np.shape(b), template, variables
        )
    )
  except Exception as e:  # pylint: disable=broad-except
    raise ClassifierCacheError(
        f"Cached classifier params {params_path} do not fit the network "
        f"({e}); delete {directory} to retrain."
    ) from e
  if not shapes_ok:
    raise ClassifierCacheError(
        f"Cached classifier params {params_path} have the wrong shapes for "
        f"the network; delete {directory} to retrain."
    )
  return Classifier(
      variables,
      dataset,
      info.get("test_accuracy"),
      digest,
      num_classes=num_classes,
      image_shape=image_shape,
  )


def _digest(split) -> str:
  """A short digest of (images, labels)."""
  h = hashlib.sha256()
  for array in split:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
  return h.hexdigest()[:16]


def load_or_train(
    dataset: str,
    data_dir: str = "",
    cache_dir: str = "",
    seed: int = 0,
    retrain: bool = False,
    log=print,
    splits=None,
) -> Classifier:
  """The cached classifier of `dataset`, trained and cached first if absent.

  `cache_dir` is the root (default <cache_root>/classifier); the files are in
  `cache_directory(dataset, shape)`. A bad cache raises
  ClassifierCacheError (see the module docstring) unless `retrain`.
  `splits`: the data to train on, as `train` takes it (their shape chooses
  the cache; without them the dataset is read, a source kind with its
  default options); for MNIST and Fashion-MNIST a classifier trained on
  given splits is cached apart, in that folder's name plus
  `-data-<digest of the training split>`, so that one trained on other
  images (a subset, a user's .npz) never stands in for the dataset's (a
  source kind's name, its path, already names its data).
  """
  data_lib.check_dataset_name(dataset)
  given = splits is not None
  if given:
    image_shape = np.shape(splits[0][0])[1:]
  elif dataset in data_lib.DATASETS:
    image_shape = data_lib.IMAGE_SHAPE
  else:
    splits = (
        reader.load_split(dataset, "train", data_dir),
        reader.load_split(dataset, "test", data_dir),
    )
    image_shape = np.shape(splits[0][0])[1:]
  directory = cache_directory(dataset, image_shape, cache_dir)
  if given and dataset in data_lib.DATASETS:
    directory = f"{directory}-data-{_digest(splits[0])}"
  if not retrain and os.path.exists(os.path.join(directory, INFO_FILE)):
    return load(dataset, directory)
  # One trainer at a time per cache: a process that waited here loads what
  # the first one trained instead of training it again.
  with utils.file_lock(os.path.join(directory, TRAINING_LOCK_FILE)):
    if not retrain and os.path.exists(os.path.join(directory, INFO_FILE)):
      return load(dataset, directory)
    classifier, info = train(
        dataset, data_dir, seed=seed, log=log, splits=splits
    )
    save(classifier, info, directory)
  return classifier


# --- Scoring ----------------------------------------------------------------


def label_accuracy(predicted, requested, num_classes: int = 10) -> dict:
  """How often the classifier saw the requested label.

  Returns a dict with `accuracy` (overall; None without samples), `per_label`
  (list of accuracies per requested label, None for a label never requested),
  `confusion` (num_classes x num_classes int counts, rows requested, columns
  predicted, as nested lists) and `num_samples`.
  """
  predicted = np.asarray(predicted).reshape(-1)
  requested = np.asarray(requested).reshape(-1)
  if predicted.shape != requested.shape:
    raise ValueError(
        f"{predicted.size} predictions for {requested.size} "
        "requested labels."
    )
  for name, labels in (("predicted", predicted), ("requested", requested)):
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
      raise ValueError(
          f"{name} labels must be integers in " f"[0, {num_classes})."
      )
  predicted = predicted.astype(np.int64)  # An empty list comes in as float.
  requested = requested.astype(np.int64)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (requested, predicted), 1)
  rows = confusion.sum(axis=1)
  per_label = [
      float(confusion[i, i] / rows[i]) if rows[i] else None
      for i in range(num_classes)
  ]
  n = int(predicted.size)
  return {
      "accuracy": float(np.trace(confusion) / n) if n else None,
      "per_label": per_label,
      "confusion": confusion.tolist(),
      "num_samples": n,
  }


def plot_confusion(
    confusion,
    path: str,
    class_names=None,
    title: str = "Requested vs. classified label",
) -> str:
  """Writes a PNG of a confusion matrix (rows requested, columns predicted)."""
  # The Agg canvas directly: no global matplotlib backend is changed.

  confusion = np.asarray(confusion)
  k = confusion.shape[0]
  names = (
      list(class_names)
      if class_names is not None
      else [str(i) for i in range(k)]
  )
  rows = confusion.sum(axis=1, keepdims=True)
  fraction = np.divide(
      confusion, rows, out=np.zeros(confusion.shape), where=rows > 0
  )
  fig = Figure(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(
      im, ax=ax, fraction=0.046, pad=0.04, label="fraction of requested"
  )
  for i in range(k):
    for j in range(k):
      if confusion[i, j]:
        ax.text(
            j,
            i,
            str(int(confusion[i, j])),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if fraction[i, j] > 0.5 else "black",
        )
  ax.set_xticks(
      range(k),
      names,
      rotation=45 if class_names else 0,
      ha="right" if class_names else "center",
  )
  ax.set_yticks(range(k), names)
  ax.set_xlabel("predicted label")
  ax.set_ylabel("requested label")
  ax.set_title(title)
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png")
  return path
