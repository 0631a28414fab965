"""CPU convolution kernels behind `cign_jax.ops.conv2d` / `conv_transpose2d`.

- `shared`: output sizes, XLA's shared-kernel convolutions (the references),
  and the tap slicing/placement that the formulations build on.
- `cpu_conv`: the three CPU formulations of each pass (XLA, im2col/col2im
  matrix products, C++ kernels) and the per-layer plan that picks them.
- `native_conv`: the C++ kernels (`native/conv_kernels.cc`, XLA FFI custom
  calls on OpenBLAS), compiled on first use.

Nothing here imports the models or the training code.
"""
