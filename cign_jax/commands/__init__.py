"""The command-line entry points: each module defines its flags and makes one
library call. `python -m cign_jax.commands.NAME`, or the console scripts
(`cign-train`, `cign-sample`, `cign-evaluate`, `cign-convert`,
`cign-classifier`, `cign-data`); the older `python -m cign_jax.main` /
`sample` / `evaluate` / `convert` / `classifier` / `data` run the same
modules. Each module's `run()` defines the flags and starts absl, so that
importing one command beside another defines nothing.
"""
