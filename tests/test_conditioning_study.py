"""experiments/conditioning_study.py: its statistics against values worked
out by hand (mean and sample standard deviation; Welch's t, its
Welch-Satterthwaite degrees of freedom and its two-sided p, the p from
closed forms of Student's t at 1 and 2 degrees of freedom and from the
density integrated here), the p < 0.05 verdict, the report from given
results, and the quick form end to end on an 'npz:' dataset made here, with
two configs (channel_small and filter_small: one of each conditioning, each
its own compiled sweep; the four would cost two more compilations and
nothing else new), two seeds each. The FID Inception is replaced by a
deterministic stand-in (its weights are a download)."""

from fractions import Fraction
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from cign_jax import checkpoints
from cign_jax import utils
from cign_jax.evaluation import evaluate
from cign_jax.evaluation import in_loop
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "conditioning_study.py")


@pytest.fixture(name="study", scope="module")
def _study():
  spec = importlib.util.spec_from_file_location("conditioning_study", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _student_t_two_sided_p(t, df, points=200_001):
  """2 P(T > |t|) for Student's t with `df` degrees of freedom: 1 minus
  twice the density's integral over [0, |t|] (Simpson's rule)."""
  x = np.linspace(0.0, abs(t), points)
  log_c = (
      math.lgamma((df + 1) / 2)
      - math.lgamma(df / 2)
      - 0.5 * math.log(df * math.pi)
  )
  density = np.exp(log_c - (df + 1) / 2 * np.log1p(x**2 / df))
  h = x[1] - x[0]
  integral = (
      h
      / 3
      * (
          density[0]
          + density[-1]
          + 4 * density[1:-1:2].sum()
          + 2 * density[2:-1:2].sum()
      )
  )
  return 1 - 2 * integral


def test_mean_and_sample_standard_deviation(study):
  s = study.summarize([1, 2, 3, 4])
  # mean 10/4; squares of the deviations 2.25 + 0.25 + 0.25 + 2.25 = 5,
  # over n - 1 = 3.
  assert (s.mean, s.n) == (2.5, 4)
  assert s.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
  one = study.summarize([7.0])
  assert one.mean == 7.0 and math.isnan(one.std)
  with pytest.raises(ValueError, match="no values"):
    study.summarize([])


def test_welch_at_two_degrees_of_freedom(study):
  # Means 1 and 4, variances 2 and 2, n 2 and 2: squared standard error
  # 2/2 + 2/2 = 2, t = -3 / sqrt(2), df = 2^2 / (1^2/1 + 1^2/1) = 2, where
  # Student's two-sided p is 1 - |t| / sqrt(t^2 + 2).
  test = study.welch_test([0, 2], [3, 5])
  t = -3 / math.sqrt(2)
  assert test.t == pytest.approx(t, rel=1e-12)
  assert test.df == pytest.approx(2.0, rel=1e-12)
  assert test.p == pytest.approx(1 - abs(t) / math.sqrt(t**2 + 2), rel=1e-9)
  assert test.p == pytest.approx(0.16795, abs=1e-5)
  assert not test.beyond_spread


def test_welch_at_one_degree_of_freedom(study):
  # Variances 2 and 0: squared standard error 1, t = (1 - 5) / 1 = -4,
  # df = 1^2 / (1^2 / 1) = 1: the Cauchy, p = 1 - (2 / pi) atan(4).
  test = study.welch_test([0, 2], [5, 5])
  assert test.t == pytest.approx(-4.0, rel=1e-12)
  assert test.df == pytest.approx(1.0, rel=1e-12)
  assert test.p == pytest.approx(1 - 2 / math.pi * math.atan(4), rel=1e-9)


def test_welch_with_unequal_sizes_and_spreads(study):
  a, b = [1, 2, 3, 4], [2, 4, 9]
  # Means 5/2 and 5; variances 5/3 and ((-3)^2 + (-1)^2 + 4^2) / 2 = 13.
  va, vb = Fraction(5, 3) / 4, Fraction(13) / 3
  t = -2.5 / math.sqrt(va + vb)  # va + vb = 57/12
  df = float((va + vb) ** 2 / (va**2 / 3 + vb**2 / 2))
  test = study.welch_test(a, b)
  assert test.t == pytest.approx(t, rel=1e-12)
  assert test.t == pytest.approx(-1.1470787, rel=1e-6)
  assert test.df == pytest.approx(df, rel=1e-12)
  assert test.df == pytest.approx(2.3883852, rel=1e-6)
  assert test.p == pytest.approx(_student_t_two_sided_p(t, df), rel=1e-7)
  # The other order: t changes sign, df and p do not.
  back = study.welch_test(b, a)
  assert (back.t, back.df, back.p) == pytest.approx((-test.t, test.df, test.p))
  with pytest.raises(ValueError, match="two or more values per side"):
    study.welch_test([1.0], [1.0, 2.0])


def test_the_verdict_is_p_below_five_percent(study):
  # t = -10 / sqrt(2) at 2 degrees of freedom: p = 1 - |t| / sqrt(t^2 + 2)
  # = 1 - 7.0711 / 7.2111 = 0.0194.
  apart = study.welch_test([0, 2], [10, 12])
  assert apart.p == pytest.approx(1 - math.sqrt(50) / math.sqrt(52), rel=1e-9)
  assert apart.beyond_spread
  assert study.verdict(apart, "c", "f", 1.0, 11.0, "lower") == "yes: c better"
  assert study.verdict(apart, "c", "f", 1.0, 11.0, "higher") == "yes: f better"
  assert study.verdict(apart, "c", "f", 1.0, 11.0, None) == "yes: f higher"
  close = study.welch_test([0, 2], [3, 5])
  assert study.verdict(close, "c", "f", 1.0, 4.0, "lower") == "no"
  flat = study.welch_test([1, 1], [2, 2])
  assert math.isnan(flat.p) and not flat.beyond_spread
  assert study.verdict(flat, "c", "f", 1.0, 2.0, "lower") == (
      "untestable: no spread over the seeds"
  )


def test_the_report_from_given_results(study, tmp_path):
  def member(seed, fid64, accuracy):
    return {
        "seed": seed,
        "metrics": {"fid64": fid64, "label_accuracy": accuracy},
    }

  records = [
      {
          "name": "channel_small",
          "epochs": 50.0,
          "target_epochs": 50.0,
          "members": [member(0, 0.0, 0.9), member(1, 2.0, 0.9)],
      },
      {
          "name": "filter_small",
          "epochs": 50.0,
          "target_epochs": 50.0,
          "members": [
              member(0, 10.0, 0.8),
              member(1, 12.0, 0.8),
              {"seed": 2, "stopped": "stopped at step 7: non-finite loss"},
          ],
      },
      {
          "name": "filter_large",
          "epochs": 1.5,
          "target_epochs": 50.0,
          "members": [],
          "status": "training stopped at step 3 of 100 (time limit)",
      },
  ]
  path = str(tmp_path / "report.md")
  raw = study.write_report(
      path, records, ["fid64", "label_accuracy"], False, "mnist", 3
  )
  lines = open(path).read().splitlines()
  assert (
      "| config | seeds scored | epochs | FID64 (lower better) | "
      "label accuracy (higher better) |" in lines
  )
  # std of (0, 2) and of (10, 12): sqrt(2); accuracies do not vary.
  assert (
      "| channel_small | 2 | 50.00 of 50 | 1.0000 ± 1.4142 | "
      "0.9000 ± 0.0000 |" in lines
  )
  assert (
      "| filter_small | 2 | 50.00 of 50 | 11.0000 ± 1.4142 | "
      "0.8000 ± 0.0000 |" in lines
  )
  assert "| filter_large | 0 | 1.50 of 50 | - | - |" in lines
  # FID: t = -10 / sqrt(2), df 2, p 0.0194 (see the verdict's test).
  assert (
      "| channel_small | filter_small | FID64 | -10.0000 | -7.0711 | 2.0000 "
      "| 0.0194 | yes: channel_small better |" in lines
  )
  assert (
      "| channel_small | filter_small | label accuracy | 0.1000 | - | - | - "
      "| untestable: no spread over the seeds |" in lines
  )
  assert not [l for l in lines if l.startswith("| channel_small | filter_lar")]
  assert "- filter_large: training stopped at step 3 of 100 (time limit)" in (
      lines
  )
  assert (
      "- filter_small seed 2: stopped at step 7: non-finite loss (not "
      "scored)" in lines
  )
  assert "Quick smoke test" not in "\n".join(lines)
  assert raw["summaries"]["filter_small"]["fid64"] == {
      "mean": 11.0,
      "std": pytest.approx(math.sqrt(2)),
      "n": 2,
  }
  assert [(t["metric"], t["beyond_spread"]) for t in raw["tests"]] == [
      ("fid64", True),
      ("label_accuracy", False),
  ]
  assert raw["tests"][1]["p"] is None
  json.dumps(raw, allow_nan=False)  # plain JSON: no NaN


@pytest.mark.slow  # two sweep programs traced and compiled
def test_quick_study_end_to_end(
    study, inception_stand_in, tmp_path, monkeypatch
):
  # Imported here: scipy.stats does not import where torch is blocked, as
  # test_dependencies collects the suite.
  from scipy import stats  # pylint: disable=g-import-not-at-top

  del inception_stand_in
  path = tmp_path / "colours.npz"
  synthetic.coloured_npz(path, 96, 192)
  root = str(tmp_path / "study")
  configs = ["channel_small", "filter_small"]
  kwargs = dict(configs=configs, dataset=f"npz:{path}", quick=True)

  # Out of time before the first step: nothing trains, the report says so.
  report = study.study(root, max_minutes=1e-9, **kwargs)
  text = open(report).read()
  assert "- channel_small: training stopped at step 0 of 4" in text
  assert "- filter_small: training stopped at step 0 of 4" in text
  assert not os.path.exists(os.path.join(root, "channel_small"))

  report = study.study(root, **kwargs)  # the same command goes on
  text = open(report).read()
  assert "Quick smoke test" in text and "mean nothing" in text
  with open(os.path.join(root, study.RAW_FILE)) as f:
    raw = json.load(f)
  assert raw["metrics"] == ["fid64", "label_accuracy", "precision", "recall"]
  values = {}
  for record in raw["configs"]:
    name = record["name"]
    assert [m["seed"] for m in record["members"]] == [0, 1]
    for k, m in enumerate(record["members"]):
      workdir = os.path.join(root, name, "members", str(k))
      assert m["dir"] == os.path.join(name, "members", str(k))
      assert checkpoints.load_config(workdir).seed == k
      # What the report holds is the member's own evaluation.
      with open(os.path.join(workdir, "table3_eval.json")) as f:
        result = json.load(f)
      assert (
          result["protocol"]["step"] == checkpoints.read_best(workdir)["step"]
      )
      assert m["metrics"] == {
          n: result["metrics"][n]["mean"] for n in raw["metrics"]
      }
    values[name] = {
        n: [m["metrics"][n] for m in record["members"]] for n in raw["metrics"]
    }
    # The seeds trained differently.
    assert values[name]["fid64"][0] != values[name]["fid64"][1]
    for n, v in values[name].items():
      summary = raw["summaries"][name][n]
      assert summary["mean"] == pytest.approx(np.mean(v))
      assert summary["std"] == pytest.approx(np.std(v, ddof=1))
  # Every metric's test, against scipy's own Welch test.
  assert [t["metric"] for t in raw["tests"]] == raw["metrics"]
  for t in raw["tests"]:
    a, b = values[t["a"]][t["metric"]], values[t["b"]][t["metric"]]
    if np.std(a) + np.std(b) == 0:
      assert t["p"] is None
      continue
    want = stats.ttest_ind(a, b, equal_var=False)
    assert t["t"] == pytest.approx(want.statistic)
    assert t["p"] == pytest.approx(want.pvalue)
    assert t["beyond_spread"] == (want.pvalue < 0.05)

  # Trained and scored: the same command trains and samples nothing.
  def refused(*args, **kwargs):
    raise AssertionError(f"ran again: {args} {kwargs}")

  monkeypatch.setattr(in_loop, "train_and_evaluate", refused)
  monkeypatch.setattr(evaluate, "generate_for_eval", refused)
  study.study(root, **kwargs)
  assert open(report).read() == text


def test_a_config_whose_every_seed_stopped_is_reported_not_trained(
    study, tmp_path, monkeypatch
):
  images, labels = synthetic.coloured(24, 32)
  path = tmp_path / "colours.npz"
  np.savez(
      path, images=images, labels=labels, test_images=images, test_labels=labels
  )
  root = tmp_path / "study"
  stopped = {"step": 3, "reason": "non-finite loss", "last_checkpoint": 2}
  (root / "channel_small").mkdir(parents=True)
  (root / "channel_small" / "sweep.json").write_text(
      json.dumps({"stopped": {"0": stopped, "1": stopped}})
  )

  def refused(*args, **kwargs):
    raise AssertionError(f"trained: {args} {kwargs}")

  monkeypatch.setattr(in_loop, "train_and_evaluate", refused)
  report = study.study(
      str(root), configs=["channel_small"], dataset=f"npz:{path}", quick=True
  )
  assert (
      "- channel_small: every seed stopped on a non-finite step (sweep.json "
      "says where); nothing to score" in open(report).read().splitlines()
  )


def test_the_command_needs_two_seeds(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  env["JAX_COMPILATION_CACHE_DIR"] = utils.enable_compilation_cache()
  done = subprocess.run(
      [
          sys.executable,
          SCRIPT,
          "--quick",
          "--num_seeds=1",
          f"--root={tmp_path / 'study'}",
      ],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == (
      "error: --num_seeds must be >= 2 (a standard deviation over seeds "
      "needs two), got 1"
  )
  assert not (tmp_path / "study").exists()
