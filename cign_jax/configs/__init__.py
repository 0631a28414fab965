"""Training configurations: `get_config()` of each file builds on
`cign_jax.config.base_config()` (the paper's channel_small on MNIST) and sets
only what its run changes. Use them as `--config=configs/NAME.py` from the
repository root (`configs` links here) or from Python as
`cign_jax.configs.NAME.get_config()`."""
