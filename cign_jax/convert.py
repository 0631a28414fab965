"""`python -m cign_jax.convert`: the command `cign_jax.commands.convert` under
its older name (kept so that existing command lines keep working)."""

from cign_jax.commands import convert

if __name__ == "__main__":
  convert.run()
