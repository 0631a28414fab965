"""The XLA flags of the test processes: faster CPU compiles.

The suite is dominated by compiling train-step-sized programs that then run
a few steps on tiny data. Measured on 2 cores (2026-11-28/29):
- `--xla_backend_optimization_level=0` (LLVM without its optimisations) cut
  the compile of the tiny train step from 45 s to 28 s and of its
  initialisation from 15 s to 4 s (machine shared with a test run);
- `--xla_cpu_use_fusion_emitters=false` (XLA's older elemental code for
  fused loops), on top of level 0, cut the tiny train step's compile from
  12.8 s to 10.5 s (nothing else running), and two of the batched-passes
  equivalence tests from 84.6 s to 71.1 s.
Results are compared only between programs compiled under the same flags;
rounding can differ from the default flags' in the last bits (one float32
comparison of two formulations moved by 2e-6), which the float32 tolerances
allow for. CIGN_JAX_TEST_XLA_OPT=1 keeps XLA's defaults.

`tests/conftest.py` applies them to the pytest process and, through the
environment, to the subprocesses the tests start; `multidevice_worker.py`
applies them when started by hand. One set everywhere, so that a program
compiled by one process is a persistent-cache hit in the others.
"""

import os

FLAGS = {
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
}


def apply(environ=os.environ):
  """Sets FLAGS in environ['XLA_FLAGS'] (before JAX starts its backend),
  replacing other values of the same flags and keeping the rest."""
  if environ.get("CIGN_JAX_TEST_XLA_OPT", "0") == "1":
    return
  kept = [
      f
      for f in environ.get("XLA_FLAGS", "").split()
      if f.split("=", 1)[0] not in FLAGS
  ]
  environ["XLA_FLAGS"] = " ".join(kept + [f"{k}={v}" for k, v in FLAGS.items()])
