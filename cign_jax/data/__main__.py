"""`python -m cign_jax.data prepare NAME`: runs `cign_jax.commands.data`."""

from cign_jax.commands import data

if __name__ == "__main__":
  data.run()
