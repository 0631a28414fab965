"""Scoring generated samples: per-class FID and label accuracy.

- `inception`: the FID Inception v3 in Flax, with its weights read from the
  reference PyTorch archive (`cign_jax.interop.torch_archive`).
- `fid`: FID and the paper's per-class FID, with cached real statistics.
- `classifier`: a small MNIST / Fashion-MNIST classifier (trained once per
  dataset and cached) that measures the label accuracy of samples.
- `evaluate`: both for a run directory or a file of samples
  (`python -m cign_jax.evaluate`).
"""
