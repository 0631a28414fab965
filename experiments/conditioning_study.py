"""Channel or filter conditioning: is either better, beyond the spread of
training seeds? The CIGN paper left it open ("the jury is still out") from
one run per config; this trains each config with several seeds and tests
the differences.

  python experiments/conditioning_study.py --root=runs/conditioning_study \\
      [--configs=channel_small,channel_large,filter_small,filter_large] \\
      [--num_seeds=4] [--dataset=mnist] [--image_size=0] [--max_minutes=0] \\
      [--num_epochs=0] [--quick] [--diversity=precision,recall]

For each config (a name in cign_jax/configs or a path): one sweep
(`config.sweep.seed = (0, ..., N-1)`, `cign_jax.sweeps`: the N seeds
trained together in one jitted program) in ROOT/NAME, its members complete
runs in ROOT/NAME/members/<k>/ (member k has seed k; seed 0 is the seed
of reproduce_table3.py's run). Each member's best checkpoint (lowest
validation loss, as the original) is scored with the paper's protocol,
reproduce_table3.py's own evaluation (`evaluate_run`, cached beside the
member in table3_eval.json): 1000 samples per label (noise seed 0) against
the first 1000 test images of that label, per-class FID at 64, 192 and 768
features (the mean over the classes), the label accuracy of the same
samples, and the registry's improved precision and recall (`--diversity`:
other diversity metrics of `registry.DIVERSITY`, or none).

ROOT/conditioning_study.md gives, per config, the mean and sample standard
deviation over the seeds of every metric and, for every pair of configs and
every metric, Welch's t-test of the two means (t, the Welch-Satterthwaite
degrees of freedom, the two-sided p): a difference with p < 0.05 exceeds
what the seed-to-seed spread explains. ROOT/conditioning_study.json holds
the per-seed numbers and the tests.

--max_minutes: training of all configs together stops cleanly at this limit
(every member's checkpoint saved); the same command resumes each sweep from
its members' checkpoints, skips finished training and reuses cached
evaluations. --num_epochs: epochs per run instead of the config's (the
paper's 50). --dataset / --image_size: the data, as reproduce_table3.py
takes them (refused before anything trains when a config cannot take
them). --quick: a smoke test for CI on a CPU: tiny networks, a few steps, 2
seeds, FID at 64 features on 64 samples per class; the report says its
numbers mean nothing.
"""

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from absl import app
from absl import flags
from scipy import special

EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(EXPERIMENTS))
sys.path.insert(0, EXPERIMENTS)
# pylint: disable=g-import-not-at-top,wrong-import-position
from cign_jax import commands
from cign_jax import config as config_lib
from cign_jax import run_dir
from cign_jax import train
from cign_jax import utils
from cign_jax.evaluation import registry
from cign_jax.sweeps import training as sweep_training
import reproduce_table3 as table3

# pylint: enable=g-import-not-at-top,wrong-import-position

NUM_SEEDS = 4
QUICK_NUM_SEEDS = 2
DIVERSITY = ("precision", "recall")
# A difference of means with a two-sided p below this exceeds the spread.
SIGNIFICANCE = 0.05
REPORT_FILE = "conditioning_study.md"
RAW_FILE = "conditioning_study.json"

FLAGS = flags.FLAGS


def define_flags():
  """The command's flags (defined when run as a script, so that importing
  this module defines none)."""
  flags.DEFINE_string(
      "root",
      "runs/conditioning_study",
      f"Directory of the sweeps, {REPORT_FILE} and {RAW_FILE}.",
  )
  flags.DEFINE_list(
      "configs",
      list(table3.PAPER_RUNS),
      "Config names (in cign_jax/configs) or paths.",
  )
  flags.DEFINE_integer(
      "num_seeds",
      None,
      f"Seeds per config, 0..N-1 (default {NUM_SEEDS}; {QUICK_NUM_SEEDS} "
      "with --quick).",
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
      "Stop training (all configs together) after this many minutes; 0: no "
      "limit.",
  )
  flags.DEFINE_integer(
      "num_epochs", 0, "Epochs per run (0: the config's, the paper's 50)."
  )
  flags.DEFINE_list(
      "diversity",
      list(DIVERSITY),
      "The diversity metrics (registry names) scored beside FID and label "
      f"accuracy, of {', '.join(registry.DIVERSITY)}; empty: none.",
  )
  flags.DEFINE_bool(
      "quick",
      False,
      "CPU smoke test: tiny networks, a few steps, 2 seeds, FID64 on few "
      "samples (numbers mean nothing).",
  )


# --- Statistics ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
  """The mean and the sample standard deviation (n - 1 in the
  denominator; NaN for fewer than two values) of n values."""

  mean: float
  std: float
  n: int


def summarize(values: Sequence[float]) -> Summary:
  values = [float(v) for v in values]
  n = len(values)
  if not n:
    raise ValueError("no values to summarize")
  mean = sum(values) / n
  if n < 2:
    return Summary(mean, math.nan, n)
  variance = sum((v - mean) ** 2 for v in values) / (n - 1)
  return Summary(mean, math.sqrt(variance), n)


@dataclasses.dataclass(frozen=True)
class WelchTest:
  """Welch's t-test of mean(a) - mean(b): t, the Welch-Satterthwaite degrees
  of freedom and the two-sided p (all NaN when neither side varies, where
  the test is undefined)."""

  t: float
  df: float
  p: float

  @property
  def beyond_spread(self) -> bool:
    """The difference exceeds what the seed-to-seed spread explains."""
    return bool(self.p < SIGNIFICANCE)  # False for NaN


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchTest:
  """Welch's unequal-variance t-test of the means of `a` and `b` (two or
  more values each)."""
  sa, sb = summarize(a), summarize(b)
  if sa.n < 2 or sb.n < 2:
    raise ValueError(
        f"Welch's t-test needs two or more values per side, got {sa.n} and "
        f"{sb.n}"
    )
  va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
  if va + vb == 0:
    return WelchTest(math.nan, math.nan, math.nan)
  t = (sa.mean - sb.mean) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
  p = float(2 * special.stdtr(df, -abs(t)))  # Student's t CDF
  return WelchTest(t, df, p)


def verdict(test: WelchTest, name_a: str, name_b: str, mean_a, mean_b, better):
  """Whether the difference exceeds the seed spread (p < SIGNIFICANCE), and
  then which config is better by the metric's direction (`better`:
  registry.LOWER, HIGHER or None)."""
  if math.isnan(test.p):
    return "untestable: no spread over the seeds"
  if not test.beyond_spread:
    return "no"
  if better is None:
    return f"yes: {name_a if mean_a > mean_b else name_b} higher"
  a_better = (mean_a < mean_b) == (better == registry.LOWER)
  return f"yes: {name_a if a_better else name_b} better"


# --- Training and scoring -----------------------------------------------------


def _finite_or_none(value):
  return None if value is None or math.isnan(value) else value


def study(
    root,
    configs=table3.PAPER_RUNS,
    num_seeds: Optional[int] = None,
    dataset="mnist",
    quick=False,
    num_epochs=0,
    max_minutes=0.0,
    diversity=DIVERSITY,
    image_size=0,
):
  """What the command does (its flags as arguments); returns the path of
  the report."""
  start = time.time()
  deadline = start + max_minutes * 60 if max_minutes > 0 else None
  if num_seeds is None:
    num_seeds = QUICK_NUM_SEEDS if quick else NUM_SEEDS
  if num_seeds < 2:
    raise ValueError(
        f"--num_seeds must be >= 2 (a standard deviation over seeds needs "
        f"two), got {num_seeds}"
    )
  sizes = table3.QUICK_FEATURE_SIZES if quick else table3.FEATURE_SIZES
  names = table3.metric_names(sizes, diversity)
  runs = table3.prepare_runs(
      configs, quick, num_epochs, dataset, image_size=image_size
  )
  for run in runs:
    run.config.sweep.seed = tuple(range(num_seeds))
    run.config = config_lib.validate(run.config)
  os.makedirs(root, exist_ok=True)
  records = []
  clf = None
  for run in runs:
    workdir = os.path.join(root, run.name)
    left = None if deadline is None else deadline - time.time()
    seeds = config_lib.sweep_members(run.config)
    total = run.total_steps
    step = table3.trained_steps(workdir, run.config)
    finished = False
    if len(table3.stopped_members(workdir)) < len(seeds):
      try:
        finished, step, total = table3.train_run(run, workdir, left)
      except train.NonFiniteLossError:
        # Every seed stopped on a non-finite step (sweep.json says where):
        # reported below, and the other configs go on.
        if len(table3.stopped_members(workdir)) < len(seeds):
          raise
    record = {
        "name": run.name,
        "epochs": step / run.steps_per_epoch,
        "target_epochs": total / run.steps_per_epoch,
        "members": [],
    }
    if len(table3.stopped_members(workdir)) == len(seeds):
      record["status"] = (
          "every seed stopped on a non-finite step (sweep.json says where); "
          "nothing to score"
      )
    elif not finished:
      record["status"] = (
          f"training stopped at step {step} of {total} (time limit); run "
          "the same command again to resume"
      )
    if "status" in record:
      print(f"{run.name}: {record['status']}")
      records.append(record)
      continue
    stopped = table3.stopped_members(workdir)
    for k, settings in enumerate(seeds):
      member = sweep_training.member_dir(workdir, k)
      entry = {"seed": settings["seed"], "dir": os.path.relpath(member, root)}
      if k in stopped:
        entry["stopped"] = (
            f"stopped at step {stopped[k]['step']}: {stopped[k]['reason']}"
        )
      else:
        if clf is None:
          clf = table3.load_classifier(run)
        result = table3.evaluate_run(member, run, quick, clf, diversity)
        entry.update(
            step=result["protocol"]["step"],
            checkpoint=result["checkpoint"],
            metrics={n: result["metrics"][n]["mean"] for n in names},
        )
      record["members"].append(entry)
    print(f"{run.name}: scored {len(record['members'])} seeds")
    records.append(record)
  path = os.path.join(root, REPORT_FILE)
  raw = write_report(path, records, names, quick, dataset, num_seeds)
  with open(os.path.join(root, RAW_FILE), "w") as f:
    json.dump(raw, f, indent=2)
  print(f"wrote {path} ({time.time() - start:.0f} s)")
  return path


# --- The report ---------------------------------------------------------------


def _number(value) -> str:
  if value is None or math.isnan(value):
    return "-"
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4f}"
  return f"{value:.2e}"


def scored_values(record, name) -> List[float]:
  """The per-seed values of metric `name` of the config's scored members."""
  return [m["metrics"][name] for m in record["members"] if "metrics" in m]


def write_report(path, records, names, quick, dataset, num_seeds) -> Dict:
  """Writes the markdown report of `records` (per config: name, epochs,
  target_epochs, status when unfinished, members [{seed, metrics} or
  {seed, stopped}]) and returns what the JSON keeps: the records, the
  summaries and the tests."""
  lines = ["# Channel or filter conditioning, over training seeds", ""]
  if quick:
    lines += [
        "**Quick smoke test (--quick)**: tiny networks trained for a few "
        "steps, FID at 64 features on "
        f"{table3.QUICK_SAMPLES_PER_CLASS} samples per class: the pipeline "
        "of the study, whose numbers mean nothing.",
        "",
    ]
  lines += [
      f"Dataset: {dataset}. Each config trained with seeds "
      f"0..{num_seeds - 1} (one sweep, ROOT/<config>/members/<k>/); each "
      "member's best checkpoint (lowest validation loss) scored with the "
      "paper's protocol: "
      + (
          f"{table3.QUICK_SAMPLES_PER_CLASS}"
          if quick
          else f"{table3.SAMPLES_PER_CLASS}"
      )
      + " samples per label (noise seed 0) against as many test images of "
      "the label; per-class metrics averaged over the classes, label "
      f"accuracy over all samples. The per-seed numbers are in {RAW_FILE}.",
      "",
      "## Per config: mean ± standard deviation over the seeds",
      "",
  ]
  titles = [registry.title(n) for n in names]
  header = ["config", "seeds scored", "epochs"] + [
      f"{t} ({registry.direction(n) or 'neither'} better)"
      for n, t in zip(names, titles)
  ]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  summaries = {}
  notes = []
  for record in records:
    scored = [m for m in record["members"] if "metrics" in m]
    epochs = f"{record['epochs']:.2f} of {record['target_epochs']:.4g}"
    cells = [record["name"], str(len(scored)), epochs]
    summaries[record["name"]] = {}
    for name in names:
      values = scored_values(record, name)
      if not values:
        cells.append("-")
        continue
      s = summarize(values)
      summaries[record["name"]][name] = {
          "mean": s.mean,
          "std": _finite_or_none(s.std),
          "n": s.n,
      }
      cells.append(f"{_number(s.mean)} ± {_number(s.std)}")
    lines.append("| " + " | ".join(cells) + " |")
    if "status" in record:
      notes.append(f"- {record['name']}: {record['status']}")
    for m in record["members"]:
      if "stopped" in m:
        notes.append(
            f"- {record['name']} seed {m['seed']}: {m['stopped']} (not "
            "scored)"
        )
  lines += [
      "",
      "## Pairs: Welch's t-test of the means, per metric",
      "",
      "t of mean(A) - mean(B) with unequal variances, degrees of freedom by "
      "Welch-Satterthwaite, two-sided p; the difference exceeds the "
      f"seed-to-seed spread when p < {SIGNIFICANCE}.",
      "",
  ]
  header = [
      "A",
      "B",
      "metric",
      "mean(A) - mean(B)",
      "t",
      "df",
      "p",
      f"beyond the seed spread (p < {SIGNIFICANCE})",
  ]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  tests = []
  for a, b in itertools.combinations(records, 2):
    for name, title in zip(names, titles):
      va, vb = scored_values(a, name), scored_values(b, name)
      if len(va) < 2 or len(vb) < 2:
        continue
      test = welch_test(va, vb)
      ma, mb = summarize(va).mean, summarize(vb).mean
      said = verdict(
          test, a["name"], b["name"], ma, mb, registry.direction(name)
      )
      lines.append(
          "| "
          + " | ".join(
              [
                  a["name"],
                  b["name"],
                  title,
                  _number(ma - mb),
                  _number(test.t),
                  _number(test.df),
                  _number(test.p),
                  said,
              ]
          )
          + " |"
      )
      tests.append(
          {
              "a": a["name"],
              "b": b["name"],
              "metric": name,
              "difference": ma - mb,
              "t": _finite_or_none(test.t),
              "df": _finite_or_none(test.df),
              "p": _finite_or_none(test.p),
              "beyond_spread": test.beyond_spread,
              "verdict": said,
          }
      )
  if not tests:
    lines += ["", "No pair of configs has two scored seeds each."]
  if notes:
    lines += ["", "## Not scored", ""] + notes
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return {
      "dataset": dataset,
      "quick": quick,
      "num_seeds": num_seeds,
      "metrics": list(names),
      "configs": records,
      "summaries": summaries,
      "tests": tests,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  utils.enable_compilation_cache()
  study(
      FLAGS.root,
      configs=FLAGS.configs,
      num_seeds=FLAGS.num_seeds,
      dataset=FLAGS.dataset,
      quick=FLAGS.quick,
      num_epochs=FLAGS.num_epochs,
      max_minutes=FLAGS.max_minutes,
      diversity=FLAGS.diversity,
      image_size=FLAGS.image_size,
  )


if __name__ == "__main__":
  define_flags()
  # Failures end on one `error:` line, and a SIGTERM stop (the trainings
  # saved their step) on its own line with status 143, as the commands do.
  with run_dir.noting_sigterm():
    app.run(commands.guarded(main))
