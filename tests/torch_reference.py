"""A PyTorch implementation of the original CIGN models and training step.

Written for this project from the CIGN paper (Ronchetti 2024) and the
documented facts of the author's PyTorch Lightning code
(`reference/cign.md`); it is the yardstick of our Flax port:

- `CIGNTorch(conditioning, latent_dim, intermediate_dim, embedding_dim,
  dropout)`: f(x, c) = generator(discriminator(x, c), c), NCHW, whose
  `state_dict()` has the original's names and shapes (`discriminator.conv_1.
  weight`, `generator.batch_norm_3.running_var`, ...), so checkpoints of the
  author's runs load into it and `cign_jax.interop.convert` maps it to our variables.
- `TorchTrainStep(model, lr, ...)`: the original's optimisation step: reload
  the frozen copy from the model, seven forward calls (real, noise, mismatch,
  copy(noise), model(noise output, detached), copy(mismatch), model(mismatch
  output, detached)), five L1 terms, backward, AdamW(betas 0.5/0.999, weight
  decay 0.01). `loss_terms(x, labels, noise, noise_labels)` runs the loss
  with a given prior sample so that it can be compared with
  `cign_jax.losses.idempotent_loss`.

This module imports torch, an optional extra of the package: import it only
where torch is installed (the tests use `pytest.importorskip("torch")`).

Original layout, one block of each half (i = 1..5):

  discriminator: [batch_norm_{i-1}, i > 1] -> conditioning -> conv_i (no bias)
                 -> dropout -> LeakyReLU(0.2) (i = 5: sigmoid)
  generator:     batch_norm_i -> conditioning -> transposed conv_i (no bias)
                 -> dropout (i < 5) -> ReLU (i = 5: tanh)

Channel conditioning appends tanh(linear_i(E(c))).view(B, 1, H, W) AFTER the
features; filter conditioning cross-correlates each sample's channels with
tanh(linear_i(E(c))).view(B, C_in, k, k) (one grouped conv over a
(1, B*C_in, H, W) view, the natural PyTorch way) and mixes the channels with
channel_mixer_i = Linear(C_in, C_out).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

# (kernel, stride, padding) of the five blocks of each half.
DISCRIMINATOR_LAYOUT = ((4, 2, 1), (4, 2, 1), (3, 2, 1), (4, 2, 1), (2, 1, 0))
GENERATOR_LAYOUT = ((2, 1, 0), (4, 2, 1), (3, 2, 1), (4, 2, 1), (4, 2, 1))
# Spatial size (H = W) of each block's input.
DISCRIMINATOR_SIZES = (28, 14, 7, 4, 2)
GENERATOR_SIZES = (1, 2, 4, 7, 14)

LOSS_TERMS = (
    "loss_rec",
    "loss_idem_noise",
    "loss_tight_noise",
    "loss_idem_mismatch",
    "loss_tight_mismatch",
)


class _Half(nn.Module):
  """Five conditioned blocks; the shared code of both halves.

  Modules are registered in the original's order, so that `state_dict()`
  lists its keys in the same order as the author's models.
  """

  def __init__(
      self,
      conditioning: str,
      in_channels: Sequence[int],
      out_channels: Sequence[int],
      layout,
      sizes,
      norm_channels: Sequence[int],
      transpose: bool,
      embedding_dim: int,
      num_classes: int,
      dropout: float,
  ):
    super().__init__()
    if conditioning not in ("channel", "filter", "none"):
      raise ValueError(f"unknown conditioning {conditioning!r}")
    self.conditioning = conditioning
    self.layout = tuple(layout)
    self.sizes = tuple(sizes)
    self.in_channels = tuple(in_channels)
    self.transpose = transpose
    extra = 1 if conditioning == "channel" else 0
    if conditioning != "filter":
      conv = nn.ConvTranspose2d if transpose else nn.Conv2d
      for i, (ci, co, (k, s, p)) in enumerate(
          zip(in_channels, out_channels, layout), start=1
      ):
        self.add_module(
            f"conv_{i}",
            conv(ci + extra, co, k, stride=s, padding=p, bias=False),
        )
    for j, c in enumerate(norm_channels, start=1):
      self.add_module(f"batch_norm_{j}", nn.BatchNorm2d(c))
    if conditioning == "filter":
      for i, (ci, co) in enumerate(zip(in_channels, out_channels), start=1):
        self.add_module(f"channel_mixer_{i}", nn.Linear(ci, co))
    if conditioning != "none":
      self.label_embedder = nn.Embedding(num_classes, embedding_dim)
      for i, (ci, (k, _, _), size) in enumerate(
          zip(in_channels, layout, sizes), start=1
      ):
        outputs = size * size if conditioning == "channel" else ci * k * k
        self.add_module(f"linear_{i}", nn.Linear(embedding_dim, outputs))
    self.dropout = nn.Dropout(dropout)

  # Overridden by the halves.
  def _norm_index(self, i: int) -> Optional[int]:
    raise NotImplementedError

  def _activation(self, i: int, y):
    raise NotImplementedError

  def _dropout_in(self, i: int) -> bool:
    raise NotImplementedError

  def _filter_block(self, i: int, x, embedding):
    k, s, p = self.layout[i - 1]
    b, c, h, w = x.shape
    filters = torch.tanh(
        getattr(self, f"linear_{i}")(embedding).view(b, c, k, k)
    )
    grouped = x.reshape(1, b * c, h, w)
    weight = filters.reshape(b * c, 1, k, k)
    if self.transpose:
      y = F.conv_transpose2d(grouped, weight, stride=s, padding=p, groups=b * c)
    else:
      y = F.conv2d(grouped, weight, stride=s, padding=p, groups=b * c)
    y = y.view(b, c, y.shape[-2], y.shape[-1])
    mixer = getattr(self, f"channel_mixer_{i}")
    return mixer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

  def forward(self, x, labels):
    embedding = (
        self.label_embedder(labels) if self.conditioning != "none" else None
    )
    for i in range(1, 6):
      j = self._norm_index(i)
      if j is not None:
        x = getattr(self, f"batch_norm_{j}")(x)
      if self.conditioning == "filter":
        y = self._filter_block(i, x, embedding)
      else:
        if self.conditioning == "channel":
          size = self.sizes[i - 1]
          cond = torch.tanh(
              getattr(self, f"linear_{i}")(embedding).view(-1, size, size)
          )
          x = torch.cat((x, cond.unsqueeze(1)), dim=1)
        y = getattr(self, f"conv_{i}")(x)
      if self._dropout_in(i):
        y = self.dropout(y)
      x = self._activation(i, y)
    return x


class DiscriminatorTorch(_Half):

  def __init__(
      self,
      conditioning,
      latent_dim,
      intermediate_dim,
      embedding_dim=5,
      num_classes=10,
      image_channels=1,
      dropout=0.15,
  ):
    ld = latent_dim
    outs = (ld, 2 * ld, 4 * ld, 8 * ld, intermediate_dim)
    ins = (image_channels,) + outs[:4]
    super().__init__(
        conditioning,
        ins,
        outs,
        DISCRIMINATOR_LAYOUT,
        DISCRIMINATOR_SIZES,
        outs[:4],
        False,
        embedding_dim,
        num_classes,
        dropout,
    )

  def _norm_index(self, i):
    # batch_norm_k follows block k's activation, i.e. precedes block k + 1.
    return i - 1 if i > 1 else None

  def _activation(self, i, y):
    return torch.sigmoid(y) if i == 5 else F.leaky_relu(y, 0.2)

  def _dropout_in(self, i):
    return True


class GeneratorTorch(_Half):

  def __init__(
      self,
      conditioning,
      latent_dim,
      intermediate_dim,
      embedding_dim=5,
      num_classes=10,
      image_channels=1,
      dropout=0.15,
  ):
    ld = latent_dim
    outs = (8 * ld, 4 * ld, 2 * ld, ld, image_channels)
    ins = (intermediate_dim,) + outs[:4]
    super().__init__(
        conditioning,
        ins,
        outs,
        GENERATOR_LAYOUT,
        GENERATOR_SIZES,
        ins,
        True,
        embedding_dim,
        num_classes,
        dropout,
    )

  def _norm_index(self, i):
    return i

  def _activation(self, i, y):
    return torch.tanh(y) if i == 5 else F.relu(y)

  def _dropout_in(self, i):
    return i < 5


class CIGNTorch(nn.Module):
  """f(x, c) = generator(discriminator(x, c), c); x (B, C, 28, 28)."""

  def __init__(
      self,
      conditioning: str = "channel",
      latent_dim: int = 32,
      intermediate_dim: int = 128,
      embedding_dim: int = 5,
      dropout: float = 0.15,
      num_classes: int = 10,
      image_channels: int = 1,
  ):
    super().__init__()
    self.conditioning = conditioning
    self.num_classes = num_classes
    kw = dict(
        embedding_dim=embedding_dim,
        num_classes=num_classes,
        image_channels=image_channels,
        dropout=dropout,
    )
    self.discriminator = DiscriminatorTorch(
        conditioning, latent_dim, intermediate_dim, **kw
    )
    self.generator = GeneratorTorch(
        conditioning, latent_dim, intermediate_dim, **kw
    )

  def forward(self, x_nchw, labels=None):
    return self.generator(self.discriminator(x_nchw, labels), labels)


def mismatch_batch(
    images, labels, num_classes: int = 10
) -> Tuple[torch.Tensor, torch.Tensor]:
  """Every image with each of its num_classes - 1 wrong labels, in
  increasing order, image-major."""
  k = num_classes - 1
  slots = torch.arange(k, device=labels.device).expand(labels.shape[0], k)
  wrong = slots + (slots >= labels[:, None]).to(slots.dtype)
  return images.repeat_interleave(k, dim=0), wrong.reshape(-1)


class TorchTrainStep:
  """The original's training step around a `CIGNTorch`.

  `model_copy` is a frozen deep copy (no gradients to its parameters),
  reloaded from the model at the start of every step; both are in training
  mode (BatchNorm on batch statistics, dropout on), as in the Lightning
  module. `train_noise_std` is the data regulariser (N(0, std) added to the
  real images and clamped to [-1, 1]) applied by `step`; `loss_terms` takes
  the already-noised images, like `cign_jax.losses.idempotent_loss`.
  """

  def __init__(
      self,
      model: CIGNTorch,
      lr: float,
      rec_weight: float = 20.0,
      idem_noise_weight: float = 20.0,
      tight_noise_weight: float = 2.5,
      idem_mismatch_weight: float = 3.0,
      tight_mismatch_weight: float = 1.0,
      betas=(0.5, 0.999),
      weight_decay: float = 0.01,
      train_noise_std: float = 0.15,
  ):
    self.model = model
    self.model_copy = copy.deepcopy(model)
    for p in self.model_copy.parameters():
      p.requires_grad_(False)
    self.model.train()
    self.model_copy.train()
    self.weights = dict(
        loss_rec=rec_weight,
        loss_idem_noise=idem_noise_weight,
        loss_tight_noise=tight_noise_weight,
        loss_idem_mismatch=idem_mismatch_weight,
        loss_tight_mismatch=tight_mismatch_weight,
    )
    self.train_noise_std = train_noise_std
    self.optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay
    )
    self.l1 = nn.L1Loss()

  def loss_terms(
      self, x, labels, noise=None, noise_labels=None
  ) -> Dict[str, torch.Tensor]:
    """The five weighted terms (tensors with graphs) of one step's loss.

    x: real (noised) images (B, C, 28, 28); labels (B,); noise / noise_labels:
    the prior sample and its labels (default: N(0, 1) and uniform labels).
    """
    self.model_copy.load_state_dict(self.model.state_dict())
    model, model_copy, l1 = self.model, self.model_copy, self.l1
    if noise is None:
      noise = torch.randn_like(x)
    if noise_labels is None:
      noise_labels = torch.randint(
          0, self.model.num_classes, (x.shape[0],), device=x.device
      )
    x_mm, y_mm = mismatch_batch(x, labels, self.model.num_classes)

    fx = model(x, labels)
    fnoise = model(noise, noise_labels)
    fmismatch = model(x_mm, y_mm)
    f_copy_noise = model_copy(fnoise, noise_labels)
    fnoise_d = fnoise.detach()
    f_tight_noise = model(fnoise_d, noise_labels)
    f_copy_mismatch = model_copy(fmismatch, y_mm)
    fmismatch_d = fmismatch.detach()
    f_tight_mismatch = model(fmismatch_d, y_mm)

    raw = dict(
        loss_rec=l1(fx, x),
        loss_idem_noise=l1(f_copy_noise, fnoise),
        loss_tight_noise=-l1(f_tight_noise, fnoise_d),
        loss_idem_mismatch=l1(f_copy_mismatch, fmismatch),
        loss_tight_mismatch=-l1(f_tight_mismatch, fmismatch_d),
    )
    return {k: self.weights[k] * raw[k] for k in LOSS_TERMS}

  def step(self, x, labels, noise=None, noise_labels=None) -> Dict[str, float]:
    """One optimisation step on real images in [-1, 1]; returns the terms
    and their sum `loss` as floats."""
    if self.train_noise_std:
      x = torch.clamp(x + self.train_noise_std * torch.randn_like(x), -1, 1)
    self.optimizer.zero_grad(set_to_none=True)
    terms = self.loss_terms(x, labels, noise, noise_labels)
    loss = sum(terms[k] for k in LOSS_TERMS)
    loss.backward()
    self.optimizer.step()
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["loss"] = float(loss.detach())
    return out
