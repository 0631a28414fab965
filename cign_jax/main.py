"""`python -m cign_jax.main`: the command `cign_jax.commands.train` under
its older name (kept so that existing command lines keep working)."""

from cign_jax.commands import train

if __name__ == "__main__":
  train.run()
