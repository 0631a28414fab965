"""Configuration schema shared by every config file in `cign_jax/configs/`.

Each config file builds on `base_config()` and changes what its run needs.
`validate(config)` checks names and values and raises a `ValueError` that names
the offending key; `main`, `sample` and `convert` call it on every config they
load, after the command-line overrides have been applied.
"""

from __future__ import annotations

import importlib.util
import itertools
import os

import ml_collections

from cign_jax.data import check_dataset_name

# The one list of each: models, losses and the commands check against these
# (the datasets' is `data.DATASETS`, with the source kinds of
# `data.registry`).
CONDITIONINGS = ("channel", "filter", "none")
# 'cign': the CIGN paper's five-block network (any conditioning);
# 'ign_dcgan': the unconditional DCGAN-like network of the IGN code
# (`models.DCGANIdempotentNetwork`); 'dcgan': pytorch/examples' DCGAN as an
# IGN, the IGN paper's CelebA network (`models.DCGANNetwork`).
ARCHITECTURES = ("cign", "ign_dcgan", "dcgan")
# The image sizes (H = W) each architecture takes.
ARCHITECTURE_SIZES = {"cign": (28, 32, 64), "ign_dcgan": (28,), "dcgan": (64,)}
# model fields that, left 0, are taken from the data when a training starts.
FROM_DATA = ("image_size", "image_channels", "num_classes")
# 'adamw': PyTorch's AdamW (decoupled weight decay); 'adam': PyTorch's Adam
# (weight decay, if any, added to the gradient as an L2 term).
OPTIMIZERS = ("adamw", "adam")
TIGHTNESS_KINDS = ("l1", "smooth_clamp")
LR_SCHEDULES = ("constant", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("default", "high", "highest")

# Alternatives no default selects. Each 'auto' below resolves to one form on
# every backend; the other stays selectable, and tested equal, until a GPU
# profile decides (docs/performance.md, "GPU figures"). The batched loss
# calls' machinery lives in `cign_jax.grouped`; the per-class channel conv is
# `models.Conv` with class maps.
LOSS_PASSES = ("auto", "sequential", "batched")
CHANNEL_CONVS = ("auto", "concat", "per_class")


# The settings a sweep may vary: scalars the train step reads as numbers, so
# that one compiled step serves every member (`cign_jax.sweeps`). What
# changes shapes or the program (the network, batch_size,
# num_mismatch_labels, the conditioning, the dtype, ...) is a run of its own.
SWEEPABLE = (
    "seed",
    "optimizer.learning_rate",
    "optimizer.weight_decay",
    "optimizer.b1",
    "optimizer.b2",
    "optimizer.eps",
    "loss.rec_weight",
    "loss.idem_noise_weight",
    "loss.tight_noise_weight",
    "loss.idem_mismatch_weight",
    "loss.tight_mismatch_weight",
    "loss.tightness_clamp_a",
    "model.dropout_rate",
    "ema_decay",
    "data.train_noise_std",
)
# Swept settings whose 0 switches a part of the step off (no dropout, no
# average, no noise): the members must all be 0 or all be positive.
SWEPT_ZERO_OR_POSITIVE = (
    "model.dropout_rate",
    "ema_decay",
    "data.train_noise_std",
)


def resolve_passes(passes: str) -> str:
  """config.loss.passes: 'auto' -> 'sequential' (the batched calls were not
  faster on CPU nor on a GPU)."""
  if passes not in LOSS_PASSES:
    raise ValueError(unknown_choice("passes", passes, LOSS_PASSES))
  return "sequential" if passes == "auto" else passes


def resolve_channel_conv(channel_conv: str) -> str:
  """config.model.channel_conv: 'auto' -> 'concat' (the split kernel was
  slower with XLA's CPU convolutions and on a GPU)."""
  if channel_conv not in CHANNEL_CONVS:
    raise ValueError(
        unknown_choice("channel_conv", channel_conv, CHANNEL_CONVS)
    )
  return "concat" if channel_conv == "auto" else channel_conv


def base_config() -> ml_collections.ConfigDict:
  """The defaults: CIGN channel_small on MNIST as in the paper."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.dataset = "mnist"
  # Where tensorflow-datasets keeps prepared data; '' means $TFDS_DATA_DIR or
  # ~/tensorflow_datasets.
  config.data.data_dir = ""
  # Gaussian noise added to training images (then clamped to [-1, 1]).
  config.data.train_noise_std = 0.15
  # Sources other than mnist / fashion_mnist ('folder:PATH', 'npz:PATH',
  # 'tfds:NAME'; cign_jax.data.registry): the size images are resized and
  # centre-cropped to (folders; 0: model.image_size, else the files' own
  # size), the tfds features holding the image and the label ('' for the
  # label: an unlabelled dataset, one class), and the class names (labels
  # 0..K-1 in order; filled from the data, e.g. a folder's sub-folder names).
  config.data.image_size = 0
  config.data.image_key = "image"
  config.data.label_key = "label"
  config.data.class_names = ()

  config.model = ml_collections.ConfigDict()
  # 'cign' | 'ign_dcgan' (the IGN code's network) | 'dcgan' (pytorch/examples'
  # DCGAN, 64x64). The last two are unconditional: they need conditioning
  # 'none'; latent_dim = channels of their first conv, intermediate_dim =
  # channels of their 1x1 code.
  config.model.architecture = "cign"
  config.model.conditioning = "channel"  # 'channel' | 'filter' | 'none' (IGN)
  config.model.latent_dim = 32
  config.model.intermediate_dim = 128
  config.model.embedding_dim = 5
  # The data's class count and image shape (H = W = image_size, C =
  # image_channels): 0 takes them from the data when a training starts (the
  # run's config.json records what was taken); a value set is checked
  # against the data.
  config.model.num_classes = 10
  config.model.image_size = 28
  config.model.image_channels = 1
  config.model.dropout_rate = 0.15
  # The paper clips the N(0, 1) prior to [-1, 1]; the author's code does not.
  config.model.clip_prior = False
  # How channel conditioning meets the conv: 'concat' appends the label map
  # as an input channel; 'per_class' splits the kernel and convolves the
  # num_classes maps once (same parameters, GPU-friendly channel counts);
  # 'auto': 'concat' (`resolve_channel_conv`).
  config.model.channel_conv = "auto"

  config.loss = ml_collections.ConfigDict()
  config.loss.rec_weight = 20.0
  config.loss.idem_noise_weight = 20.0
  config.loss.tight_noise_weight = 2.5
  config.loss.idem_mismatch_weight = 3.0
  config.loss.tight_mismatch_weight = 1.0
  # 'l1': plain negative L1 (the CIGN code); 'smooth_clamp': IGN's
  # tanh(L / (a L_rec)) a L_rec with a = tightness_clamp_a.
  config.loss.tightness = "l1"
  config.loss.tightness_clamp_a = 1.5
  # Wrong labels per real image: 9 = all of them (the paper), 0..8 = that many
  # distinct wrong labels drawn at random per image.
  config.loss.num_mismatch_labels = 9
  # The loss's seven forward calls: 'sequential' (one after another, the
  # reference), 'batched' (three calls on concatenated batches, BatchNorm
  # per group: the same loss, fewer and larger kernels) or 'auto'
  # ('sequential', `resolve_passes`).
  config.loss.passes = "auto"

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # 'adamw' | 'adam' (see OPTIMIZERS)
  config.optimizer.learning_rate = 1e-3
  config.optimizer.b1 = 0.5
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01
  # 'constant' (the paper) or 'cosine' (decay to 0 over the run; short runs).
  config.optimizer.lr_schedule = "constant"
  # Exponential moving average of the parameters, used for sampling and
  # evaluation: 0 = none (the paper); e.g. 0.995 for short runs.
  config.ema_decay = 0.0

  config.batch_size = 128  # real images per step (global, over all devices)
  config.num_epochs = 50
  config.num_train_steps = -1  # > 0 overrides num_epochs

  config.log_every_steps = 50
  config.sample_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.samples_noise_seed = 1234  # the fixed noise of the sample grids

  # Validation and evaluation during training, at the run's evaluation
  # points: every eval_every_epochs epochs, every eval_every_steps steps, and
  # the last step (cign_jax.validation).
  config.eval_every_epochs = 1  # 0: not by epochs
  config.eval_every_steps = 0  # > 0: also every this many steps
  # Test images in the validation loss (the five terms in eval mode, as the
  # original): -1 all of the test split, 0 no validation loss.
  config.eval_num_examples = -1
  # In-loop metrics (cign_jax.evaluation.in_loop): this many samples per
  # label (fixed noise), scored by every metric of eval_metrics, per class
  # against as many of the first test images of the class; 0: none.
  config.eval_samples_per_label = 0
  # Metric names of cign_jax.evaluation's registry (a module each in
  # cign_jax/evaluation/metrics/): 'label_accuracy', 'fid64' ... 'fid2048',
  # 'precision', 'recall', 'density', 'coverage', 'kid', 'spread',
  # 'duplicates', ... The default is the cheap one (docs/performance.md has
  # what each costs).
  config.eval_metrics = ("label_accuracy",)
  # Retired: in-loop FID is 'fidN' in eval_metrics, on eval_samples_per_label
  # samples. Kept so that the config.json of older runs still loads;
  # eval_fid_sizes must stay ().
  config.eval_fid_sizes = ()
  config.eval_fid_samples_per_class = 1000
  config.eval_noise_seed = 4321  # the fixed noise of in-loop evaluation
  # The checkpoint kept as "best" (WORKDIR/best/): 'val_loss' (lowest, the
  # original's choice), a name of eval_metrics (the way its metric module
  # declares better, e.g. highest 'label_accuracy', lowest 'fid64'), or ''
  # for none.
  config.best_metric = "val_loss"

  # Parallelism and precision.
  config.mesh_shape = (-1,)  # -1: all devices
  config.mesh_axis_names = ("data",)
  config.compute_dtype = "float32"
  # Precision of the convolutions and matrix products (train step and
  # sampling): 'default' lets XLA use TF32 on recent NVIDIA GPUs, 'highest'
  # is full float32, 'high' in between (bf16x3 on GPUs).
  config.matmul_precision = "default"

  # Many runs in one program (`cign_jax.sweeps`): a tuple of values for
  # each setting of SWEEPABLE to vary, mirroring the config's own tree
  # (`config.sweep.optimizer.learning_rate = (1e-3, 3e-4)`). The tuples
  # given are zipped (all of one length K, the members) or, with product,
  # crossed; each member trains as a run of its own in
  # WORKDIR/members/<k>/. All empty: one run, no sweep.
  config.sweep = ml_collections.ConfigDict()
  config.sweep.product = False
  for name in SWEEPABLE:
    node = config.sweep
    *parents, leaf = name.split(".")
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = ()
  return config


def _check(cond: bool, key: str, message: str):
  if not cond:
    raise ValueError(f"config.{key}: {message}")


def unknown_choice(what: str, value, choices) -> str:
  """The message for a value that is none of `choices`."""
  return f"unknown {what} {value!r}; expected one of {tuple(choices)}"


def _check_choice(value, choices, key: str, what: str):
  _check(value in choices, key, unknown_choice(what, value, choices))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises ValueError naming the first invalid field; returns the config."""
  base = base_config()
  if "sweep" in config:
    _check_sweep_keys(config.sweep)

  def walk(node, ref, prefix):
    for key in node.keys():
      if key not in ref:
        raise ValueError(
            f"config.{prefix}{key}: unknown config key (known: "
            f"{', '.join(sorted(ref.keys()))})"
        )
      if isinstance(ref[key], ml_collections.ConfigDict):
        walk(node[key], ref[key], f"{prefix}{key}.")

  walk(config, base, "")
  for key in base.keys():
    _check(key in config, key, "missing config key")

  m, l, o = config.model, config.loss, config.optimizer
  _check_choice(
      m.conditioning, CONDITIONINGS, "model.conditioning", "conditioning"
  )
  _check_choice(
      m.architecture, ARCHITECTURES, "model.architecture", "architecture"
  )
  if m.architecture in ("ign_dcgan", "dcgan"):
    _check(
        m.conditioning == "none",
        "model.conditioning",
        f"the {m.architecture!r} network is unconditional: it needs "
        f"conditioning 'none', got {m.conditioning!r}",
    )
  if m.architecture == "ign_dcgan":
    _check(
        int(m.intermediate_dim) % 16 == 0,
        "model.intermediate_dim",
        f"the 'ign_dcgan' decoder halves its channels four times: must "
        f"be a multiple of 16, got {m.intermediate_dim}",
    )
  for key in ("latent_dim", "intermediate_dim", "embedding_dim"):
    _check(int(m[key]) >= 1, f"model.{key}", f"must be >= 1, got {m[key]}")
  for key in FROM_DATA:
    _check(
        int(m[key]) >= 0,
        f"model.{key}",
        f"must be >= 1, or 0 to take it from the data; got {m[key]}",
    )
  sizes = ARCHITECTURE_SIZES[m.architecture]
  _check(
      m.image_size == 0 or m.image_size in sizes,
      "model.image_size",
      f"the {m.architecture!r} architecture takes images of size "
      f"{' or '.join(map(str, sizes))} (or 0: the data's), got "
      f"{m.image_size}",
  )
  _check(
      0.0 <= m.dropout_rate < 1.0,
      "model.dropout_rate",
      f"must be in [0, 1), got {m.dropout_rate}",
  )
  for key in (
      "rec_weight",
      "idem_noise_weight",
      "tight_noise_weight",
      "idem_mismatch_weight",
      "tight_mismatch_weight",
  ):
    _check(
        l[key] >= 0,
        f"loss.{key}",
        f"a loss weight must be >= 0, got " f"{l[key]}",
    )
  _check_choice(l.tightness, TIGHTNESS_KINDS, "loss.tightness", "tightness")
  _check(
      l.tightness_clamp_a > 0,
      "loss.tightness_clamp_a",
      f"must be > 0, got {l.tightness_clamp_a}",
  )
  _check(
      m.num_classes == 0 or 0 <= l.num_mismatch_labels <= m.num_classes - 1,
      "loss.num_mismatch_labels",
      f"must be in 0..{m.num_classes - 1}, got {l.num_mismatch_labels}",
  )
  _check_choice(o.name, OPTIMIZERS, "optimizer.name", "optimizer")
  _check(
      o.learning_rate > 0,
      "optimizer.learning_rate",
      f"must be > 0, got {o.learning_rate}",
  )
  _check(
      0 <= o.b1 < 1 and 0 <= o.b2 < 1,
      "optimizer.b1",
      f"betas must be in [0, 1), got {o.b1}, {o.b2}",
  )
  _check(
      o.weight_decay >= 0,
      "optimizer.weight_decay",
      f"must be >= 0, got {o.weight_decay}",
  )
  _check_choice(
      o.lr_schedule, LR_SCHEDULES, "optimizer.lr_schedule", "schedule"
  )
  _check(
      0.0 <= config.ema_decay < 1.0,
      "ema_decay",
      f"must be in [0, 1), got {config.ema_decay}",
  )
  try:
    check_dataset_name(config.data.dataset)
  except ValueError as e:
    raise ValueError(f"config.data.dataset: {e}") from None
  _check(
      config.data.image_size >= 0,
      "data.image_size",
      f"must be >= 0 (0: model.image_size), got {config.data.image_size}",
  )
  _check(
      m.num_classes == 0
      or not config.data.class_names
      or len(config.data.class_names) == m.num_classes,
      "data.class_names",
      f"names {len(config.data.class_names)} classes, but "
      f"model.num_classes is {m.num_classes}",
  )
  _check(
      config.data.train_noise_std >= 0,
      "data.train_noise_std",
      f"must be >= 0, got {config.data.train_noise_std}",
  )
  _check(
      config.batch_size >= 1,
      "batch_size",
      f"must be >= 1, got {config.batch_size}",
  )
  _check(
      config.num_epochs >= 1 or config.num_train_steps > 0,
      "num_epochs",
      f"must be >= 1 when num_train_steps is not set, got "
      f"{config.num_epochs}",
  )
  for key in (
      "log_every_steps",
      "sample_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
  ):
    _check(config[key] >= 1, key, f"must be >= 1, got {config[key]}")
  _check_choice(config.compute_dtype, COMPUTE_DTYPES, "compute_dtype", "dtype")
  _check_choice(
      config.matmul_precision,
      MATMUL_PRECISIONS,
      "matmul_precision",
      "precision",
  )
  _check_choice(l.passes, LOSS_PASSES, "loss.passes", "passes")
  _check_choice(
      m.channel_conv, CHANNEL_CONVS, "model.channel_conv", "channel_conv"
  )
  _validate_evaluation(config)
  _check(
      len(config.mesh_shape) == len(config.mesh_axis_names),
      "mesh_shape",
      f"{tuple(config.mesh_shape)} does not match mesh_axis_names "
      f"{tuple(config.mesh_axis_names)}",
  )
  if is_sweep(config):
    for k, settings in enumerate(sweep_members(config)):
      try:
        validate(member_config(config, settings))
      except ValueError as e:
        raise ValueError(
            f"config.sweep, member {k} ({settings}): {e}"
        ) from None
  return config


def fit_to_data(
    config: ml_collections.ConfigDict,
    image_shape,
    num_classes: int,
    class_names=(),
) -> ml_collections.ConfigDict:
  """The config with the model's unset (0) image shape and class count
  taken from the data, and the data's class names; raises ValueError when
  a value set differs from the data's, or the data's size is one the
  architecture cannot take.

  Args:
    config: a validated config.
    image_shape: (H, W, C) of the data's images.
    num_classes: the data's class count (labels 0..num_classes-1).
    class_names: the data's names of the classes, if it has any.

  Returns:
    A copy of `config`, validated.
  """
  h, w, c = (int(v) for v in image_shape)
  if h != w:
    raise ValueError(
        f"the data's images are {h}x{w}; the networks take square images "
        "(for a folder, set config.data.image_size to resize and crop them)"
    )
  config = ml_collections.ConfigDict(config.to_dict())
  m = config.model
  found = {"image_size": h, "image_channels": c, "num_classes": num_classes}
  for key, value in found.items():
    if m[key] == 0:
      m[key] = value
    elif key == "num_classes":
      # A model may represent more classes than the data show; labels it
      # cannot represent are refused by the training (`train`).
      continue
    elif m[key] != value:
      raise ValueError(
          f"config.model.{key} is {m[key]}, but the data "
          f"({config.data.dataset}) has {value}; set it to {value}, or to 0 "
          "to take it from the data"
      )
  if m.conditioning != "none" and m.num_classes < 2:
    raise ValueError(
        f"a {m.conditioning}-conditioned model needs at least two classes; "
        f"the data ({config.data.dataset}) has {m.num_classes}: add classes, "
        "or train an unconditional model (model.conditioning = 'none')"
    )
  names = tuple(str(n) for n in class_names)
  if names and not config.data.class_names:
    config.data.class_names = names
  elif names and tuple(config.data.class_names) != names:
    raise ValueError(
        f"config.data.class_names {tuple(config.data.class_names)} differ "
        f"from the data's classes {names}"
    )
  return validate(config)


def _check_sweep_keys(sweep: ml_collections.ConfigDict, prefix: str = ""):
  """Refuses a sweep of anything but SWEEPABLE, naming it."""
  for key in sweep.keys():
    name = f"{prefix}{key}"
    if name == "product":
      _check(
          isinstance(sweep[key], bool),
          "sweep.product",
          f"must be True or False, got {sweep[key]!r}",
      )
      continue
    if isinstance(sweep[key], ml_collections.ConfigDict) and any(
        s.startswith(name + ".") for s in SWEEPABLE
    ):
      _check_sweep_keys(sweep[key], name + ".")
      continue
    _check(
        name in SWEEPABLE,
        f"sweep.{name}",
        f"{name} cannot be swept: the members of a sweep share one compiled "
        f"train step, so only scalars the step reads as numbers may vary "
        f"({', '.join(SWEEPABLE)}); a different {name} is a run (or sweep) "
        "of its own",
    )
    values = sweep[key]
    _check(
        isinstance(values, (tuple, list))
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in values
        ),
        f"sweep.{name}",
        f"must be a tuple of numbers, one per member, got {values!r}",
    )


def swept_settings(config: ml_collections.ConfigDict) -> dict:
  """{dotted name: tuple of values} of the settings config.sweep varies,
  in SWEEPABLE's order ({} when the config is a single run)."""
  sweep = config.get("sweep")
  if sweep is None:
    return {}
  out = {}
  for name in SWEEPABLE:
    node = sweep
    for part in name.split("."):
      node = node.get(part) if node is not None else None
    if node:
      out[name] = tuple(node)
  return out


def is_sweep(config: ml_collections.ConfigDict) -> bool:
  """Whether the config asks for several runs in one program."""
  return bool(swept_settings(config))


def sweep_members(config: ml_collections.ConfigDict) -> list:
  """Each member's settings, {dotted name: value}, in member order: the
  swept tuples zipped, or (config.sweep.product) crossed, the first
  setting varying slowest."""
  settings = swept_settings(config)
  names = list(settings)
  if config.sweep.product:
    rows = itertools.product(*settings.values())
  else:
    lengths = {name: len(values) for name, values in settings.items()}
    _check(
        len(set(lengths.values())) <= 1,
        "sweep",
        f"the swept settings have different numbers of values {lengths}; "
        "give every one the same number (one per member), or set "
        "config.sweep.product = True for every combination",
    )
    rows = zip(*settings.values())
  members = [dict(zip(names, row)) for row in rows]
  for name in SWEPT_ZERO_OR_POSITIVE:
    if name in settings:
      zero = [v == 0 for v in settings[name]]
      _check(
          all(zero) or not any(zero),
          f"sweep.{name}",
          f"0 switches this part of the step off, which changes the "
          f"program: its values must all be 0 or all be positive, got "
          f"{settings[name]}",
      )
  return members


def member_config(
    config: ml_collections.ConfigDict, settings: dict
) -> ml_collections.ConfigDict:
  """A sweep member's config: the sweep's config with the member's settings
  and no sweep (what the member's run directory records)."""
  member = config.copy_and_resolve_references()
  member.sweep = base_config().sweep
  for name, value in settings.items():
    *parents, leaf = name.split(".")
    node = member
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError:
      raise ValueError(
          f"config.sweep.{name}: {value!r} is not a valid value for "
          f"config.{name} (a {type(node[leaf]).__name__})"
      ) from None
  return member


def computed_metrics(config: ml_collections.ConfigDict) -> tuple:
  """The metrics a run with this config computes at its evaluation points
  (the values `best_metric` may take, besides ''): 'val_loss' and the
  names of eval_metrics."""
  names = []
  if config.eval_num_examples != 0:
    names.append("val_loss")
  if config.eval_samples_per_label > 0:
    names.extend(str(n) for n in config.eval_metrics)
  return tuple(names)


def needs_evaluator(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's evaluation points compute metrics of
  `cign_jax.evaluation` (the core trains without them)."""
  return config.eval_samples_per_label > 0


def _validate_evaluation(config: ml_collections.ConfigDict):
  # Which names exist, what each needs and which way it is better are the
  # metric modules' to say: cign_jax.evaluation.in_loop checks those when it
  # builds the evaluator (the core does not import cign_jax.evaluation).
  for key in (
      "eval_every_epochs",
      "eval_every_steps",
      "eval_samples_per_label",
  ):
    _check(config[key] >= 0, key, f"must be >= 0, got {config[key]}")
  _check(
      config.eval_num_examples >= -1,
      "eval_num_examples",
      f"must be -1 (all), 0 (none) or a count, got "
      f"{config.eval_num_examples}",
  )
  names = config.eval_metrics
  _check(
      isinstance(names, (tuple, list))
      and all(isinstance(n, str) and n for n in names),
      "eval_metrics",
      f"must be a tuple of metric names, got {names!r}",
  )
  repeated = sorted({n for n in names if list(names).count(n) > 1})
  _check(not repeated, "eval_metrics", f"lists {repeated} more than once")
  sizes = tuple(config.eval_fid_sizes)
  _check(
      not sizes,
      "eval_fid_sizes",
      f"retired; list "
      f"{tuple(f'fid{int(s)}' for s in sizes)} in config.eval_metrics "
      f"instead (computed on config.eval_samples_per_label samples per "
      f"label) and leave eval_fid_sizes = ()",
  )
  if config.eval_samples_per_label > 0:
    _check(
        config.model.conditioning != "none",
        "eval_samples_per_label",
        "in-loop metrics are per class and need a conditional model; "
        "this config is unconditional (model.conditioning = 'none')",
    )
  available = computed_metrics(config)
  _check(
      config.best_metric == "" or config.best_metric in available,
      "best_metric",
      f"{config.best_metric!r} is not computed by this run; it computes "
      f"{available or 'nothing'} ('val_loss' needs eval_num_examples != 0, "
      f"the names of eval_metrics eval_samples_per_label > 0; '' keeps no "
      f"best checkpoint)",
  )


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads and validates a config file's `get_config()`, as --config=PATH does.

  Args:
    path: the file, optionally with a variant as `--config` takes it:
      `configs/quick.py:tiny` calls `get_config("tiny")`.

  Returns:
    The validated config.
  """
  variant = None
  if not os.path.isfile(path) and ":" in path:
    path, variant = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_cign_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = (
      module.get_config() if variant is None else module.get_config(variant)
  )
  return validate(config)
