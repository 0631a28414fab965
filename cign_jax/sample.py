"""`python -m cign_jax.sample`: the command `cign_jax.commands.sample` under
its older name (kept so that existing command lines keep working)."""

from cign_jax.commands import sample

if __name__ == "__main__":
  sample.run()
