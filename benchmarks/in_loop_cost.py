"""What one evaluation point costs against training, for a config.

  python benchmarks/in_loop_cost.py --config=configs/quick.py \
      [--val_examples=1000] [--samples_per_label=100] [--fid_per_class=100]

Times (after a warm-up call each, so compilation is excluded): one train
step; the validation loss on `val_examples` test images (scaled to the
whole test split); label accuracy of `samples_per_label` samples per label;
per-class FID64 of `fid_per_class` samples per class (the real statistics
cached). Prints each and its share of an epoch of training.
"""

import os
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from cign_jax import validation
from cign_jax.data import reader
from cign_jax.evaluation import in_loop

# pylint: enable=g-import-not-at-top

config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("val_examples", 1000, "Test images timed.")
flags.DEFINE_integer("samples_per_label", 100, "Label-accuracy samples.")
flags.DEFINE_integer(
    "fid_per_class", 100, "FID64 samples per class (0: " "skip)."
)
flags.DEFINE_integer("steps", 5, "Train steps timed.")
FLAGS = flags.FLAGS


def _time(fn, repeat=1):
  fn()  # warm-up (compilation)
  start = time.perf_counter()
  for _ in range(repeat):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeat


def main(_):
  utils.enable_compilation_cache()
  config = config_lib.validate(FLAGS.config)
  train_x, train_y = reader.load_split(config.data.dataset, "train")
  test_x, test_y = reader.load_split(config.data.dataset, "test")
  model = models.model_from_config(config)
  state = train_step_lib.create_train_state(config, model=model)
  step = jax.jit(train_step_lib.make_train_step(config))
  batches = reader.TrainBatches(train_x, train_y, config.batch_size, 0)
  x, c = batches.batch(0)
  key = jax.random.key(0)
  t_step = _time(lambda: step(state, x, c, key)[1]["loss"], FLAGS.steps)
  epoch = t_step * batches.steps_per_epoch
  variables = train_step_lib.eval_variables(state)
  n = FLAGS.val_examples
  t_val = _time(
      lambda: validation.validation_loss(
          model, variables, test_x[:n], test_y[:n], config, 0
      )["val_loss"]
  )
  t_val *= len(test_y) / n
  rows = [
      ("train step", t_step),
      ("epoch of training", epoch),
      (f"validation loss, {len(test_y)} test images (from {n})", t_val),
  ]
  eval_config = config.copy_and_resolve_references()
  eval_config.eval_samples_per_label = FLAGS.samples_per_label
  eval_config.eval_metrics = ("label_accuracy",)
  acc = in_loop.InLoopEvaluator(eval_config)
  rows.append(
      (
          f"label accuracy, {FLAGS.samples_per_label} per label",
          _time(lambda: acc(model, variables, 0)["label_accuracy"]),
      )
  )
  if FLAGS.fid_per_class:
    fid_config = config.copy_and_resolve_references()
    fid_config.eval_metrics = ("fid64",)
    fid_config.eval_samples_per_label = FLAGS.fid_per_class
    fid_eval = in_loop.InLoopEvaluator(fid_config, (test_x, test_y))
    rows.append(
        (
            f"FID64 per class, {FLAGS.fid_per_class} per class",
            _time(lambda: fid_eval(model, variables, 0)["fid64"]),
        )
    )
  print(
      f"{jax.devices()[0].platform}, {jax.device_count()} device(s); "
      f"batch {config.batch_size}, {batches.steps_per_epoch} steps/epoch"
  )
  for name, seconds in rows:
    share = (
        ""
        if name.startswith(("train", "epoch"))
        else f"  ({100 * seconds / epoch:.1f}% of an epoch)"
    )
    print(f"{name:55s} {seconds:9.3f} s{share}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
