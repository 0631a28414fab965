"""`python -m cign_jax.main`: the train command (its flags and call are in
`cign_jax.commands.train`)."""

from cign_jax.commands import train

if __name__ == "__main__":
  train.run()
