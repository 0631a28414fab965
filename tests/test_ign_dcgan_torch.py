"""The IGN code's DCGAN-like network (`ign_dcgan`) against a PyTorch model
written here from the network's description (bias-free convolutions 4x4/2,
4x4/2, then three 3x3 without padding down to a 1x1 code, transposed
convolutions back; BatchNorm; Dropout2d; LeakyReLU 0.2 in the encoder, ReLU
in the decoder, tanh out): the same parameters, layer shapes and outputs
(eval mode, and train mode without dropout, running statistics included),
and `optimizer.name = 'adam'` as PyTorch's Adam. Skipped without the
optional `torch` extra.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import config as config_lib
from cign_jax import models
from cign_jax import train_step as train_step_lib
from test_ign_dcgan import _inputs
from test_ign_dcgan import _ours

torch = pytest.importorskip("torch")
tnn = torch.nn


def torch_encoder(b, d, c, p):
  """Encoder: conv -> Dropout2d -> LeakyReLU(0.2) [-> BatchNorm] four times
  (BatchNorm after the first three), then the code conv."""
  layers = []
  specs = [
      (c, b, 4, 2, 1),
      (b, 2 * b, 4, 2, 1),
      (2 * b, 4 * b, 3, 1, 0),
      (4 * b, 8 * b, 3, 1, 0),
  ]
  for i, (ci, co, k, s, pad) in enumerate(specs):
    layers += [
        tnn.Conv2d(ci, co, k, s, pad, bias=False),
        tnn.Dropout2d(p),
        tnn.LeakyReLU(0.2),
    ]
    if i < 3:
      layers.append(tnn.BatchNorm2d(co))
  layers.append(tnn.Conv2d(8 * b, d, 3, 1, 0, bias=False))
  return tnn.Sequential(*layers)


def torch_decoder(d, c, p):
  """Decoder: BatchNorm -> transposed conv -> Dropout2d -> ReLU four times,
  halving the channels, then a transposed conv to the image and tanh."""
  layers = []
  specs = [
      (d, d // 2, 3, 1, 0),
      (d // 2, d // 4, 3, 1, 0),
      (d // 4, d // 8, 3, 1, 0),
      (d // 8, d // 16, 4, 2, 1),
  ]
  for ci, co, k, s, pad in specs:
    layers += [
        tnn.BatchNorm2d(ci),
        tnn.ConvTranspose2d(ci, co, k, s, pad, bias=False),
        tnn.Dropout2d(p),
        tnn.ReLU(),
    ]
  layers += [tnn.ConvTranspose2d(d // 16, c, 4, 2, 1, bias=False), tnn.Tanh()]
  return tnn.Sequential(*layers)


class TorchIGN(tnn.Module):

  def __init__(self, b=64, d=512, c=1, p=0.1):
    super().__init__()
    self.encoder = torch_encoder(b, d, c, p)
    self.decoder = torch_decoder(d, c, p)

  def forward(self, x):
    return self.decoder(self.encoder(x))


def _torch_to_ours(tmodel, variables):
  """Copies the PyTorch weights into our variables, layer by layer in
  order (each half's convolutions to conv_1.., its norms to batch_norm_1..)."""
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
  for half, seq in (
      ("discriminator", tmodel.encoder),
      ("generator", tmodel.decoder),
  ):
    convs = [m for m in seq if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d))]
    norms = [m for m in seq if isinstance(m, tnn.BatchNorm2d)]
    assert len(convs) == 5
    for i, m in enumerate(convs, start=1):
      w = m.weight.detach().double().numpy()
      # Conv2d (Co, Ci, kh, kw); ConvTranspose2d (Ci, Co, kh, kw).
      perm = (
          (2, 3, 0, 1) if isinstance(m, tnn.ConvTranspose2d) else (2, 3, 1, 0)
      )
      ours = params[half][f"conv_{i}"]["kernel"]
      assert ours.shape == w.transpose(perm).shape, (half, i)
      params[half][f"conv_{i}"]["kernel"] = w.transpose(perm).astype(np.float32)
    assert len(norms) == len(params[half]) - 5
    for j, m in enumerate(norms, start=1):
      name = f"batch_norm_{j}"
      params[half][name] = {
          "scale": m.weight.detach().numpy().astype(np.float32),
          "bias": m.bias.detach().numpy().astype(np.float32),
      }
      stats[half][name] = {
          "mean": m.running_mean.numpy().astype(np.float32),
          "var": m.running_var.numpy().astype(np.float32),
      }
  return {"params": params, "batch_stats": stats}


def _randomise_norms(tmodel, seed=0):
  """Non-trivial BatchNorm affine parameters and running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in tmodel.modules():
      if isinstance(m, tnn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))


def _nchw(x):
  return torch.from_numpy(
      np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))
  ).double()


@pytest.mark.parametrize("b,d", [(64, 512), (16, 128)])
def test_parameter_count_and_shapes_equal_pytorch(b, d):
  tmodel = TorchIGN(b, d)
  _, variables = _ours(b, d)
  torch_count = sum(p.numel() for p in tmodel.parameters())
  assert models.count_parameters(variables["params"]) == torch_count
  torch_stats = sum(
      m.running_mean.numel() + m.running_var.numel()
      for m in tmodel.modules()
      if isinstance(m, tnn.BatchNorm2d)
  )
  assert models.count_parameters(variables["batch_stats"]) == torch_stats
  _torch_to_ours(tmodel, variables)  # asserts every kernel's shape
  if (b, d) == (64, 512):
    # By hand: encoder kernels 1*64*16 + 64*128*16 + 128*256*9 + 256*512*9
    # + 512*512*9, its norms 2*(64+128+256); decoder kernels 512*256*9 +
    # 256*128*9 + 128*64*9 + 64*32*16 + 32*1*16, its norms
    # 2*(512+256+128+64).
    hand = (
        1024
        + 131072
        + 294912
        + 1179648
        + 2359296
        + 896
        + 1179648
        + 294912
        + 73728
        + 32768
        + 512
        + 1920
    )
    assert torch_count == hand == 5_550_336


def test_layer_output_shapes():
  """Every convolution's output, ours and PyTorch's, against the sizes
  computed by hand (H' = (H + 2p - k) / s + 1; transposed:
  (H - 1) s - 2p + k)."""
  expected = {
      "discriminator": [
          (14, 14, 64),
          (7, 7, 128),
          (5, 5, 256),
          (3, 3, 512),
          (1, 1, 512),
      ],
      "generator": [
          (3, 3, 256),
          (5, 5, 128),
          (7, 7, 64),
          (14, 14, 32),
          (28, 28, 1),
      ],
  }
  model, variables = _ours()
  _, state = model.apply(
      variables,
      jnp.zeros((2, 28, 28, 1)),
      train=False,
      capture_intermediates=lambda mdl, method: isinstance(mdl, models.Conv),
      mutable=["intermediates"],
  )
  inter = state["intermediates"]
  for half, shapes in expected.items():
    got = [
        tuple(inter[half][f"conv_{i}"]["__call__"][0].shape[1:])
        for i in range(1, 6)
    ]
    assert got == shapes, half

  tmodel = TorchIGN().eval()
  seen = []
  for m in tmodel.modules():
    if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d)):
      m.register_forward_hook(
          lambda mod, inp, out: seen.append(tuple(out.shape[1:]))
      )
  with torch.no_grad():
    tmodel(torch.zeros(2, 1, 28, 28))
  nhwc = [(h, w, c) for c, h, w in seen]
  assert nhwc == expected["discriminator"] + expected["generator"]


def test_eval_forward_equals_pytorch():
  """Eval mode (running statistics, no dropout): our float32 forward pass
  against PyTorch's in float64 with the same weights."""
  torch.manual_seed(0)
  tmodel = TorchIGN()
  _randomise_norms(tmodel)
  tmodel = tmodel.double().eval()
  model, variables = _ours()
  variables = _torch_to_ours(tmodel, variables)
  x = _inputs()
  ours = np.asarray(
      jax.jit(lambda v, x: model.apply(v, x, train=False))(
          variables, jnp.asarray(x)
      )
  )
  with torch.no_grad():
    ref = tmodel(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  assert np.std(ref) > 0.05  # a non-degenerate output
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_train_forward_and_running_statistics_equal_pytorch():
  """Train mode without dropout: batch statistics normalise, and the
  running statistics update as torch.nn.BatchNorm2d's."""
  torch.manual_seed(1)
  tmodel = TorchIGN(p=0.0)
  _randomise_norms(tmodel, seed=1)
  tmodel = tmodel.double().train()
  model, variables = _ours(p=0.0)
  variables = _torch_to_ours(tmodel, variables)
  x = _inputs(8, seed=1)
  ours, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  )(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tmodel(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5)
  after = _torch_to_ours(tmodel, variables)["batch_stats"]
  for path, value in jax.tree_util.tree_flatten_with_path(
      updates["batch_stats"]
  )[0]:
    expected = after
    for p in path:
      expected = expected[p.key]
    np.testing.assert_allclose(
        np.asarray(value), expected, rtol=1e-4, atol=1e-5, err_msg=str(path)
    )


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_is_pytorchs_adam(weight_decay):
  """optimizer.name='adam' against torch.optim.Adam, four steps."""
  config = config_lib.base_config()
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-2
  config.optimizer.weight_decay = weight_decay
  rs = np.random.RandomState(0)
  w0 = rs.standard_normal((3, 4)).astype(np.float64)
  grads = [rs.standard_normal((3, 4)) for _ in range(4)]

  tw = torch.tensor(w0, requires_grad=True)
  topt = torch.optim.Adam(
      [tw], lr=1e-2, betas=(0.5, 0.999), eps=1e-8, weight_decay=weight_decay
  )
  tx = train_step_lib.make_optimizer(config)
  w = jnp.asarray(w0, jnp.float32)
  opt_state = tx.init(w)
  for g in grads:
    tw.grad = torch.tensor(g)
    topt.step()
    updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, w)
    w = w + updates
  np.testing.assert_allclose(
      np.asarray(w), tw.detach().numpy(), rtol=1e-5, atol=1e-6
  )
  if weight_decay:
    # PyTorch's AdamW (decoupled decay) ends elsewhere: the two differ.
    tw2 = torch.tensor(w0, requires_grad=True)
    adamw = torch.optim.AdamW(
        [tw2], lr=1e-2, betas=(0.5, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    for g in grads:
      tw2.grad = torch.tensor(g)
      adamw.step()
    assert np.max(np.abs(tw2.detach().numpy() - tw.detach().numpy())) > 1e-6
