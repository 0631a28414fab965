"""`python -m cign_jax.convert`: the convert command (its flags and call are in
`cign_jax.commands.convert`)."""

from cign_jax.commands import convert

if __name__ == "__main__":
  convert.run()
