"""Train state, optimiser and the (pure, jittable) CIGN train step.

One step: noise the real images (std 0.15, clamped), compute the five-term
loss of `cign_jax.losses` and its gradient, apply AdamW (betas 0.5/0.999,
weight decay 0.01, as PyTorch's AdamW; or PyTorch's Adam with
config.optimizer.name = 'adam') and carry the BatchNorm running
statistics, and (config.ema_decay > 0) an exponential moving average of the
parameters that sampling and evaluation use. All randomness of step n derives
from (seed, n), so the same seed gives the same run, and a resumed run
continues exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from cign_jax import data
from cign_jax import losses
from cign_jax import models


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # The parameters' exponential moving average when config.ema_decay > 0
  # (what `eval_variables` returns), else None.
  ema_params: Any = None


def total_train_steps(
    config: ml_collections.ConfigDict,
    num_examples: int = data.SPLIT_SIZES["train"],
) -> int:
  """`num_train_steps` when > 0, else `num_epochs` epochs of full batches."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs) * (num_examples // int(config.batch_size))


def learning_rate(config: ml_collections.ConfigDict, total_steps=None):
  """The learning rate: the paper's constant, or (`optimizer.lr_schedule =
  'cosine'`) a cosine decay from it to 0 over the run's steps."""
  o = config.optimizer
  if o.lr_schedule != "constant" and total_steps is None:
    total_steps = total_train_steps(config)
  return schedule(o.learning_rate, o.lr_schedule, total_steps)


def schedule(peak, lr_schedule: str, total_steps=None):
  """`learning_rate` for a peak rate given as a number (a sweep's member
  rate is a traced value)."""
  if lr_schedule == "constant":
    return peak
  return optax.cosine_decay_schedule(peak, max(int(total_steps), 1))


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps=None
) -> optax.GradientTransformation:
  """The optimiser `config.optimizer.name` names, as PyTorch defines it.

  'adamw': AdamW, the weight decay decoupled from the moments (the CIGN
  code). 'adam': Adam, the weight decay (if any) added to the gradient
  before the moments, as torch.optim.Adam's `weight_decay` (the IGN code
  uses it with none).
  """
  o = config.optimizer
  return optimizer(
      o.get("name", "adamw"),
      learning_rate(config, total_steps),
      b1=o.b1,
      b2=o.b2,
      eps=o.eps,
      weight_decay=o.weight_decay,
  )


def optimizer(
    name: str, lr, b1, b2, eps, weight_decay
) -> optax.GradientTransformation:
  """`make_optimizer` from its numbers (numbers or traced values: a sweep
  builds each member's inside its step); `lr` a rate or a schedule."""
  if name == "adamw":
    return optax.adamw(
        learning_rate=lr,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
    )
  if name == "adam":
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(lr),
    )
  raise ValueError(
      f"config.optimizer.name: unknown optimizer {name!r}; "
      "expected 'adamw' or 'adam'"
  )


def create_train_state(
    config: ml_collections.ConfigDict,
    key=None,
    model=None,
    total_steps=None,
    tx=None,
) -> TrainState:
  """Initialises parameters (PyTorch's init distributions) and AdamW state.

  `model` and `tx` default to the config's network and optimiser; a caller
  that passes the same objects again gets states whose static parts (the
  network's `apply`, the optimiser) are equal, so a jitted step traced for
  one state runs the others without tracing again (`train.py`).
  """
  model = model or models.model_from_config(config)
  if key is None:
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = models.init_variables(model, key)
  ema = None
  if config.ema_decay > 0:
    ema = jax.tree_util.tree_map(jnp.copy, variables["params"])
  state = TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      tx=(make_optimizer(config, total_steps) if tx is None else tx),
      ema_params=ema,
  )
  # The step as a strong int32 array, as a restored checkpoint has it (flax
  # starts from the Python int 0, a weakly typed int32 in the step's
  # signature): a resumed run then runs the program a fresh run compiled,
  # and loads it from the persistent compilation cache instead of compiling
  # another.
  return state.replace(step=jnp.zeros((), jnp.int32))


def ema_decay_at(step, ema_decay: float):
  """The average's decay at `step` (the step being taken, from 0): the
  usual warm-up min(ema_decay, (1 + step) / (10 + step)), so that the
  average forgets the random initialisation within the first steps."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def update_ema(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params."""
  return jax.tree_util.tree_map(
      lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params
  )


def all_finite(tree) -> jax.Array:
  """True (a scalar bool) when every array of `tree` is free of NaN/Inf."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def step_key(base_key, step):
  return jax.random.fold_in(base_key, step)


def train_step(
    state: TrainState,
    images,
    labels,
    base_key,
    loss_cfg: losses.LossConfig,
    train_noise_std: float,
    ema_decay: float = 0.0,
) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One AdamW step on a batch of real images in [-1, 1] with labels.

  Returns the new state and metrics: the five weighted loss terms, `loss`
  (their sum) and `finite` (1.0 when the loss, gradients, new parameters and new
  BatchNorm statistics are all finite; the update is then applied, else the state is returned unchanged so the caller
  can stop with the last good state).
  """
  key = step_key(base_key, state.step)
  k_noise, k_loss = jax.random.split(key)
  x = losses.add_training_noise(k_noise, images, train_noise_std)

  def loss_fn(params):
    return losses.idempotent_loss(
        state.apply_fn, params, state.batch_stats, x, labels, k_loss, loss_cfg
    )

  (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  # (A sweep passes each member's decay as a traced value: the state then
  # keeps an average, as every member's decay is positive.)
  if not isinstance(ema_decay, (int, float)) or ema_decay > 0:
    new_state = new_state.replace(
        ema_params=update_ema(
            state.ema_params,
            new_state.params,
            ema_decay_at(state.step, ema_decay),
        )
    )
  # A step is good only when everything it produces is finite: the loss,
  # the gradients, and the new parameters, BatchNorm statistics and average
  # (a huge learning rate can overflow these with finite gradients).
  finite = jnp.isfinite(loss) & all_finite(
      (grads, new_state.params, new_state.batch_stats, new_state.ema_params)
  )
  new_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old), new_state, state
  )
  metrics = dict(terms)
  metrics["loss"] = loss
  metrics["finite"] = finite.astype(jnp.float32)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict):
  """The train step with the config's constants bound (not yet jitted)."""
  return functools.partial(
      train_step,
      loss_cfg=losses.LossConfig.from_config(config),
      train_noise_std=float(config.data.train_noise_std),
      ema_decay=float(config.ema_decay),
  )


def eval_variables(state: TrainState) -> Dict[str, Any]:
  """The variables for evaluation-time forward passes: the parameters'
  moving average when the run keeps one, else the parameters; running BN
  statistics."""
  params = state.params if state.ema_params is None else state.ema_params
  return {"params": params, "batch_stats": state.batch_stats}
