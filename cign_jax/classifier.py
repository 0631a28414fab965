"""`python -m cign_jax.classifier`: the command `cign_jax.commands.classifier` under
its older name (kept so that existing command lines keep working)."""

from cign_jax.commands import classifier

if __name__ == "__main__":
  classifier.run()
