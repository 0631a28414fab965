"""PyTorch interoperability, without PyTorch.

- `torch_archive`: a reader of `torch.save` archives (state dicts, Lightning
  checkpoints) that builds numpy arrays and executes no pickled code.
- `convert`: the original CIGN checkpoints mapped one to one onto this
  library's parameters (`python -m cign_jax.convert`).
"""
