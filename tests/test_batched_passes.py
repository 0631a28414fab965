"""The loss's batched forward calls against the sequential ones (the
reference), the grouped BatchNorm and dropout against separate calls, and the
split ('per_class') channel-conditioned conv against the concatenation."""

import functools
import os
import subprocess
import sys
import textwrap
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cign_jax import config as config_lib
from cign_jax import dropout as dropout_lib
from cign_jax import grouped
from cign_jax import losses
from cign_jax import models
from cign_jax import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(b, seed=0):
  rs = np.random.RandomState(seed)
  x = rs.uniform(-1, 1, (b, 28, 28, 1))
  c = rs.randint(0, 10, (b,)).astype(np.int32)
  return x, c


class _Float64Namespace(types.ModuleType):
  """`jax.numpy` with `float32` meaning float64 (our modules cast BatchNorm
  statistics, the output and the L1 distances to float32)."""

  def __getattr__(self, name):
    return getattr(jnp, name)


@pytest.fixture
def precision(request, monkeypatch):
  """The test's dtype ('float64' or 'float32', from its `dtype` parameter);
  float64 runs our modules' float32 casts in float64."""
  if request.node.callspec.params["dtype"] == "float32":
    yield jnp.float32
    return
  namespace = _Float64Namespace("jax_numpy_float64")
  namespace.float32 = jnp.float64
  monkeypatch.setattr(models, "jnp", namespace)
  monkeypatch.setattr(losses, "jnp", namespace)

  class Linear64(models.Linear):
    dtype: Any = jnp.float64

  monkeypatch.setattr(models, "Linear", Linear64)
  with jax.enable_x64(True):
    yield jnp.float64


def _flat(tree):
  return {
      jax.tree_util.keystr(k): np.asarray(v, np.float64)
      for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _assert_trees_close(got, want, rtol, what):
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for key in want:
    scale = max(np.max(np.abs(want[key])), 1e-30)
    err = np.max(np.abs(got[key] - want[key])) / scale
    assert err <= rtol, f"{what} {key}: relative difference {err:.3g}"


def _loss_and_grads(
    conditioning,
    num_mismatch,
    passes,
    dtype,
    b=3,
    channel_conv="concat",
    grads=True,
):
  """(total, terms, new running statistics, gradients) of the loss; with
  grads=False the total alone (the forward program, without the backward)."""
  model = models.IdempotentNetwork(
      conditioning=conditioning,
      latent_dim=4,
      intermediate_dim=8,
      dtype=dtype,
      channel_conv=channel_conv,
  )
  variables = models.init_variables(model, jax.random.key(1))
  cast = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), t)
  params, stats = cast(variables["params"]), cast(variables["batch_stats"])
  # Running statistics away from their initial values.
  stats = jax.tree_util.tree_map(lambda a: a + 0.25, stats)
  x, c = _data(b)
  x = jnp.asarray(x, dtype)
  cfg = losses.LossConfig(
      num_mismatch_labels=num_mismatch,
      conditional=conditioning != "none",
      passes=passes,
  )

  def loss(p):
    return losses.idempotent_loss(
        model.apply, p, stats, x, jnp.asarray(c), jax.random.key(7), cfg
    )

  if not grads:
    return jax.jit(lambda p: loss(p)[0])(params)
  (total, (terms, new_stats)), grads = jax.jit(
      jax.value_and_grad(loss, has_aux=True)
  )(params)
  return total, terms, new_stats, grads


@functools.lru_cache(maxsize=None)
def _sequential_reference(conditioning, num_mismatch, dtype):
  """The sequential calls' loss, terms, statistics and gradients (the
  reference), computed once per process for each case that asks."""
  return _loss_and_grads(conditioning, num_mismatch, "sequential", dtype)


# Each case compiles two train-step-sized programs (about half a minute
# apiece on 2 cores), so the cases cover each code path once rather than the
# full product: both conditionings, the unconditional network, and the three
# kinds of mismatch term (none: no mismatch group; one wrong label per
# image, drawn; all nine, each image repeated), in float64, where the two
# formulations agree to rounding (all nine, with channel conditioning; none,
# with filter conditioning), and in float32, the tolerance training runs at
# (one drawn label, with filter conditioning; the unconditional network).
@pytest.mark.parametrize(
    "conditioning,num_mismatch,dtype",
    [
        ("channel", 9, "float64"),
        ("filter", 0, "float64"),
        ("filter", 1, "float32"),
        ("none", 0, "float32"),
    ],
)
def test_batched_passes_equal_sequential(
    conditioning, num_mismatch, dtype, precision
):
  want = _sequential_reference(conditioning, num_mismatch, precision)
  got = _loss_and_grads(conditioning, num_mismatch, "batched", precision)
  rtol = 1e-10 if precision == jnp.float64 else 2e-4
  for name in losses.LOSS_TERMS:
    w, g = float(want[1][name]), float(got[1][name])
    assert abs(g - w) <= rtol * max(abs(w), 1e-6), (name, g, w)
  # All five terms are live (dropout masks equal, else they would differ
  # by far more than the tolerance); the mismatch terms only with labels.
  assert float(want[1]["loss_rec"]) > 0
  if num_mismatch:
    assert float(want[1]["loss_idem_mismatch"]) > 0
  _assert_trees_close(got[2], want[2], rtol, "running statistics")
  # Gradients: the float64 case is the equivalence check (1e-10). In float32
  # the sums run in another order; BatchNorm's scale and bias gradients,
  # sums of many cancelling terms, differed by up to 2.5e-3 relative
  # (measured 2026-11-28), hence 2.5e-2 there.
  _assert_trees_close(
      got[3],
      want[3],
      10 * rtol if precision == jnp.float64 else 2.5e-2,
      "gradient",
  )
  # The running statistics moved (the update is not a no-op).
  moved = [
      np.max(np.abs(np.asarray(a) - 0.25 - i))
      for i, a in zip(
          [0, 1],
          [
              got[2]["discriminator"]["batch_norm_1"]["mean"],
              got[2]["discriminator"]["batch_norm_1"]["var"],
          ],
      )
  ]
  assert min(moved) > 1e-4


@pytest.mark.parametrize("dtype", ["float64"])
def test_gpu_formulation_equals_the_reference(dtype, precision):
  """The batched calls with the per-class channel conv (the form meant for GPUs)
  against the sequential calls with the concatenated label channel (the
  reference of the ('channel', 9, 'float64') case above, computed once)."""
  want = _sequential_reference("channel", 9, precision)
  got = _loss_and_grads(
      "channel", 9, "batched", precision, channel_conv="per_class"
  )
  for name in losses.LOSS_TERMS:
    w, g = float(want[1][name]), float(got[1][name])
    assert abs(g - w) <= 1e-10 * max(abs(w), 1e-6), (name, g, w)
  _assert_trees_close(got[2], want[2], 1e-10, "running statistics")
  _assert_trees_close(got[3], want[3], 1e-9, "gradient")


def test_batched_differs_without_per_group_statistics(monkeypatch):
  """The grouping matters: normalising the concatenated batch as one group
  gives a different loss (so the test above is not vacuous)."""
  want = _loss_and_grads("channel", 1, "batched", jnp.float32, grads=False)
  original = models.TorchBatchNorm.__call__

  def one_group(self, x, train, groups=None):
    return original(self, x, train, None)

  monkeypatch.setattr(models.TorchBatchNorm, "__call__", one_group)
  got = _loss_and_grads("channel", 1, "batched", jnp.float32, grads=False)
  assert abs(float(got) - float(want)) > 1e-3 * abs(float(want))


def test_grouped_batchnorm_equals_separate_calls():
  bn = models.TorchBatchNorm()
  rs = np.random.RandomState(0)
  parts = [
      jnp.asarray(rs.normal(i, 1 + i, (n, 3, 3, 4)), jnp.float32)
      for i, n in enumerate((2, 5, 1))
  ]
  variables = bn.init(jax.random.key(0), parts[0], train=False)
  variables = {
      "params": {"scale": jnp.arange(1.0, 5.0), "bias": jnp.arange(4.0) - 1},
      "batch_stats": variables["batch_stats"],
  }
  stats = variables["batch_stats"]
  outs = []
  for p in parts:
    y, upd = bn.apply(
        {"params": variables["params"], "batch_stats": stats},
        p,
        train=True,
        mutable=["batch_stats"],
    )
    outs.append(y)
    stats = upd["batch_stats"]
  y, upd = bn.apply(
      variables,
      jnp.concatenate(parts),
      train=True,
      groups=(2, 5, 1),
      mutable=["batch_stats"],
  )
  np.testing.assert_allclose(y, jnp.concatenate(outs), rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(upd["batch_stats"][k], stats[k], rtol=1e-5)
  # A group of one image: biased variance over its H*W values.
  np.testing.assert_allclose(
      np.asarray(y[7]),
      (np.asarray(parts[2][0]) - np.asarray(parts[2][0]).mean((0, 1)))
      / np.sqrt(np.asarray(parts[2][0]).var((0, 1)) + 1e-5)
      * np.arange(1.0, 5.0)
      + np.arange(4.0)
      - 1,
      rtol=1e-4,
      atol=1e-4,
  )


@pytest.mark.parametrize("stream", [0, 3])
def test_grouped_dropout_masks_equal_separate_calls(stream):
  drop = models.Dropout(0.5, stream=stream)
  x = jnp.ones((7, 3, 2, 5), jnp.float32)
  keys = jax.random.split(jax.random.key(3), 3)
  sizes = (2, 4, 1)
  y = drop.apply(
      {},
      x,
      deterministic=False,
      groups=sizes,
      rngs={grouped.dropout_stream(g): keys[g] for g in range(3)},
  )
  # With the keys passed in (as the half-networks pass them), group g's mask
  # is keep_mask of its key and the layer's stream.
  y_keys = drop.apply({}, x, deterministic=False, groups=sizes, keys=list(keys))
  start = 0
  for g, n in enumerate(sizes):
    want = drop.apply(
        {}, x[start : start + n], deterministic=False, rngs={"dropout": keys[g]}
    )
    np.testing.assert_array_equal(y[start : start + n], want)
    keep = dropout_lib.keep_mask(keys[g], 0.5, (n, 3, 2, 5), stream)
    np.testing.assert_array_equal(
        np.asarray(y_keys[start : start + n]) != 0, np.asarray(keep)
    )
    start += n
  assert 0.2 < float(jnp.mean(y == 0)) < 0.8
  with pytest.raises(ValueError, match="2 keys for 3 groups"):
    drop.apply({}, x, deterministic=False, groups=sizes, keys=list(keys[:2]))


def test_groups_must_add_up():
  model = models.IdempotentNetwork(latent_dim=2, intermediate_dim=4)
  variables = models.init_variables(model, jax.random.key(0))
  x = jnp.zeros((4, 28, 28, 1))
  with pytest.raises(ValueError, match="groups .* adding up to the batch"):
    model.apply(
        variables,
        x,
        jnp.zeros(4, jnp.int32),
        train=True,
        groups=(2, 3),
        rngs={"dropout": jax.random.key(0)},
        mutable=["batch_stats"],
    )


@pytest.mark.parametrize("train", [False, True])
def test_per_class_channel_conv_equals_concatenation(train):
  """Same parameters: f and its gradient with the label map concatenated as
  an input channel, and with the split kernel and per-class map conv."""
  kw = dict(conditioning="channel", latent_dim=4, intermediate_dim=8)
  concat = models.IdempotentNetwork(channel_conv="concat", **kw)
  split = models.IdempotentNetwork(channel_conv="per_class", **kw)
  variables = models.init_variables(concat, jax.random.key(2))
  # Checkpoint layout unchanged: the split model initialises the same tree.
  split_vars = models.init_variables(split, jax.random.key(2))
  assert jax.tree_util.tree_structure(
      split_vars
  ) == jax.tree_util.tree_structure(variables)
  for a, b in zip(
      jax.tree_util.tree_leaves(split_vars),
      jax.tree_util.tree_leaves(variables),
  ):
    assert a.shape == b.shape
  x, c = _data(6, seed=4)
  x, c = jnp.asarray(x, jnp.float32), jnp.asarray(c)

  def out(model):
    def f(params):
      y = model.apply(
          {"params": params, "batch_stats": variables["batch_stats"]},
          x,
          c,
          train=train,
          rngs={"dropout": jax.random.key(1)},
          mutable=["batch_stats"],
      )[0]
      return jnp.sum(jnp.sin(3 * y)), y

    return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

  (_, y_want), g_want = out(concat)
  (_, y_got), g_got = out(split)
  # float32 through ten layers summed in another order: within 1e-5 of the
  # output's largest magnitude (an absolute 2e-6 was crossed by 2.2e-6 on
  # one of 4704 values under the test processes' XLA flags,
  # tests/fast_compile.py).
  _assert_trees_close({"f": y_got}, {"f": y_want}, 1e-5, "output")
  _assert_trees_close(g_got, g_want, 1e-4, "gradient")


def test_pick_by_label_and_condition_maps():
  per_class = jnp.asarray(
      np.random.RandomState(0).normal(size=(10, 2, 3, 4)), jnp.float32
  )
  labels = jnp.asarray([3, 0, 9, 3])
  np.testing.assert_array_equal(
      ops.pick_by_label(per_class, labels), np.asarray(per_class)[[3, 0, 9, 3]]
  )
  emb = jnp.asarray(np.random.RandomState(1).normal(size=(10, 5)), jnp.float32)
  kernel = jnp.asarray(
      np.random.RandomState(2).normal(size=(5, 6)), jnp.float32
  )
  bias = jnp.arange(6.0) / 10
  maps = ops.condition_maps(emb, kernel, bias, 2, 3)
  x = jnp.zeros((3, 2, 3, 2))
  cat = ops.channel_condition(x, emb[jnp.asarray([4, 1, 4])], kernel, bias)
  np.testing.assert_allclose(
      cat[..., 2:], np.asarray(maps)[[4, 1, 4]], rtol=1e-6
  )
  with pytest.raises(ValueError, match="H\\*W = 9"):
    ops.condition_maps(emb, kernel, bias, 3, 3)


def test_config_switches_are_validated():
  config = config_lib.base_config()
  config.matmul_precision = "tf32"
  with pytest.raises(ValueError, match="config.matmul_precision"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.loss.passes = "parallel"
  with pytest.raises(ValueError, match="config.loss.passes"):
    config_lib.validate(config)
  config = config_lib.base_config()
  config.model.channel_conv = "pad"
  with pytest.raises(ValueError, match="config.model.channel_conv"):
    config_lib.validate(config)
  assert config_lib.resolve_passes("auto") in ("sequential", "batched")
  with pytest.raises(ValueError, match="unknown passes"):
    config_lib.resolve_passes("x")


def test_matmul_precision_reaches_the_convolutions():
  """'highest' is applied while f is traced: its lowering names the
  precision of the products (and of XLA's convolutions); 'default' leaves
  XLA's default. Lowered in a fresh process, so that no precision or x64
  setting left by another test's tracing can reach it."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      from cign_jax import models
      def hlo(precision):
        model = models.IdempotentNetwork(latent_dim=2, intermediate_dim=4,
                                         matmul_precision=precision)
        variables = models.init_variables(model, jax.random.key(0))
        f = jax.jit(lambda v, x, c: model.apply(v, x, c))
        return f.lower(variables, jnp.zeros((2, 28, 28, 1)),
                       jnp.zeros(2, jnp.int32)).as_text()
      print("highest", "HIGHEST" in hlo("highest"))
      print("default", "HIGHEST" in hlo("default"))
      """)
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH", "")) if p
  )
  out = subprocess.run(
      [sys.executable, "-c", script],
      env=env,
      check=True,
      capture_output=True,
      text=True,
  ).stdout.split("\n")
  assert "highest True" in out, out
  assert "default False" in out, out
  with pytest.raises(ValueError, match="unknown matmul_precision"):
    models.IdempotentNetwork(
        latent_dim=2, intermediate_dim=4, matmul_precision="tf32"
    ).init(
        jax.random.key(0), jnp.zeros((1, 28, 28, 1)), jnp.zeros(1, jnp.int32)
    )
