"""cign_jax.interop.torch_archive against files written by PyTorch itself."""

import collections
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cign_jax.interop import torch_archive

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.*` is deprecated:DeprecationWarning"
)


def _np(t):
  return t.detach().cpu().numpy()


def _save(obj, path, **kwargs):
  torch.save(obj, str(path), **kwargs)
  return str(path)


def test_dtypes_and_scalars(tmp_path):
  tensors = {
      "f32": torch.randn(3, 4),
      "f64": torch.randn(5, dtype=torch.float64),
      "i64": torch.arange(-3, 7, dtype=torch.int64).reshape(2, 5),
      "i32": torch.tensor([1, -2, 3], dtype=torch.int32),
      "u8": torch.arange(200, 206, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "f16": torch.randn(4).half(),
      "scalar": torch.tensor(2.5),
      "empty": torch.zeros(0, 3),
  }
  path = _save(tensors, tmp_path / "t.pt")
  out = torch_archive.load(path)
  assert set(out) == set(tensors)
  for key, t in tensors.items():
    assert isinstance(out[key], np.ndarray), key
    assert out[key].dtype == _np(t).dtype, key
    assert out[key].shape == tuple(t.shape), key
    np.testing.assert_array_equal(out[key], _np(t), err_msg=key)


def test_bfloat16(tmp_path):
  t = torch.randn(6).bfloat16()
  out = torch_archive.load(_save({"b": t}, tmp_path / "b.pt"))
  assert out["b"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(out["b"].astype(np.float32), _np(t.float()))


def test_views_offsets_and_shared_storage(tmp_path):
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  views = {
      "base": base,
      "transposed": base.t(),
      "strided": base[1:5, ::3],
      "offset_flat": base.view(-1)[17:29],
      "column": base[:, 7],
      "expanded": base[2, :4].unsqueeze(0).expand(3, 4),
      "permuted": torch.arange(24.0).reshape(2, 3, 4).permute(2, 0, 1),
      "narrow_int": torch.arange(50, dtype=torch.int64)[10:40:7],
  }
  path = _save(views, tmp_path / "v.pt")
  out = torch_archive.load(path)
  for key, t in views.items():
    np.testing.assert_array_equal(out[key], _np(t), err_msg=key)
    assert out[key].flags.c_contiguous, key
  # Every tensor is an independent copy, even when storages were shared.
  out["base"][0, 0] = -1.0
  assert out["transposed"][0, 0] == 0.0


def test_nested_containers(tmp_path):
  obj = {
      "a": {"b": [torch.ones(2), {"c": torch.zeros(1, 2)}], "n": 3},
      "t": (torch.tensor([1, 2]), "text", 1.5, None),
      "od": collections.OrderedDict([("x", torch.eye(2)), ("y", 7)]),
      "set": {1, 2},
  }
  out = torch_archive.load(_save(obj, tmp_path / "n.pt"))
  np.testing.assert_array_equal(out["a"]["b"][0], np.ones(2, np.float32))
  np.testing.assert_array_equal(out["a"]["b"][1]["c"], np.zeros((1, 2)))
  assert out["a"]["n"] == 3
  assert out["t"][1:] == ("text", 1.5, None)
  np.testing.assert_array_equal(out["t"][0], [1, 2])
  assert isinstance(out["od"], collections.OrderedDict)
  assert list(out["od"]) == ["x", "y"]
  assert out["set"] == {1, 2}
  flat = torch_archive.flatten_arrays(out)
  assert set(flat) == {"od.x"}  # arrays inside lists/tuples are skipped


class _Net(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    self.bn = torch.nn.BatchNorm2d(3)
    self.blocks = torch.nn.ModuleList(
        [torch.nn.Linear(3, 4), torch.nn.Linear(4, 2, bias=False)]
    )
    self.register_buffer("table", torch.arange(6.0).reshape(2, 3))

  def forward(self, x):
    h = self.bn(self.conv(x)).mean(dim=(2, 3))
    for block in self.blocks:
      h = block(h)
    return h + self.table[0, :2]


def _trained_net():
  torch.manual_seed(0)
  net = _Net()
  opt = torch.optim.Adam(net.parameters(), lr=1e-2)
  for _ in range(2):
    opt.zero_grad()
    net(torch.randn(4, 2, 5, 5)).pow(2).sum().backward()
    opt.step()
  return net.eval(), opt


def _assert_same_state(flat, state_dict, prefix=""):
  expected = {
      k[len(prefix) :]: _np(v)
      for k, v in state_dict.items()
      if k.startswith(prefix)
  }
  assert set(flat) == set(expected)
  for key, value in expected.items():
    assert flat[key].dtype == value.dtype, key
    np.testing.assert_array_equal(flat[key], value, err_msg=key)


def test_plain_state_dict(tmp_path):
  net, _ = _trained_net()
  path = _save(net.state_dict(), tmp_path / "sd.pt")
  _assert_same_state(torch_archive.state_dict_from(path), net.state_dict())
  # The OrderedDict order survives.
  assert list(torch_archive.load(path)) == list(net.state_dict())


def test_lightning_checkpoint(tmp_path):
  net, opt = _trained_net()
  copy = _Net()
  state = collections.OrderedDict()
  for k, v in net.state_dict().items():
    state["model." + k] = v
  for k, v in copy.state_dict().items():
    state["model_copy." + k] = v
  import argparse  # pylint: disable=import-outside-toplevel

  ckpt = {
      "epoch": 4,
      "global_step": 1234,
      "pytorch-lightning_version": "2.4.0",
      "state_dict": state,
      "optimizer_states": [opt.state_dict()],
      "lr_schedulers": [],
      "hyper_parameters": {"latent_dim": 32, "ns": argparse.Namespace(a=1)},
      "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
  }
  path = _save(ckpt, tmp_path / "last.ckpt")
  loaded = torch_archive.load(path)
  assert loaded["global_step"] == 1234 and loaded["epoch"] == 4
  assert loaded["hyper_parameters"]["latent_dim"] == 32
  ns = loaded["hyper_parameters"]["ns"]  # unknown class -> placeholder
  assert isinstance(ns, torch_archive.TorchObject)
  assert ns.type_name == "argparse.Namespace" and ns.attrs == {"a": 1}
  exp_avg = loaded["optimizer_states"][0]["state"][0]["exp_avg"]
  np.testing.assert_array_equal(
      exp_avg, _np(opt.state_dict()["state"][0]["exp_avg"])
  )

  _assert_same_state(
      torch_archive.state_dict_from(path, prefix="model."), net.state_dict()
  )
  # A prefix without the dot matches whole components only.
  _assert_same_state(
      torch_archive.state_dict_from(path, prefix="model"), net.state_dict()
  )
  _assert_same_state(torch_archive.state_dict_from(path), state)
  with pytest.raises(ValueError, match="no tensors found"):
    torch_archive.state_dict_from(path, prefix="generator.")


def test_torchscript_module(tmp_path):
  net, _ = _trained_net()
  scripted = torch.jit.script(net)
  path = str(tmp_path / "net_ts.pt")
  scripted.save(path)
  obj = torch_archive.load(path)
  assert isinstance(obj, torch_archive.TorchObject)
  assert obj.type_name.startswith("__torch__.")
  assert obj.training is False
  assert obj.conv.attrs["training"] is False
  np.testing.assert_array_equal(obj.conv.weight, _np(net.conv.weight))
  _assert_same_state(torch_archive.state_dict_from(path), net.state_dict())
  _assert_same_state(
      torch_archive.state_dict_from(path, prefix="blocks"),
      net.state_dict(),
      prefix="blocks.",
  )
  assert torch_archive.load_constants(path) == ()


def test_torchscript_constants(tmp_path):
  const = torch.arange(6.0).reshape(2, 3)

  def f(x):
    return x @ const

  traced = torch.jit.trace(f, torch.zeros(1, 2))
  path = str(tmp_path / "traced.pt")
  traced.save(path)
  constants = torch_archive.load_constants(path)
  assert any(
      isinstance(c, np.ndarray) and np.array_equal(c, _np(const))
      for c in constants
  )


def test_pickled_module(tmp_path):
  net, _ = _trained_net()
  path = _save(net, tmp_path / "whole.pt")
  # torch.save of a whole nn.Module: classes become placeholders, and the
  # parameters are found in _parameters / _buffers / _modules.
  _assert_same_state(torch_archive.state_dict_from(path), net.state_dict())


def test_does_not_import_torch(tmp_path):
  path = _save({"w": torch.ones(3)}, tmp_path / "w.pt")
  code = (
      "import sys; from cign_jax.interop import torch_archive as ta; "
      f"x = ta.load({path!r}); assert x['w'].sum() == 3; "
      "assert 'torch' not in sys.modules, 'torch was imported'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_corrupt_files(tmp_path):
  good = _save({"w": torch.randn(100, 100)}, tmp_path / "good.pt")
  data = open(good, "rb").read()

  def check(name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern) as info:
      torch_archive.load(path)
    assert str(path) in str(info.value)

  check("random.pt", os.urandom(4096), "not a PyTorch zip archive")
  check("empty.pt", b"", "not a PyTorch zip archive")
  check("truncated.pt", data[: len(data) // 2], "truncated|corrupt")
  # Flip bytes inside the stored tensor data: the zip CRC catches it.
  body = bytearray(data)
  start = data.index(b"good/data/0") + 200
  body[start : start + 64] = bytes(64)
  check("flipped.pt", bytes(body), "corrupt")

  other_zip = tmp_path / "other.zip"
  with zipfile.ZipFile(other_zip, "w") as zf:
    zf.writestr("readme.txt", "hello")
  with pytest.raises(ValueError, match="not a PyTorch archive"):
    torch_archive.load(other_zip)

  bad_pickle = tmp_path / "badpickle.pt"
  with zipfile.ZipFile(bad_pickle, "w") as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02}q\x00(X")  # cut short
  with pytest.raises(ValueError, match="cannot unpickle"):
    torch_archive.load(bad_pickle)

  missing = tmp_path / "missing_storage.pt"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(missing, "w") as dst:
    for info in src.infolist():
      if info.filename != "good/data/0":
        dst.writestr(info.filename, src.read(info.filename))
  with pytest.raises(ValueError, match="missing"):
    torch_archive.load(missing)

  legacy = _save(
      {"w": torch.ones(2)},
      tmp_path / "legacy.pt",
      _use_new_zipfile_serialization=False,
  )
  with pytest.raises(ValueError, match="legacy"):
    torch_archive.load(legacy)

  with pytest.raises(FileNotFoundError):
    torch_archive.load(tmp_path / "does_not_exist.pt")
  assert not torch_archive.is_torch_archive(tmp_path / "random.pt")
  assert torch_archive.is_torch_archive(good)
