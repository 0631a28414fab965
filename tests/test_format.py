"""The code is formatted by the project's one formatter, pyink, with the
settings in pyproject.toml (`pyink .` formats it)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_code_is_formatted_with_pyink():
  result = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", "--diff", "."],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, (
      "run `pyink .` in the repository root; it would change:\n"
      + result.stdout[-5000:]
      + result.stderr[-2000:]
  )
