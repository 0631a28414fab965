"""Rebuilds the CIGN paper's Table 3: trains the paper's runs, scores each
one's best checkpoint with the paper's protocol, writes table3.md.

  python experiments/reproduce_table3.py --root=runs/table3 \
      [--configs=channel_small,channel_large,filter_small,filter_large] \
      [--max_minutes=0] [--num_epochs=0] [--data_npz=mnist.npz] [--quick] \
      [--diversity=precision,recall,...]

For each config (a name in cign_jax/configs or a path): trains it in
ROOT/NAME (resuming when that directory holds a run; the best checkpoint
is kept by validation loss, as the original), then evaluates its best
checkpoint as the paper did: 1000 samples generated per label (noise seed
0) against the first 1000 test images of that label, per-class FID at 64,
192 and 768 features (mean, min, max over the ten classes), plus the label
accuracy of the same samples (the library's classifier). ROOT/table3.md
puts the paper's numbers beside ours, with the epochs each run had, the
step of the checkpoint scored and its sample grid; a second table gives,
for the same samples, the diversity metrics of `cign_jax.evaluation`'s
registry (`registry.DIVERSITY`: improved precision and recall, density and
coverage, KID, within-class spread, near-duplicates), each mean / min /
max over the classes, which FID alone does not show (a class drawn as
nearly one image can keep a small FID); `--diversity` names fewer of them
(or none: `--diversity=`), each costing the Inception's 2048-d pass.

--max_minutes: training of all runs together stops cleanly at this limit
(the latest checkpoint saved); the same command continues where it
stopped, so a reproduction can be spread over several short sessions,
carrying ROOT back and forth. Runs not finished are listed as such.
--num_epochs: train this many epochs instead of the paper's 50.
--data_npz: the dataset as an .npz with uint8 arrays train_images,
train_labels, test_images, test_labels (for machines without
tensorflow-datasets); default: tensorflow-datasets.
--quick: a smoke test of the whole pipeline for CI on a CPU: tiny
networks, a few steps, FID at 64 features only on 64 samples per class,
and the table says so; its numbers mean nothing.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
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
from cign_jax.evaluation import classifier as classifier_lib
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import in_loop
from cign_jax.evaluation import registry

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
flags.DEFINE_string(
    "root", "runs/table3", "Directory of the runs and of " "table3.md."
)
flags.DEFINE_list(
    "configs",
    list(PAPER_RUNS),
    "Config names (in " "cign_jax/configs) or paths.",
)
flags.DEFINE_float(
    "max_minutes",
    0.0,
    "Stop training (all runs together) "
    "after this many minutes; 0: no limit.",
)
flags.DEFINE_integer(
    "num_epochs", 0, "Epochs per run (0: the config's, the " "paper's 50)."
)
flags.DEFINE_string(
    "data_npz",
    None,
    "Dataset .npz (train_images, "
    "train_labels, test_images, test_labels; uint8).",
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
    "CPU smoke test: tiny networks, a few "
    "steps, FID64 on few samples (numbers not comparable).",
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


def run_config(name: str, quick: bool, num_epochs: int):
  path = (
      name if name.endswith(".py") else os.path.join(CONFIG_DIR, f"{name}.py")
  )
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"config {name!r} not found (looked for {path}); paper runs: "
        f"{', '.join(PAPER_RUNS)}"
    )
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


def train_run(config, workdir, data, seconds_left):
  """Trains (or resumes); returns (finished, step, total steps)."""
  n_train = _num_train(data)
  total = train_step_lib.total_train_steps(config, n_train)
  done = _latest_step(workdir)
  if done < total:
    if seconds_left is not None and seconds_left <= 0:
      return False, done, total
    state = in_loop.train_and_evaluate(
        config, workdir, data, time_limit_seconds=seconds_left
    )
    done = int(jax.device_get(state.step))
  return done >= total, done, total


def _num_train(data):
  return len(data["train"][1]) if data else data_lib.SPLIT_SIZES["train"]


def _latest_step(workdir):
  try:
    return checkpoints.resolve_checkpoint(workdir, "latest").step
  except checkpoints.CheckpointError:
    return 0


def evaluate_run(workdir, data, quick, clf):
  """The paper's protocol on the run's best checkpoint (cached in
  WORKDIR/table3_eval.json per step and protocol)."""
  chosen = checkpoints.resolve_checkpoint(workdir, "best")
  sizes = QUICK_FEATURE_SIZES if quick else FEATURE_SIZES
  per_class = QUICK_SAMPLES_PER_CLASS if quick else SAMPLES_PER_CLASS
  names = metric_names(sizes, FLAGS.diversity)
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
  real = None if data is None else data["test"]
  report = evaluate.evaluate_samples(
      images,
      labels,
      metrics=names,
      progress=False,
      real=real,
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


def write_table(path, rows, quick, sizes):
  lines = ["# CIGN Table 3, reproduced", ""]
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
        "per-class FID mean / min / max over the ten classes; label "
        "accuracy of the same samples with cign_jax's classifier.",
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
    if name in PAPER and not quick:
      lines.append(
          "| "
          + " | ".join(
              [name, "paper", str(PAPER_EPOCHS), "best by val loss"]
              + [_triple(PAPER[name][s]) for s in sizes]
              + ["-"]
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  utils.enable_compilation_cache()
  start = time.time()
  deadline = start + FLAGS.max_minutes * 60 if FLAGS.max_minutes > 0 else None
  data = load_npz(FLAGS.data_npz) if FLAGS.data_npz else None
  os.makedirs(FLAGS.root, exist_ok=True)
  rows = []
  clf = None
  for name in FLAGS.configs:
    run_name, config = run_config(name, FLAGS.quick, FLAGS.num_epochs)
    workdir = os.path.join(FLAGS.root, run_name)
    left = None if deadline is None else deadline - time.time()
    finished, step, total = train_run(config, workdir, data, left)
    steps_per_epoch = _num_train(data) // config.batch_size
    row = {
        "name": run_name,
        "epochs": step / steps_per_epoch,
        "target_epochs": f"{total / steps_per_epoch:g}",
    }
    if not finished:
      row["status"] = (
          f"training stopped at step {step} of {total} (time "
          "limit); run the same command again to resume"
      )
      print(f"{run_name}: {row['status']}")
    else:
      if clf is None:
        clf = classifier_lib.load_or_train(
            config.data.dataset,
            config.data.data_dir,
            splits=None if data is None else (data["train"], data["test"]),
        )
      row["result"] = evaluate_run(workdir, data, FLAGS.quick, clf)
      print(f"{run_name}: scored {row['result']['checkpoint']}")
    rows.append(row)
  sizes = QUICK_FEATURE_SIZES if FLAGS.quick else FEATURE_SIZES
  out = os.path.join(FLAGS.root, "table3.md")
  write_table(out, rows, FLAGS.quick, sizes)
  print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
  # Failures end on one `error:` line, and a SIGTERM stop (the training
  # saved its step) on its own line with status 143, as the commands do.
  with run_dir.noting_sigterm():
    app.run(commands.guarded(main))
