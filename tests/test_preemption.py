"""Stopped runs: SIGTERM is a clean stop (the step in flight finished and
saved, one line, exit status 143) from which the same command goes on to
the uninterrupted run's end state; a checkpoint step is committed together
with its checksum, and a step without one is not restored."""

import itertools
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cign_jax import checkpoints
from cign_jax import run_dir
from cign_jax import stopping
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils
from conftest import SYNTHETIC_MAIN
from conftest import flip_bytes
from conftest import tiny_config
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()

# Long enough for signals to land between steps and within saves, with
# scheduled checkpoints rarer than the stops, so that a stop saves a step
# the schedule would not have.
OVERRIDES = {
    "num_train_steps": 12,
    "checkpoint_every_steps": 4,
    "log_every_steps": 1,
}
STOP_LINE = re.compile(
    r"stopped by SIGTERM at step (\d+); checkpoint saved; "
    r"run the same command to resume"
)
NO_STEP_LINE = (
    "stopped by SIGTERM before the first step; nothing to save; "
    "run the same command to start"
)


@pytest.fixture(scope="module")
def splits():
  """What the train command of tests/synthetic.py reads: both splits."""
  return {
      split: synthetic.load_split("mnist", split) for split in ("train", "test")
  }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, splits):
  """The run of OVERRIDES, trained without a stop."""
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train.train_and_evaluate(tiny_config(**OVERRIDES), workdir, dataset=splits)
  return workdir


def _command(workdir):
  return [
      sys.executable,
      SYNTHETIC_MAIN,
      f"--config={ROOT}/configs/quick.py:tiny",
      f"--workdir={workdir}",
  ] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _env():
  return dict(os.environ, PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=CACHE)


def _run_and_signal(workdir, trigger, delays):
  """Runs the train command; once a stderr line contains `trigger`, sends
  SIGTERM after each of `delays` (seconds, cumulative). Returns (exit
  status, stderr)."""
  proc = subprocess.Popen(
      _command(workdir),
      env=_env(),
      cwd=ROOT,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
  )
  lines = []
  try:
    for line in proc.stderr:
      lines.append(line)
      if trigger in line:
        for delay in delays:
          time.sleep(delay)
          if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        break
    lines.append(proc.communicate(timeout=600)[1])
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return proc.returncode, "".join(lines)


class _SignalOnLog(logging.Handler):
  """Keeps the log's messages; at the first that contains `trigger`, starts
  timers that send SIGTERM to this process after each of `delays`
  (seconds, cumulative)."""

  def __init__(self, trigger, delays):
    super().__init__(logging.INFO)
    self.trigger, self.delays = trigger, delays
    self.messages, self.timers = [], []

  def emit(self, record):
    message = record.getMessage()
    self.messages.append(message)
    if self.trigger in message and not self.timers:
      self.timers = [
          threading.Timer(at, os.kill, (os.getpid(), signal.SIGTERM))
          for at in itertools.accumulate(self.delays)
      ]
      for timer in self.timers:
        timer.start()


def _train_and_signal(workdir, dataset, trigger, delays):
  """`train_and_evaluate` in this process (a run that has a checkpoint),
  signalled as `_SignalOnLog` does. Returns the step it stopped at (None
  when it finished) and its log."""
  handler = _SignalOnLog(trigger, delays)
  logging.getLogger().addHandler(handler)
  # The test's own block keeps the handler in place until every timer is
  # done, so that a late signal cannot end the test process.
  with run_dir.noting_sigterm():
    try:
      train.train_and_evaluate(
          tiny_config(**OVERRIDES), workdir, dataset=dataset
      )
      return None, "\n".join(handler.messages)
    except stopping.StoppedBySignal as e:
      assert e.exit_code == 143
      assert STOP_LINE.fullmatch(str(e)), str(e)  # a checkpoint was there
      return e.step, "\n".join(handler.messages)
    finally:
      logging.getLogger().removeHandler(handler)
      for timer in handler.timers:
        timer.cancel()
        timer.join()


def _full_state(workdir, step=None):
  """The whole checkpointed state (optimiser state included) of `workdir`,
  as host arrays by key, and its step."""
  config = checkpoints.load_config(workdir)
  mngr = checkpoints.manager(workdir, read_only=True)
  try:
    state = checkpoints.restore(
        mngr, train_step_lib.create_train_state(config), step
    )
  finally:
    mngr.close()
  flat = jax.tree_util.tree_flatten_with_path(checkpoints.state_tree(state))[0]
  return int(np.asarray(state.step)), {
      jax.tree_util.keystr(k): np.asarray(v) for k, v in flat
  }


def _logged_steps(text):
  return [int(s) for s in re.findall(r"\bstep (\d+)/\d+ \|", text)]


def _check_stop(workdir, step, logged, resumed_from):
  """No completed step is lost: the saved step is the last one the run
  logged (every step is), or the one it resumed from when the signal came
  before its first step; and it is checkpointed whole (it restores and
  matches its checksum)."""
  assert step == (max(logged) if logged else resumed_from), (step, logged)
  assert _full_state(workdir, step)[0] == step


def test_sigterm_stops_cleanly_and_the_same_command_ends_as_uninterrupted(
    tmp_path, uninterrupted, splits, caplog
):
  """SIGTERM (once, or twice in quick succession, as a scheduler may) at
  seeded random moments, each time followed by the same command: first the
  train command (exit status 143, the line last on stderr), then, as each
  start of the command costs seconds, `train_and_evaluate` in this process
  (signals a random time after a log line, landing anywhere from the
  restore to the saves).
  Every stop saves the last step it completed, and the end state equals an
  uninterrupted run's bit for bit."""
  rng = random.Random(28)
  workdir = str(tmp_path / "preempted")
  total = OVERRIDES["num_train_steps"]
  # The command, signalled a random time after a random step.
  delays = [rng.uniform(0, 0.2)] + (
      [rng.uniform(0, 0.05)] if rng.random() < 0.5 else []
  )
  rc, stderr = _run_and_signal(workdir, f"step {rng.randint(1, 4)}/", delays)
  assert rc == 143, f"exit status {rc}; {stderr[-3000:]}"
  last = [l for l in stderr.splitlines() if l.strip()][-1]
  match = STOP_LINE.fullmatch(last)
  assert match, last
  resumed_from = int(match.group(1))
  _check_stop(workdir, resumed_from, _logged_steps(stderr), None)
  # The same call again, signalled at random moments after the restore or
  # after a step, until it finishes.
  caplog.set_level(logging.INFO)
  for attempt in range(4):
    # The first just after the restore (before the loop or in its first
    # step), the others after a random step.
    ahead = 0 if attempt == 0 else rng.randint(1, 3)
    trigger = (
        f"Resumed from the checkpoint of step {resumed_from}"
        if ahead == 0
        else f"step {min(resumed_from + ahead, total)}/"
    )
    delays = [rng.uniform(0, 0.3)] + (
        [rng.uniform(0, 0.05)] if rng.random() < 0.5 else []
    )
    step, log = _train_and_signal(workdir, splits, trigger, delays)
    if step is None:
      break
    assert f"Resumed from the checkpoint of step {resumed_from}" in log
    _check_stop(workdir, step, _logged_steps(log), resumed_from)
    resumed_from = step
  else:
    train.train_and_evaluate(tiny_config(**OVERRIDES), workdir, dataset=splits)
  step, state = _full_state(workdir)
  reference_step, reference = _full_state(uninterrupted)
  assert step == reference_step == total
  assert sorted(state) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(state[key], value, err_msg=key)
  with open(os.path.join(workdir, "evaluations.json")) as f:
    history = json.load(f)["history"]
  with open(os.path.join(uninterrupted, "evaluations.json")) as f:
    assert history == json.load(f)["history"]


def test_sigterm_before_the_first_step_of_a_new_run_saves_nothing(
    tmp_path, synthetic_dataset
):
  workdir = str(tmp_path / "new")
  with run_dir.noting_sigterm():  # the command's block, open from its start
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(stopping.StoppedBySignal) as err:
      train.train_and_evaluate(
          tiny_config(), workdir, dataset=synthetic_dataset
      )
  assert err.value.step is None and str(err.value) == NO_STEP_LINE
  assert os.listdir(os.path.join(workdir, "checkpoints")) == []


# Each of two processes (one CPU device each, joined by jax.distributed as
# on two hosts) wishes to stop at other steps; it prints the decisions.
_AGREEMENT_WORKER = """
import json
import jax
try:  # cross-process collectives on CPU
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
except Exception:
  pass  # (newer JAX: the default)
from cign_jax import sharding, stopping
from cign_jax.configs import quick
sharding.initialize_distributed(None)
agreement = stopping.StopAgreement(
    sharding.create_mesh(quick.get_config("tiny")))
first = jax.process_index() == 0
now = agreement.now(stopping.GO_ON if first else stopping.SIGTERM)
decisions = []
for step in range(6):
  if first:
    wish = stopping.OUT_OF_TIME if step >= 1 else stopping.GO_ON
  else:
    wish = stopping.SIGTERM if step >= 2 else stopping.GO_ON
  decisions.append(agreement.after_step(wish))
print(json.dumps({"now": now, "decisions": decisions}))
jax.distributed.shutdown()
"""


def test_processes_agree_to_stop_after_the_same_step():
  """With several processes the stop is everyone's largest wish (SIGTERM
  over the time limit), the same in every process: at once before the
  first step, one step late after a step (the all-reduce rides behind the
  step in flight)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
  procs = []
  for i in range(2):
    env = dict(
        _env(),
        JAX_COORDINATOR_ADDRESS=address,
        JAX_NUM_PROCESSES="2",
        JAX_PROCESS_ID=str(i),
        JAX_PLATFORMS="cpu",
    )
    env["XLA_FLAGS"] = " ".join(
        f
        for f in env.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    )
    procs.append(
        subprocess.Popen(
            [sys.executable, "-c", _AGREEMENT_WORKER],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, (out, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
    # Wishes after steps 0..5: process 0 (0, 1, 1, 1, 1, 1), process 1
    # (0, 0, 2, 2, 2, 2); each decision is the largest of the step before.
    assert json.loads(out.strip().splitlines()[-1]) == {
        "now": stopping.SIGTERM,
        "decisions": [0, 0, 1, 2, 2, 2],
    }


def test_sigterm_inside_the_block_sets_the_flag_and_the_handler_comes_back():
  before = signal.getsignal(signal.SIGTERM)
  with run_dir.noting_sigterm():
    assert not run_dir.sigterm_received()
    with run_dir.noting_sigterm():  # nested, as the command's and the loop's
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 10
      while not run_dir.sigterm_received() and time.time() < deadline:
        time.sleep(0.01)  # the handler runs between bytecodes
      assert run_dir.sigterm_received()
    assert run_dir.sigterm_received()  # the outer block still sees it
  assert signal.getsignal(signal.SIGTERM) == before
  with run_dir.noting_sigterm():
    assert not run_dir.sigterm_received()  # a new outermost block: cleared


# A step is committed with its checksum, and one without is not restored.


@pytest.fixture
def state():
  """An initial tiny state (no training), its step set per save."""
  return train_step_lib.create_train_state(tiny_config())


def test_process_stopped_as_a_step_is_committed_leaves_it_verified(
    tmp_path, monkeypatch, state
):
  """A process stopped the moment orbax has committed a step (where a
  SIGTERM once left the step without its checksum): the step restores, and
  altered tensors in it are refused rather than restored."""
  workdir = str(tmp_path / "run")
  checkpoints.save_config(workdir, tiny_config())
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, state.replace(step=1))
  step_dir = os.path.join(workdir, "checkpoints", "2")
  original = ocp.CheckpointManager.wait_until_finished

  def stopped_once_committed(self):
    original(self)
    if os.path.isdir(step_dir):
      raise KeyboardInterrupt("stopped right after the commit")

  monkeypatch.setattr(
      ocp.CheckpointManager, "wait_until_finished", stopped_once_committed
  )
  with pytest.raises(KeyboardInterrupt):
    checkpoints.save(mngr, state.replace(step=2))
  monkeypatch.undo()
  mngr.close()
  assert _full_state(workdir)[0] == 2
  flip_bytes(step_dir)
  with pytest.raises(
      checkpoints.CheckpointError, match=r"step 2 .*good steps there: 1"
  ):
    checkpoints.load_model(workdir)


def _save_as_before(directory, state, step, with_checksum):
  """A step as earlier versions saved it: the tensors alone (one orbax
  item), then, once committed, the checksum file beside them (which a stop
  between the two left out)."""
  mngr = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(create=True),
      item_handlers=ocp.StandardCheckpointHandler(),
  )
  tree = checkpoints.state_tree(state.replace(step=step))
  mngr.save(step, args=ocp.args.StandardSave(tree), force=True)
  mngr.wait_until_finished()
  mngr.close()
  if with_checksum:
    with open(
        os.path.join(directory, str(step), run_dir.CHECKSUM_FILE), "w"
    ) as f:
      json.dump({"sha256": run_dir.tree_digest(tree)}, f)


def test_step_without_checksum_is_incomplete_and_not_restored(
    tmp_path, state, synthetic_dataset
):
  """Steps of earlier versions: with their checksum they restore; without
  it (a stop between the tensors and the checksum) the step is named as
  incomplete with the steps that do restore and the fix, also when its
  tensors were altered, and in best/ too."""
  workdir = str(tmp_path / "run")
  checkpoints.save_config(workdir, tiny_config())
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _save_as_before(ckpt_dir, state, 1, with_checksum=True)
  _save_as_before(ckpt_dir, state, 2, with_checksum=False)
  assert checkpoints.load_model(workdir, step=1)[3] == 1
  step_dir = os.path.join(ckpt_dir, "2")
  for alter in (False, True):
    if alter:
      flip_bytes(step_dir)
    with pytest.raises(checkpoints.CheckpointError) as err:
      checkpoints.load_model(workdir)
    message = str(err.value)
    assert f"checkpoint of step 2 ({step_dir}) is incomplete" in message
    assert "good steps there: 1" in message
    assert f"move {step_dir} out of the checkpoint directory" in message
  # Training refuses to resume from it, naming it the same way.
  with pytest.raises(checkpoints.CheckpointError, match="step 2 .*incomplete"):
    train.train_and_evaluate(
        tiny_config(num_train_steps=3), workdir, dataset=synthetic_dataset
    )
  # The best checkpoint is saved and read the same way.
  _save_as_before(checkpoints.best_dir(workdir), state, 3, with_checksum=False)
  with open(os.path.join(workdir, checkpoints.BEST_FILE), "w") as f:
    json.dump({"step": 3, "metric": "val_loss", "value": 1.0}, f)
  with pytest.raises(checkpoints.CheckpointError, match="step 3 .*incomplete"):
    checkpoints.load_model(workdir, checkpoint="best")
