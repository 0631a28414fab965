"""The IGN code's unconditional DCGAN-like network (`ign_dcgan`).

The reference is a PyTorch model written here from the network's description
(bias-free convolutions 4x4/2, 4x4/2, then three 3x3 without padding down to
a 1x1 code, transposed convolutions back; BatchNorm; Dropout2d; LeakyReLU 0.2
in the encoder, ReLU in the decoder, tanh out). Ours must have the same
parameters, layer shapes and outputs (eval mode, and train mode without
dropout, running statistics included); its channel dropout must drop whole
feature maps; its config must train, checkpoint and sample with the
library's ordinary code; `optimizer.name = 'adam'` must be PyTorch's Adam.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from cign_jax import checkpoints
from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import models
from cign_jax import sampling
from cign_jax import train
from cign_jax import train_step as train_step_lib
from cign_jax import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = utils.enable_compilation_cache()


def torch_encoder(b, d, c, p):
  """Encoder: conv -> Dropout2d -> LeakyReLU(0.2) [-> BatchNorm] four times
  (BatchNorm after the first three), then the code conv."""
  layers = []
  specs = [(c, b, 4, 2, 1), (b, 2 * b, 4, 2, 1), (2 * b, 4 * b, 3, 1, 0),
           (4 * b, 8 * b, 3, 1, 0)]
  for i, (ci, co, k, s, pad) in enumerate(specs):
    layers += [tnn.Conv2d(ci, co, k, s, pad, bias=False), tnn.Dropout2d(p),
               tnn.LeakyReLU(0.2)]
    if i < 3:
      layers.append(tnn.BatchNorm2d(co))
  layers.append(tnn.Conv2d(8 * b, d, 3, 1, 0, bias=False))
  return tnn.Sequential(*layers)


def torch_decoder(d, c, p):
  """Decoder: BatchNorm -> transposed conv -> Dropout2d -> ReLU four times,
  halving the channels, then a transposed conv to the image and tanh."""
  layers = []
  specs = [(d, d // 2, 3, 1, 0), (d // 2, d // 4, 3, 1, 0),
           (d // 4, d // 8, 3, 1, 0), (d // 8, d // 16, 4, 2, 1)]
  for ci, co, k, s, pad in specs:
    layers += [tnn.BatchNorm2d(ci),
               tnn.ConvTranspose2d(ci, co, k, s, pad, bias=False),
               tnn.Dropout2d(p), tnn.ReLU()]
  layers += [tnn.ConvTranspose2d(d // 16, c, 4, 2, 1, bias=False), tnn.Tanh()]
  return tnn.Sequential(*layers)


class TorchIGN(tnn.Module):

  def __init__(self, b=64, d=512, c=1, p=0.1):
    super().__init__()
    self.encoder = torch_encoder(b, d, c, p)
    self.decoder = torch_decoder(d, c, p)

  def forward(self, x):
    return self.decoder(self.encoder(x))


def _ours(b=64, d=512, p=0.1):
  model = models.DCGANIdempotentNetwork(latent_dim=b, intermediate_dim=d,
                                        dropout_rate=p)
  return model, models.init_variables(model, jax.random.key(0))


def _torch_to_ours(tmodel, variables):
  """Copies the PyTorch weights into our variables, layer by layer in
  order (each half's convolutions to conv_1.., its norms to batch_norm_1..)."""
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
  for half, seq in (("discriminator", tmodel.encoder),
                    ("generator", tmodel.decoder)):
    convs = [m for m in seq if isinstance(m, (tnn.Conv2d,
                                              tnn.ConvTranspose2d))]
    norms = [m for m in seq if isinstance(m, tnn.BatchNorm2d)]
    assert len(convs) == 5
    for i, m in enumerate(convs, start=1):
      w = m.weight.detach().double().numpy()
      # Conv2d (Co, Ci, kh, kw); ConvTranspose2d (Ci, Co, kh, kw).
      perm = (2, 3, 0, 1) if isinstance(m, tnn.ConvTranspose2d) else (
          2, 3, 1, 0)
      ours = params[half][f"conv_{i}"]["kernel"]
      assert ours.shape == w.transpose(perm).shape, (half, i)
      params[half][f"conv_{i}"]["kernel"] = w.transpose(perm).astype(
          np.float32)
    assert len(norms) == len(params[half]) - 5
    for j, m in enumerate(norms, start=1):
      name = f"batch_norm_{j}"
      params[half][name] = {
          "scale": m.weight.detach().numpy().astype(np.float32),
          "bias": m.bias.detach().numpy().astype(np.float32)}
      stats[half][name] = {
          "mean": m.running_mean.numpy().astype(np.float32),
          "var": m.running_var.numpy().astype(np.float32)}
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


def _inputs(n=6, seed=0):
  rs = np.random.RandomState(seed)
  noise = rs.standard_normal((n // 2, 28, 28, 1))
  images = np.clip(rs.uniform(-1.2, 1.0, (n - n // 2, 28, 28, 1)), -1, 1)
  return np.concatenate([noise, images]).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(
      np.asarray(x).transpose(0, 3, 1, 2))).double()


@pytest.mark.parametrize("b,d", [(64, 512), (16, 128)])
def test_parameter_count_and_shapes_equal_pytorch(b, d):
  tmodel = TorchIGN(b, d)
  _, variables = _ours(b, d)
  torch_count = sum(p.numel() for p in tmodel.parameters())
  assert models.count_parameters(variables["params"]) == torch_count
  torch_stats = sum(m.running_mean.numel() + m.running_var.numel()
                    for m in tmodel.modules()
                    if isinstance(m, tnn.BatchNorm2d))
  assert models.count_parameters(variables["batch_stats"]) == torch_stats
  _torch_to_ours(tmodel, variables)  # asserts every kernel's shape
  if (b, d) == (64, 512):
    # By hand: encoder kernels 1*64*16 + 64*128*16 + 128*256*9 + 256*512*9
    # + 512*512*9, its norms 2*(64+128+256); decoder kernels 512*256*9 +
    # 256*128*9 + 128*64*9 + 64*32*16 + 32*1*16, its norms
    # 2*(512+256+128+64).
    hand = (1024 + 131072 + 294912 + 1179648 + 2359296 + 896 + 1179648 +
            294912 + 73728 + 32768 + 512 + 1920)
    assert torch_count == hand == 5_550_336


def test_layer_output_shapes():
  """Every convolution's output, ours and PyTorch's, against the sizes
  computed by hand (H' = (H + 2p - k) / s + 1; transposed:
  (H - 1) s - 2p + k)."""
  expected = {
      "discriminator": [(14, 14, 64), (7, 7, 128), (5, 5, 256), (3, 3, 512),
                        (1, 1, 512)],
      "generator": [(3, 3, 256), (5, 5, 128), (7, 7, 64), (14, 14, 32),
                    (28, 28, 1)],
  }
  model, variables = _ours()
  _, state = model.apply(
      variables, jnp.zeros((2, 28, 28, 1)), train=False,
      capture_intermediates=lambda mdl, method: isinstance(mdl, models.Conv),
      mutable=["intermediates"])
  inter = state["intermediates"]
  for half, shapes in expected.items():
    got = [tuple(inter[half][f"conv_{i}"]["__call__"][0].shape[1:])
           for i in range(1, 6)]
    assert got == shapes, half

  tmodel = TorchIGN().eval()
  seen = []
  for m in tmodel.modules():
    if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d)):
      m.register_forward_hook(
          lambda mod, inp, out: seen.append(tuple(out.shape[1:])))
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
  ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(x)))
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
  ours, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, jnp.asarray(x))
  with torch.no_grad():
    ref = tmodel(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=2e-5)
  after = _torch_to_ours(tmodel, variables)["batch_stats"]
  for path, value in jax.tree_util.tree_flatten_with_path(
      updates["batch_stats"])[0]:
    expected = after
    for p in path:
      expected = expected[p.key]
    np.testing.assert_allclose(np.asarray(value), expected, rtol=1e-4,
                               atol=1e-5, err_msg=str(path))


def test_channel_dropout_drops_whole_feature_maps():
  b, c, rate = 64, 64, 0.25
  x = jnp.asarray(np.random.RandomState(0).uniform(0.5, 1.5, (b, 5, 7, c)),
                  jnp.float32)
  key = jax.random.key(3)
  y = np.asarray(dropout_lib.channel_dropout(x, rate, key))
  kept = np.all(y != 0, axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped)  # no map is partly dropped
  np.testing.assert_allclose(y[kept.nonzero()[0], :, :, kept.nonzero()[1]],
                             np.asarray(x)[kept.nonzero()[0], :, :,
                                           kept.nonzero()[1]] / (1 - rate),
                             rtol=1e-6)
  # 4096 Bernoulli(0.25) decisions: standard deviation of the rate 0.0068.
  assert abs(dropped.mean() - rate) < 0.03
  # Deterministic in the key, different across keys.
  np.testing.assert_array_equal(
      y, np.asarray(dropout_lib.channel_dropout(x, rate, key)))
  other = np.asarray(dropout_lib.channel_dropout(x, rate, jax.random.key(4)))
  assert np.any(np.all(other == 0, axis=(1, 2)) != dropped)
  np.testing.assert_array_equal(
      np.asarray(dropout_lib.channel_dropout(x, 0.0, key)), np.asarray(x))
  with pytest.raises(ValueError, match="dropout rate"):
    dropout_lib.channel_dropout(x, 1.0, key)
  with pytest.raises(ValueError, match="channel dropout needs"):
    dropout_lib.channel_dropout(x[0], 0.1, key)


def test_network_dropout_is_channel_wise_and_follows_the_rng():
  """In train mode every ChannelDropout output map of the network is all
  zero or has no zero; the 'dropout' key alone decides which."""
  model, variables = _ours(16, 128, p=0.3)
  x = jnp.asarray(_inputs(8))

  def run(key):
    return model.apply(
        variables, x, train=True, rngs={"dropout": key},
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, method: isinstance(
            mdl, models.ChannelDropout))

  out_a, state_a = run(jax.random.key(0))
  out_b, _ = run(jax.random.key(0))
  out_c, _ = run(jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))
  assert float(jnp.max(jnp.abs(out_a - out_c))) > 1e-4
  maps = jax.tree_util.tree_leaves(state_a["intermediates"])
  assert len(maps) == 8  # four in each half
  total = dropped = 0
  for y in maps:
    y = np.asarray(y)
    zero = np.all(y == 0, axis=(1, 2))
    assert np.all(zero | np.all(y != 0, axis=(1, 2)))
    total += zero.size
    dropped += zero.sum()
  assert abs(dropped / total - 0.3) < 0.05
  # Eval mode: no dropout, the same output whatever the key.
  f = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(
      np.asarray(f), np.asarray(model.apply(variables, x, train=False)))


def test_configs():
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py"))
  assert config.model.architecture == "ign_dcgan"
  assert config.model.conditioning == "none"
  assert config.model.dropout_rate == 0.1
  assert (config.optimizer.name, config.optimizer.learning_rate,
          config.optimizer.b1, config.optimizer.b2,
          config.optimizer.weight_decay) == ("adam", 1e-4, 0.5, 0.999, 0.0)
  assert (config.batch_size, config.num_epochs) == (256, 50)
  assert (config.loss.rec_weight, config.loss.idem_noise_weight,
          config.loss.tight_noise_weight) == (20.0, 20.0, 2.5)
  assert config.loss.tightness == "l1"  # the IGN code's plain L1
  model = models.model_from_config(config)
  assert isinstance(model, models.DCGANIdempotentNetwork)
  assert (model.latent_dim, model.intermediate_dim) == (64, 512)

  ablation = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ablation_unconditional.py"))
  model = models.model_from_config(ablation)
  assert isinstance(model, models.IdempotentNetwork)
  assert (ablation.model.architecture, model.conditioning) == ("cign", "none")


@pytest.mark.parametrize("field,value,message", [
    ("model.architecture", "unet",
     "config.model.architecture: unknown architecture 'unet'"),
    ("model.conditioning", "channel",
     "config.model.conditioning: the 'ign_dcgan' network is unconditional"),
    ("model.intermediate_dim", 100,
     "config.model.intermediate_dim: .* multiple of 16, got 100"),
    ("optimizer.name", "sgd",
     "config.optimizer.name: unknown optimizer 'sgd'.*'adamw', 'adam'"),
])
def test_bad_config_is_named(field, value, message):
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py"))
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_bad_model_arguments_are_named():
  with pytest.raises(ValueError, match="multiple of 16"):
    _ours(8, 24)
  with pytest.raises(ValueError, match="unconditional"):
    models.init_variables(
        models.DCGANIdempotentNetwork(conditioning="channel"),
        jax.random.key(0))
  model, variables = _ours(8, 64)
  with pytest.raises(ValueError, match=r"\(B, 28, 28, 1\)"):
    model.apply(variables, jnp.zeros((2, 32, 32, 1)))
  config = config_lib.base_config()
  config.model.architecture = "unet"
  with pytest.raises(ValueError, match="unknown architecture 'unet'"):
    models.model_from_config(config)


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
  topt = torch.optim.Adam([tw], lr=1e-2, betas=(0.5, 0.999), eps=1e-8,
                          weight_decay=weight_decay)
  tx = train_step_lib.make_optimizer(config)
  w = jnp.asarray(w0, jnp.float32)
  opt_state = tx.init(w)
  for g in grads:
    tw.grad = torch.tensor(g)
    topt.step()
    updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, w)
    w = w + updates
  np.testing.assert_allclose(np.asarray(w), tw.detach().numpy(), rtol=1e-5,
                             atol=1e-6)
  if weight_decay:
    # PyTorch's AdamW (decoupled decay) ends elsewhere: the two differ.
    tw2 = torch.tensor(w0, requires_grad=True)
    adamw = torch.optim.AdamW([tw2], lr=1e-2, betas=(0.5, 0.999), eps=1e-8,
                              weight_decay=weight_decay)
    for g in grads:
      tw2.grad = torch.tensor(g)
      adamw.step()
    assert np.max(np.abs(tw2.detach().numpy() - tw.detach().numpy())) > 1e-6


def test_train_step_on_fake_data_is_finite():
  """One step of the real config (5.5M parameters) on a small fake batch."""
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py"))
  state = train_step_lib.create_train_state(config)
  rs = np.random.RandomState(0)
  images = jnp.asarray(rs.uniform(-1, 1, (4, 28, 28, 1)), jnp.float32)
  labels = jnp.zeros((4,), jnp.int32)
  step = jax.jit(train_step_lib.make_train_step(config))
  new_state, metrics = step(state, images, labels, jax.random.key(0))
  assert float(metrics["finite"]) == 1.0
  for name in ("loss", "loss_rec", "loss_idem_noise", "loss_tight_noise"):
    assert np.isfinite(float(metrics[name])), name
  assert float(metrics["loss_rec"]) > 0
  assert float(metrics["loss_tight_noise"]) < 0
  assert float(metrics["loss_idem_mismatch"]) == 0.0
  assert float(metrics["loss_tight_mismatch"]) == 0.0
  assert int(new_state.step) == 1
  before = jax.tree_util.tree_leaves(state.params)
  after = jax.tree_util.tree_leaves(new_state.params)
  # Adam's first step moves every weight by about the learning rate.
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(after, before))
  assert 0.5e-4 < moved <= 1.01e-4
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in after)


def test_training_checkpoints_and_sampling_work_unchanged(tmp_path):
  """A tiny ign_dcgan run through `train_and_evaluate` on fake data, then
  `checkpoints.load_model` and `sampling.generate` on its directory."""
  config = config_lib.load_config_file(
      os.path.join(ROOT, "configs/ign_dcgan.py"))
  config.model.latent_dim = 4
  config.model.intermediate_dim = 32
  config.batch_size = 4
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (16, 28, 28, 1)).astype(np.uint8)
  labels = rs.randint(0, 10, (16,)).astype(np.int64)
  workdir = str(tmp_path / "run")
  # A test split: the config keeps its best checkpoint by validation loss.
  train.train_and_evaluate(config, workdir, dataset={
      "train": (images, labels), "test": (images[:8], labels[:8])})
  assert os.path.isfile(os.path.join(workdir, "samples.png"))
  assert checkpoints.read_best(workdir)["metric"] == "val_loss"
  loaded, model, variables, step = checkpoints.load_model(workdir)
  assert step == 2
  assert loaded.model.architecture == "ign_dcgan"
  assert isinstance(model, models.DCGANIdempotentNetwork)
  out = sampling.generate(model, variables, [0, 0, 0], jax.random.key(0))
  assert out.shape == (3, 28, 28, 1)
  assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1)
