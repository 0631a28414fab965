"""Rebuilds the CIGN paper's Table 3: trains the paper's runs, scores each
one's best checkpoint with the paper's protocol, writes table3.md.

  python experiments/reproduce_table3.py --root=runs/table3 \
      [--configs=channel_small,channel_large,filter_small,filter_large] \
      [--dataset=mnist] [--image_size=0] [--max_minutes=0] [--num_epochs=0] \
      [--data_npz=mnist.npz] [--quick] [--diversity=precision,recall,...]

For each config (a name in cign_jax/configs or a path): trains it in
ROOT/NAME (resuming when that directory holds a run; the best checkpoint
is kept by validation loss, as the original), then evaluates its best
checkpoint as the paper did: 1000 samples generated per label (noise seed
0) against the first 1000 test images of that label, per-class FID at 64,
192 and 768 features (mean, min, max over the classes), plus the label
accuracy of the same samples (the library's classifier of the dataset).
ROOT/table3.md puts the paper's numbers beside ours, with the epochs each
run had, the step of the checkpoint scored and its sample grid; a second
table gives, for the same samples, the diversity metrics of
`cign_jax.evaluation`'s registry (`registry.DIVERSITY`: improved precision
and recall, density and coverage, KID, within-class spread,
near-duplicates), each mean / min / max over the classes, which FID alone
does not show (a class drawn as nearly one image can keep a small FID);
`--diversity` names fewer of them (or none: `--diversity=`), each costing
the Inception's 2048-d pass.

--dataset: the data every run trains on and is scored against, any name
`config.data.dataset` takes (mnist, fashion_mnist, npz:PATH, folder:PATH,
tfds:NAME); the runs' image shape and classes are the data's (all wrong
labels per real image stay all of them: K - 1 for K classes), the samples
are scored against its test split with its own classifier (trained and
cached on first use). The paper's numbers are MNIST's: for another dataset
the table says there is none. Data the configs cannot train on (an unknown
name, no test split, fewer than two classes, an image size the network
does not take) is refused, naming it, before anything trains.
--image_size: resize and centre-crop the dataset's images to this size (0:
their own; the CIGN network takes 28, 32 and 64).
--max_minutes: training of all runs together stops cleanly at this limit
(the latest checkpoint saved); the same command continues where it
stopped, so a reproduction can be spread over several short sessions,
carrying ROOT back and forth. Runs not finished are listed as such.
--num_epochs: train this many epochs instead of the paper's 50.
--data_npz: MNIST as an .npz with uint8 arrays train_images, train_labels,
test_images, test_labels (for machines without tensorflow-datasets),
passed to the trainings as arrays, as before --dataset existed; it goes
with --dataset=mnist only (another dataset in an .npz is
--dataset=npz:PATH, whose arrays are images, labels, test_images,
test_labels).
--quick: a smoke test of the whole pipeline for CI on a CPU: tiny
networks, a few steps, FID at 64 features only on 64 samples per class,
and the table says so; its numbers mean nothing.

experiments/conditioning_study.py trains and scores through the same
pieces (`prepare_runs`, `train_run`, `load_classifier`, `evaluate_run`).
"""

import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, Optional

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from cign_jax import checkpoints
from cign_jax import commands
from cign_jax import config as config_lib
from cign_jax import data as data_lib
from cign_jax import run_dir
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax.commands import sample as sample_command
from cign_jax.data import reader
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import in_loop
from cign_jax.evaluation import registry
from cign_jax.sweeps import training as sweep_training

# pylint: enable=g-import-not-at-top

PAPER_RUNS = ("channel_small", "channel_large", "filter_small", "filter_large")
CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "cign_jax",
    "configs",
)
# The CIGN paper's Table 3 (mean, min, max over the ten classes).
PAPER = {
    "filter_large": {
        64: (0.8278, 0.0837, 3.25),
        192: (3.3095, 0.4912, 12.5165),
        768: (0.4423, 0.2485, 0.8765),
    },
    "filter_small": {
        64: (0.3601, 0.0959, 0.7516),
        192: (1.792, 0.5992, 5.1655),
        768: (0.3384, 0.1869, 0.4641),
    },
    "channel_large": {
        64: (0.1149, 0.0455, 0.272),
        192: (0.6598, 0.3735, 1.1886),
        768: (0.2852, 0.1576, 0.5184),
    },
    "channel_small": {
        64: (0.6586, 0.1126, 2.1216),
        192: (2.7955, 0.5908, 8.2649),
        768: (0.4619, 0.3557, 0.7127),
    },
}
PAPER_EPOCHS = 50
FEATURE_SIZES = (64, 192, 768)
SAMPLES_PER_CLASS = 1000
QUICK_FEATURE_SIZES = (64,)
QUICK_SAMPLES_PER_CLASS = 64
NOISE_SEED = 0

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when run as a script, so that importing
  this module defines none)."""
  flags.DEFINE_string(
      "root", "runs/table3", "Directory of the runs and of table3.md."
  )
  flags.DEFINE_list(
      "configs",
      list(PAPER_RUNS),
      "Config names (in cign_jax/configs) or paths.",
  )
  flags.DEFINE_string(
      "dataset",
      "mnist",
      "The data every run trains on and is scored against: mnist, "
      "fashion_mnist, npz:PATH, folder:PATH or tfds:NAME.",
  )
  flags.DEFINE_integer(
      "image_size",
      0,
      "Resize and centre-crop the dataset's images to this size; 0: their "
      "own.",
  )
  flags.DEFINE_float(
      "max_minutes",
      0.0,
      "Stop training (all runs together) after this many minutes; 0: no "
      "limit.",
  )
  flags.DEFINE_integer(
      "num_epochs", 0, "Epochs per run (0: the config's, the paper's 50)."
  )
  flags.DEFINE_string(
      "data_npz",
      None,
      "MNIST as an .npz (train_images, train_labels, test_images, "
      "test_labels; uint8), for --dataset=mnist without "
      "tensorflow-datasets.",
  )
  flags.DEFINE_list(
      "diversity",
      list(registry.DIVERSITY),
      "The diversity metrics (registry names) scored beside FID and label "
      "accuracy on the same samples; empty: none (no 2048-d Inception pass).",
  )
  flags.DEFINE_bool(
      "quick",
      False,
      "CPU smoke test: tiny networks, a few steps, FID64 on few samples "
      "(numbers not comparable).",
  )


def load_npz(path):
  """{'train': (images, labels), 'test': (images, labels)} from an .npz."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--data_npz file not found: {path}")
  keys = ("train_images", "train_labels", "test_images", "test_labels")
  with np.load(path) as f:
    missing = [k for k in keys if k not in f]
    if missing:
      raise ValueError(
          f"{path} lacks {missing} (has {f.files}); expected "
          f"uint8 arrays {keys}"
      )
    out = {}
    for split in ("train", "test"):
      images = np.asarray(f[f"{split}_images"])
      if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: {split}_images must be uint8, got " f"{images.dtype}"
        )
      out[split] = (
          images.reshape(-1, 28, 28, 1),
          np.asarray(f[f"{split}_labels"]).astype(np.int32),
      )
  return out


def config_path(name: str) -> str:
  """The config file `name` names (a name in cign_jax/configs or a path)."""
  path = (
      name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  )
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"config {name!r} not found (looked for {path}); paper runs: "
        f"{', '.join(PAPER_RUNS)}"
    )
  return path


def run_config(name: str, quick: bool, num_epochs: int):
  """(run name, config): the config `name` with this script's settings
  (`num_epochs`, in-loop label accuracy, the tiny `quick` form), on the
  config's own dataset."""
  path = config_path(name)
  config = config_lib.load_config_file(path)
  if num_epochs:
    config.num_epochs = num_epochs
    config.num_train_steps = -1
  # Label accuracy at every validation (TensorBoard eval/...; about 0.1% of
  # an epoch); the best checkpoint stays the config's (validation loss).
  if config.model.conditioning != "none":
    config.eval_samples_per_label = 5 if quick else 100
  if quick:
    config.model.latent_dim = 4
    config.model.intermediate_dim = 8
    config.batch_size = 8
    config.num_train_steps = 4
    config.eval_every_epochs = 0
    config.eval_every_steps = 2
    config.eval_num_examples = 32
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.sample_every_steps = 1000
  return os.path.splitext(os.path.basename(path))[0], config_lib.validate(
      config
  )


@dataclasses.dataclass
class PreparedRun:
  """A config ready to train on the chosen dataset.

  name: the run's name (its folder in ROOT).
  config: the config, its image shape and classes the data's.
  splits: the data as the training reads them (`reader.DataSplits`; the
    test split is what the samples are scored against).
  arrays: the arrays passed to the training ({'train', 'test'}: --data_npz),
    or None when the training reads `config.data.dataset` itself.
  """

  name: str
  config: Any
  splits: reader.DataSplits
  arrays: Optional[Dict[str, Any]] = None

  @property
  def num_train(self) -> int:
    return len(self.splits.train[1])

  @property
  def total_steps(self) -> int:
    return train_step_lib.total_train_steps(self.config, self.num_train)

  @property
  def steps_per_epoch(self) -> int:
    return max(self.num_train // int(self.config.batch_size), 1)


def fit_run_to_data(run_name, config, dataset, arrays=None) -> PreparedRun:
  """`config` on `dataset` (or on the MNIST `arrays` of --data_npz): its
  image shape and classes the data's, and as many wrong labels per real
  image as before out of the data's classes when the config asked for all
  of them (the paper's nine of ten). Raises ValueError naming the run and
  the dataset when the data cannot be trained on and scored (no test split,
  fewer than two classes for a conditional config, an image size the
  architecture does not take)."""
  config = config_lib.validate(config)
  model = config.model
  all_wrong = (
      model.num_classes > 0
      and config.loss.num_mismatch_labels == model.num_classes - 1
  )
  config.data.dataset = dataset
  for key in config_lib.FROM_DATA:
    model[key] = 0
  try:
    config = config_lib.validate(config)
    splits = reader.load_training_data(config, arrays, with_test=True)
    if all_wrong and model.conditioning != "none":
      config.loss.num_mismatch_labels = max(splits.num_classes - 1, 0)
    config = config_lib.fit_to_data(
        config,
        splits.train[0].shape[1:],
        splits.num_classes,
        splits.class_names,
    )
    if splits.test is None:
      raise ValueError(
          "the data have no test split, which the protocol scores the "
          "samples against (an .npz: arrays test_images and test_labels; a "
          "folder: a test/ sub-tree of the same layout)"
      )
  except ValueError as e:
    raise ValueError(
        f"{run_name} cannot run on --dataset={dataset}: {e}"
    ) from None
  return PreparedRun(run_name, config, splits, arrays)


def prepare_runs(
    configs, quick, num_epochs, dataset="mnist", data_npz=None, image_size=0
):
  """The `PreparedRun` of every config on `dataset`, every check done
  before anything trains (an unknown dataset or config, data a config
  cannot take: a ValueError naming it)."""
  try:
    data_lib.check_dataset_name(dataset)
  except ValueError as e:
    raise ValueError(f"--dataset: {e}") from None
  if data_npz and dataset != "mnist":
    raise ValueError(
        f"--data_npz holds MNIST's arrays and goes with --dataset=mnist, "
        f"not --dataset={dataset}; another dataset in an .npz is "
        "--dataset=npz:PATH (arrays images, labels, test_images, "
        "test_labels)"
    )
  if image_size < 0:
    raise ValueError(f"--image_size must be >= 0, got {image_size}")
  if image_size and data_lib.source_kind(dataset) is None:
    raise ValueError(
        f"--image_size resizes the images of npz:, folder: and tfds: data; "
        f"{dataset}'s are {'x'.join(map(str, data_lib.IMAGE_SHAPE[:2]))} "
        "(leave it 0)"
    )
  arrays = load_npz(data_npz) if data_npz else None
  runs = []
  for name in configs:
    run_name, config = run_config(name, quick, num_epochs)
    if any(r.name == run_name for r in runs):
      raise ValueError(f"--configs names {run_name} twice")
    config.data.image_size = image_size
    runs.append(fit_run_to_data(run_name, config, dataset, arrays))
  return runs


def trained_steps(workdir, config):
  """The steps the run in `workdir` has a checkpoint of (0: none); for a
  sweep, the fewest of its members still training (those stopped by a
  non-finite step do not count)."""
  if not config_lib.is_sweep(config):
    return _latest_step(workdir)
  stopped = stopped_members(workdir)
  steps = [
      _latest_step(sweep_training.member_dir(workdir, k))
      for k in range(len(config_lib.sweep_members(config)))
      if k not in stopped
  ]
  return min(steps) if steps else 0


def stopped_members(workdir) -> Dict[int, Any]:
  """{member: why} of the members of the sweep in `workdir` stopped by a
  non-finite step (sweep.json)."""
  record = sweep_training.read_sweep(workdir) or {}
  return {int(k): v for k, v in (record.get("stopped") or {}).items()}


def train_run(run: PreparedRun, workdir, seconds_left):
  """Trains (or resumes) `run`, a single run or a sweep; returns (finished,
  step, total steps)."""
  total = run.total_steps
  done = trained_steps(workdir, run.config)
  if done < total:
    if seconds_left is not None and seconds_left <= 0:
      return False, done, total
    in_loop.train_and_evaluate(
        run.config, workdir, run.arrays, time_limit_seconds=seconds_left
    )
    done = trained_steps(workdir, run.config)
  return done >= total, done, total


def _latest_step(workdir):
  try:
    return checkpoints.resolve_checkpoint(workdir, "latest").step
  except checkpoints.CheckpointError:
    return 0


def load_classifier(run: PreparedRun):
  """The label classifier of the run's data: the library's cached one of
  MNIST or Fashion-MNIST read by name; else one trained on the data's
  splits (cached by dataset and shape; the in-loop evaluation uses it)."""
  config = run.config
  by_name = config.data.dataset in data_lib.DATASETS and run.arrays is None
  return classifier_lib.load_or_train(
      config.data.dataset,
      config.data.data_dir,
      splits=None if by_name else (run.splits.train, run.splits.test),
  )


def evaluate_run(workdir, run: PreparedRun, quick, clf, diversity):
  """The paper's protocol on the best checkpoint of the run in `workdir`
  (a run of `run`'s config, or a member of its sweep), against the test
  split of `run`'s data; cached in WORKDIR/table3_eval.json per step and
  protocol."""
  chosen = checkpoints.resolve_checkpoint(workdir, "best")
  sizes = QUICK_FEATURE_SIZES if quick else FEATURE_SIZES
  per_class = QUICK_SAMPLES_PER_CLASS if quick else SAMPLES_PER_CLASS
  names = metric_names(sizes, diversity)
  protocol = {
      "step": chosen.step,
      "feature_sizes": list(sizes),
      "samples_per_class": per_class,
      "noise_seed": NOISE_SEED,
      "metrics": names,
  }
  cache = os.path.join(workdir, "table3_eval.json")
  if os.path.isfile(cache):
    with open(cache) as f:
      cached = json.load(f)
    if cached.get("protocol") == protocol:
      return cached
  images, labels, _, _ = evaluate.generate_for_eval(
      workdir,
      per_class,
      applications=1,
      seed=NOISE_SEED,
      checkpoint=chosen.step,
  )
  report = evaluate.evaluate_samples(
      images,
      labels,
      metrics=names,
      progress=False,
      real=run.splits.test,
      train=run.splits.train,
      clf=clf,
      dataset=checkpoints.load_config(workdir).data.dataset,
  )
  grid = os.path.join(workdir, "table3_samples.npz")
  sample_command.sample_to_file(
      workdir, grid, num_per_label=10, seed=NOISE_SEED, checkpoint=chosen.step
  )
  result = {
      "protocol": protocol,
      "checkpoint": chosen.reason,
      "fid": report["fid"],
      "fid_counts": report["fid_counts"],
      "label_accuracy": report["label_accuracy"]["accuracy"],
      "label_accuracy_per_label": report["label_accuracy"]["per_label"],
      "metrics": report["metrics"],
      "grid": grid[:-4] + ".png",
  }
  with open(cache, "w") as f:
    json.dump(result, f, indent=2)
  return result


def metric_names(sizes, diversity=registry.DIVERSITY):
  """The registry names scored: FID at `sizes`, label accuracy, and the
  `diversity` metrics."""
  unknown = [n for n in diversity if n not in registry.DIVERSITY]
  if unknown:
    raise ValueError(
        f"--diversity: {', '.join(unknown)} not among the diversity metrics "
        f"{', '.join(registry.DIVERSITY)}"
    )
  return [f"fid{s}" for s in sizes] + ["label_accuracy"] + list(diversity)


def _number(value):
  return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"


def _triple(values):
  return " / ".join(_number(v) for v in values)


def write_table(path, rows, quick, sizes, dataset="mnist"):
  """ROOT/table3.md: a row per run of `rows` (the paper's beside it for
  MNIST), the diversity table and the sample grids."""
  lines = ["# CIGN Table 3, reproduced", "", f"Dataset: {dataset}.", ""]
  if quick:
    lines += [
        "**Quick smoke test (--quick)**: tiny networks trained for a "
        "few steps, FID at 64 features on "
        f"{QUICK_SAMPLES_PER_CLASS} samples per class; the pipeline is "
        "the paper's protocol but the numbers are not comparable with "
        "the paper's.",
        "",
    ]
  else:
    lines += [
        "Protocol: the best checkpoint of each run (lowest validation "
        "loss, as the original), 1000 samples per label (noise seed "
        "0) against the first 1000 test images of that label; "
        "per-class FID mean / min / max over the classes; label "
        "accuracy of the same samples with cign_jax's classifier of the "
        "dataset.",
        "",
    ]
  header = (
      ["run", "source", "epochs", "checkpoint"]
      + [f"FID{s} mean / min / max" for s in sizes]
      + ["label accuracy (min)"]
  )
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    name = row["name"]
    if name in PAPER and not quick and dataset == "mnist":
      lines.append(
          "| "
          + " | ".join(
              [name, "paper", str(PAPER_EPOCHS), "best by val loss"]
              + [_triple(PAPER[name][s]) for s in sizes]
              + ["-"]
          )
          + " |"
      )
    elif name in PAPER and not quick:
      lines.append(
          "| "
          + " | ".join(
              [
                  name,
                  "paper",
                  "-",
                  f"no paper figure for {dataset} (MNIST only)",
              ]
              + ["-"] * (len(sizes) + 1)
          )
          + " |"
      )
    result = row.get("result")
    if result is None:
      lines.append(
          "| "
          + " | ".join(
              [
                  name,
                  "cign_jax",
                  f"{row['epochs']:.2f} of {row['target_epochs']}",
                  row["status"],
              ]
              + ["-"] * (len(sizes) + 1)
          )
          + " |"
      )
      continue
    fid = result["fid"]
    acc = result["label_accuracy"]
    weakest = min(
        a for a in result["label_accuracy_per_label"] if a is not None
    )
    lines.append(
        "| "
        + " | ".join(
            [
                name,
                "cign_jax",
                f"{row['epochs']:.2f}",
                f"step {result['protocol']['step']} ({result['checkpoint']})",
            ]
            + [
                _triple(
                    (
                        fid[str(s)]["mean"],
                        fid[str(s)]["min"],
                        fid[str(s)]["max"],
                    )
                )
                for s in sizes
            ]
            + [f"{acc:.4f} ({weakest:.2f})"]
        )
        + " |"
    )
  lines += _diversity_table(rows)
  lines += [
      "",
      "## Samples (best checkpoint, one row per label, noise seed 0)",
      "",
  ]
  for row in rows:
    if row.get("result"):
      rel = os.path.relpath(row["result"]["grid"], os.path.dirname(path))
      lines += [f"### {row['name']}", "", f"![{row['name']}]({rel})", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _diversity_table(rows):
  """The registry's diversity metrics of the same samples, one row per
  scored run (mean / min / max over the classes)."""
  scored = [r for r in rows if r.get("result")]
  names = [
      n
      for n in registry.DIVERSITY
      if any(n in r["result"].get("metrics", {}) for r in scored)
  ]
  if not names:
    return []
  lines = [
      "",
      "## Diversity of the same samples",
      "",
      "On the FID Inception's 2048-d features, each class's samples "
      "against as many of its test images; mean / min / max over the "
      "classes. Precision, recall, density and coverage: about 1 for "
      "samples like the data (density can pass 1); recall and "
      "coverage near 0, spread well below 1 and near-duplicates near "
      "1 say a class collapsed onto few images. KID: lower is better, "
      "about 0 for the data itself (docs/design.md has the "
      "definitions).",
      "",
  ]
  header = ["run"] + [f"{registry.title(n)} mean / min / max" for n in names]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in scored:
    metrics = row["result"].get("metrics", {})
    cells = [row["name"]]
    for name in names:
      m = metrics.get(name)
      cells.append(
          "-" if m is None else _triple((m["mean"], m["min"], m["max"]))
      )
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def reproduce(
    root,
    configs=PAPER_RUNS,
    dataset="mnist",
    quick=False,
    num_epochs=0,
    max_minutes=0.0,
    data_npz=None,
    diversity=registry.DIVERSITY,
    image_size=0,
):
  """What the command does (its flags as arguments); returns the path of
  table3.md."""
  start = time.time()
  deadline = start + max_minutes * 60 if max_minutes > 0 else None
  sizes = QUICK_FEATURE_SIZES if quick else FEATURE_SIZES
  metric_names(sizes, diversity)  # an unknown name fails before training
  runs = prepare_runs(configs, quick, num_epochs, dataset, data_npz, image_size)
  os.makedirs(root, exist_ok=True)
  rows = []
  clf = None
  for run in runs:
    workdir = os.path.join(root, run.name)
    left = None if deadline is None else deadline - time.time()
    finished, step, total = train_run(run, workdir, left)
    row = {
        "name": run.name,
        "epochs": step / run.steps_per_epoch,
        "target_epochs": f"{total / run.steps_per_epoch:g}",
    }
    if not finished:
      row["status"] = (
          f"training stopped at step {step} of {total} (time "
          "limit); run the same command again to resume"
      )
      print(f"{run.name}: {row['status']}")
    else:
      if clf is None:
        clf = load_classifier(run)
      row["result"] = evaluate_run(workdir, run, quick, clf, diversity)
      print(f"{run.name}: scored {row['result']['checkpoint']}")
    rows.append(row)
  out = os.path.join(root, "table3.md")
  write_table(out, rows, quick, sizes, dataset)
  print(f"wrote {out} ({time.time() - start:.0f} s)")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  utils.enable_compilation_cache()
  reproduce(
      FLAGS.root,
      configs=FLAGS.configs,
      dataset=FLAGS.dataset,
      quick=FLAGS.quick,
      num_epochs=FLAGS.num_epochs,
      max_minutes=FLAGS.max_minutes,
      data_npz=FLAGS.data_npz,
      diversity=FLAGS.diversity,
      image_size=FLAGS.image_size,
  )


if __name__ == "__main__":
  define_flags()
  # Failures end on one `error:` line, and a SIGTERM stop (the training
  # saved its step) on its own line with status 143, as the commands do.
  with run_dir.noting_sigterm():
    app.run(commands.guarded(main))
