"""Task weightings: the weight w_t that multiplies task t's loss gradient in the update.

Every method is a `Weighting` of pure functions over dense vectors indexed by the run's tasks
(sorted names), float32, shape [k]:

  state = init()                                   a dict of arrays (part of the TrainState)
  w = weights(state, losses)                       [k], treated as a constant (stop_gradient)
  state = update(state, losses, present, grad_norms=..., new_losses=...)

`losses` [k] are this step's per-task losses (0 where a task is not in the batch),
`present` [k] is 1.0 for the tasks in the batch, `grad_norms` [k] are |grad L_t| over the
shared parameters (GradNorm only, `needs_grad_norms`), `new_losses` [k] are the losses of the
same batch after the update (FAMO only, `needs_new_losses`). The model's gradient is
sum_t w_t grad L_t (before any gradient combination of `jmtl.mtl.gradient`), and `w` is what
the trainer logs as `train/<task>/weight`.

Learned weights (uncertainty, GradNorm, FAMO) take an Adam step of learning rate `mtl.lr`
(optax.adam, b1 0.9, b2 0.999, eps 1e-8) on their own parameters each step, so their state
(parameters and Adam moments) lives in the train state and is checkpointed with it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

EPS = 1e-8

METHODS = ("equal", "static", "uncertainty", "dwa", "gradnorm", "famo")


class Weighting(NamedTuple):
  """One weighting method (see the module docstring for the signatures)."""
  name: str
  init: Callable[[], dict[str, Any]]
  weights: Callable[[dict[str, Any], jax.Array], jax.Array]
  update: Callable[..., dict[str, Any]]
  needs_grad_norms: bool = False
  needs_new_losses: bool = False


def _unchanged(state, losses, present, **_):
  del losses, present
  return state


def equal(k: int) -> Weighting:
  """Equal weighting: w_t = 1, loss = sum_t L_t (jmtl's behaviour without `mtl`)."""
  return Weighting("equal", lambda: {}, lambda s, l: jnp.ones((k,), jnp.float32), _unchanged)


def static(weights: Any) -> Weighting:
  """Static weighting: w_t = `mtl.weights[t]`, fixed for the whole run."""
  w = jnp.asarray(weights, jnp.float32)
  return Weighting("static", lambda: {}, lambda s, l: w, _unchanged)


def uncertainty(k: int, lr: float) -> Weighting:
  """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018, "Multi-Task Learning
  Using Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR, Eq. 7).

  With learned s_t = log sigma_t^2 (init 0) the objective is
    L = sum_t exp(-s_t) / 2 * L_t + s_t / 2
  (Eq. 7's 1/(2 sigma^2) L + log sigma, the form LibMTL uses for every task kind), so
  w_t = exp(-s_t) / 2 and dL/ds_t = (1 - exp(-s_t) L_t) / 2 for the tasks in the batch (0 for
  the others). s takes one Adam step of learning rate `lr` on that gradient per step.
  """
  tx = optax.adam(lr)

  def init():
    s = jnp.zeros((k,), jnp.float32)
    return {"log_var": s, "opt": tx.init(s)}

  def weights(state, losses):
    del losses
    return 0.5 * jnp.exp(-state["log_var"])

  def update(state, losses, present, **_):
    s = state["log_var"]
    g = 0.5 * (1.0 - jnp.exp(-s) * losses) * present
    upd, opt = tx.update(g, state["opt"], s)
    return {"log_var": optax.apply_updates(s, upd), "opt": opt}

  return Weighting("uncertainty", init, weights, update)


def dwa(k: int, temperature: float, period: int) -> Weighting:
  """Dynamic Weight Average (Liu, Johns & Davison 2019, "End-to-End Multi-Task Learning with
  Attention", CVPR, Eq. 7).

  Rule: w_t(n) = k exp(r_t(n-1) / T) / sum_i exp(r_i(n-1) / T), r_t(n-1) = L_t(n-1) / L_t(n-2),
  where L_t(n) is task t's mean loss over "epoch" n and T = `temperature` (paper: 2); w = 1
  during the first two epochs. jmtl's epoch is a period of `period` steps (data streams are
  infinite); the mean is over the steps of the period whose batch held the task (a task absent
  for a whole period keeps its previous mean).
  """
  def init():
    z = jnp.zeros((k,), jnp.float32)
    return {"sum": z, "count": z, "prev": z, "prev2": z,
            "periods": jnp.zeros((), jnp.int32), "in_period": jnp.zeros((), jnp.int32)}

  def weights(state, losses):
    del losses
    r = state["prev"] / jnp.maximum(state["prev2"], EPS)
    w = k * jax.nn.softmax(r / temperature)
    return jnp.where(state["periods"] >= 2, w, jnp.ones((k,), jnp.float32))

  def update(state, losses, present, **_):
    total = state["sum"] + losses * present
    count = state["count"] + present
    in_period = state["in_period"] + 1
    done = in_period >= period
    mean = jnp.where(count > 0, total / jnp.maximum(count, 1.0), state["prev"])
    z = jnp.zeros_like(total)
    return {
        "sum": jnp.where(done, z, total),
        "count": jnp.where(done, z, count),
        "prev": jnp.where(done, mean, state["prev"]),
        "prev2": jnp.where(done, state["prev"], state["prev2"]),
        "periods": state["periods"] + done.astype(jnp.int32),
        "in_period": jnp.where(done, 0, in_period),
    }

  return Weighting("dwa", init, weights, update)


def gradnorm(k: int, alpha: float, lr: float) -> Weighting:
  """GradNorm (Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing
  in Deep Multitask Networks", ICML, Eq. 1-2 and Algorithm 1).

  With G_t = |grad_W (w_t L_t)| = w_t |grad_W L_t| on the shared weights W, G_bar = mean_t G_t,
  inverse training rates L~_t = L_t / L_t(0) (L_t(0): the losses of the first step) and
  r_t = L~_t / mean_i L~_i, the auxiliary loss is
    L_grad = sum_t | G_t - G_bar r_t^alpha |_1
  with the target G_bar r_t^alpha treated as a constant, so dL_grad/dw_t =
  sign(G_t - target_t) |grad_W L_t|. The weights take one Adam step of learning rate `lr`
  on that gradient, are floored at 1e-4 (the paper does not say how it keeps them positive),
  and are renormalised to sum_t w_t = k (Algorithm 1). W is every shared (trunk) parameter,
  not only the last shared layer: jmtl computes per-task gradients of the whole trunk anyway
  (the paper's choice of the last layer is to save compute).
  """
  tx = optax.adam(lr)

  def init():
    w = jnp.ones((k,), jnp.float32)
    return {"w": w, "opt": tx.init(w), "initial": jnp.zeros((k,), jnp.float32),
            "started": jnp.zeros((), jnp.bool_)}

  def weights(state, losses):
    del losses
    return state["w"]

  def update(state, losses, present, *, grad_norms, **_):
    w = state["w"]
    l0 = jnp.where(state["started"], state["initial"], losses)
    ratio = losses / jnp.maximum(l0, EPS)
    n_present = jnp.maximum(jnp.sum(present), 1.0)
    r = ratio / jnp.maximum(jnp.sum(ratio * present) / n_present, EPS)
    g_t = w * grad_norms
    g_bar = jnp.sum(g_t * present) / n_present
    target = g_bar * r ** alpha
    grad = jnp.sign(g_t - target) * grad_norms * present
    upd, opt = tx.update(grad, state["opt"], w)
    w = jnp.maximum(optax.apply_updates(w, upd), 1e-4)
    w = w * k / jnp.sum(w)
    return {"w": w, "opt": opt, "initial": l0, "started": jnp.ones((), jnp.bool_)}

  return Weighting("gradnorm", init, weights, update, needs_grad_norms=True)


def famo(k: int, lr: float, gamma: float) -> Weighting:
  """FAMO (Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS, Eq. 8-10
  and Algorithm 1; official code `FAMO` in Cranial-XIX/FAMO).

  With logits xi (init 0), z = softmax(xi) and losses L_t (minimum loss taken as 0, +1e-8):
  the update direction is d = sum_t c z_t / L_t grad L_t, c = (sum_i z_i / L_i)^-1, i.e. the
  gradient of c sum_t z_t log L_t (c held constant), so w_t = c z_t / L_t; these sum to 1. After the model update, with L'_t the losses of the same batch at the new
  parameters, delta_t = log L_t - log L'_t and xi takes one step of Adam (learning rate `lr`,
  L2 weight decay `gamma` added to the gradient, as torch.optim.Adam(weight_decay=gamma) in
  the official code) on the gradient J_softmax(xi)^T delta = z * (delta - <z, delta>).
  Cost: one extra forward pass of the batch per step, whatever the number of tasks.
  """
  tx = optax.chain(optax.add_decayed_weights(gamma), optax.adam(lr))

  def init():
    xi = jnp.zeros((k,), jnp.float32)
    return {"logits": xi, "opt": tx.init(xi)}

  def weights(state, losses):
    z = jax.nn.softmax(state["logits"])
    d = losses + EPS
    c = 1.0 / jnp.sum(z / d)
    return c * z / d

  def update(state, losses, present, *, new_losses, **_):
    del present
    xi = state["logits"]
    z = jax.nn.softmax(xi)
    delta = jnp.log(losses + EPS) - jnp.log(new_losses + EPS)
    grad = z * (delta - jnp.sum(z * delta))
    upd, opt = tx.update(grad, state["opt"], xi)
    return {"logits": optax.apply_updates(xi, upd), "opt": opt}

  return Weighting("famo", init, weights, update, needs_new_losses=True)
