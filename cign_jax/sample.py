"""`python -m cign_jax.sample`: the sample command (its flags and call are in
`cign_jax.commands.sample`)."""

from cign_jax.commands import sample

if __name__ == "__main__":
  sample.run()
