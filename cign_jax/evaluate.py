"""`python -m cign_jax.evaluate`: the command `cign_jax.commands.evaluate` under
its older name (kept so that existing command lines keep working)."""

from cign_jax.commands import evaluate

if __name__ == "__main__":
  evaluate.run()
