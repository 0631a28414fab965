"""The evaluation's metrics, one module each (`cign_jax.evaluation.registry`).

A module here declares the names it computes, whether lower or higher is
better for each, what it needs (samples per class, real images, Inception
features of a layer, the label classifier, training-set features) and how it
computes its numbers for one class; `config.eval_metrics`, `python -m
cign_jax.evaluate --metrics` and `experiments/reproduce_table3.py` name
them. A new metric is a new module here and its name in a config.
"""
