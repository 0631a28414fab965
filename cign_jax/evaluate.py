"""`python -m cign_jax.evaluate`: the evaluate command (its flags and call are in
`cign_jax.commands.evaluate`)."""

from cign_jax.commands import evaluate

if __name__ == "__main__":
  evaluate.run()
