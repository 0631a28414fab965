"""`python -m cign_jax.classifier`: the classifier command (its flags and call are in
`cign_jax.commands.classifier`)."""

from cign_jax.commands import classifier

if __name__ == "__main__":
  classifier.run()
