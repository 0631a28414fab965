"""cign_jax: idempotent generative networks (IGN) and conditional IGN (CIGN) in JAX/Flax."""
