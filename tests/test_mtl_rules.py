"""Each task-balancing rule of jmtl.mtl against an independent numpy re-implementation of its
paper's equations (or the authors' code), on two- and three-task toy problems, step by step."""

import numpy as np
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from scipy.optimize import minimize

from jmtl import mtl
from jmtl.mtl import gradient, weighting


def _grads(k, p=12, seed=0, conflict=True):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, p)) * rng.uniform(0.3, 3.0, size=(k, 1))
  if conflict:  # make task 1 fight task 0
    g[1] = -0.7 * g[0] + 0.3 * rng.normal(size=p)
  return g


def _apply(beta, g):
  return np.asarray(beta, np.float64) @ g


def _gram(g):
  return jnp.asarray(g @ g.T, jnp.float32)


# ------------------------------------------------------------------ PCGrad
def _pcgrad_np(g, orders):
  """Yu et al. 2020, Algorithm 1, on explicit vectors."""
  out = []
  for i in range(len(g)):
    gi = g[i].copy()
    for j in orders[i]:
      d = gi @ g[j]
      if d < 0:
        gi = gi - d / (g[j] @ g[j] + 1e-8) * g[j]
    out.append(gi)
  return np.sum(out, axis=0)


@pytest.mark.parametrize("k, seed", [(2, 0), (2, 1), (3, 2), (3, 3), (4, 4)])
def test_pcgrad_projection_matches_numpy(k, seed):
  g = _grads(k, seed=seed)
  orders = np.asarray(gradient.pcgrad_orders(jax.random.key(seed), k))
  for i in range(k):  # each row: a permutation of the other tasks
    assert sorted(orders[i]) == [j for j in range(k) if j != i]
  want = _pcgrad_np(g, orders)
  got = _apply(gradient.pcgrad(_gram(g), jnp.asarray(orders)), g)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_pcgrad_two_tasks_by_hand():
  g = np.array([[1.0, 0.0], [-1.0, 1.0]])
  # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
  got = _apply(gradient.pcgrad(_gram(g), jnp.array([[1], [0]])), g)
  np.testing.assert_allclose(got, [0.5, 1.5], atol=1e-6)


def test_pcgrad_leaves_agreeing_gradients_alone():
  g = np.array([[1.0, 0.2], [0.5, 1.0], [0.3, 0.3]])
  beta = gradient.pcgrad(_gram(g), gradient.pcgrad_orders(jax.random.key(0), 3))
  np.testing.assert_allclose(beta, [1, 1, 1], atol=1e-7)


# ------------------------------------------------------------------ MGDA
@pytest.mark.parametrize("seed", range(4))
def test_mgda_two_task_closed_form(seed):
  g = _grads(2, seed=seed, conflict=seed % 2 == 0)
  g1, g2 = g
  a = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0)  # Sener & Koltun Alg. 1
  want = a * g1 + (1 - a) * g2
  got = _apply(gradient.mgda(_gram(g)), g)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mgda_two_tasks_one_dominates():
  g = np.array([[1.0, 0.0], [3.0, 0.0]])  # min-norm point of the hull is g1 itself
  np.testing.assert_allclose(gradient.mgda(_gram(g)), [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_mgda_three_tasks_is_the_min_norm_point(seed):
  g = _grads(3, seed=seed)
  A = g @ g.T
  res = minimize(lambda a: a @ A @ a, np.ones(3) / 3, bounds=[(0, 1)] * 3,
                 constraints=({"type": "eq", "fun": lambda a: 1 - a.sum()},), tol=1e-12)
  want = res.x @ g
  beta = np.asarray(gradient.mgda(_gram(g)))
  assert beta.min() >= 0 and abs(beta.sum() - 1) < 1e-5
  np.testing.assert_allclose(_apply(beta, g), want, rtol=1e-3, atol=1e-3 * np.linalg.norm(g))


# ------------------------------------------------------------------ CAGrad
def _cagrad_np(g, alpha, rescale=1):
  """The official cagrad() (Cranial-XIX/CAGrad), vectors as rows, scipy's SLSQP."""
  k = len(g)
  GG = g @ g.T
  g0_norm = np.sqrt(GG.mean() + 1e-8)
  x0 = np.ones(k) / k
  c = alpha * g0_norm + 1e-8
  obj = lambda x: x @ GG @ x0 + c * np.sqrt(x @ GG @ x + 1e-8)
  res = minimize(obj, x0, bounds=[(0, 1)] * k,
                 constraints=({"type": "eq", "fun": lambda x: 1 - x.sum()},), tol=1e-12)
  gw = res.x @ g
  d = g.mean(0) + c / (np.linalg.norm(gw) + 1e-8) * gw
  return d / (1 + alpha ** 2) if rescale == 1 else d / (1 + alpha) if rescale == 2 else d


@pytest.mark.parametrize("k, seed, alpha", [(2, 0, 0.5), (2, 1, 0.4), (3, 2, 0.5), (3, 3, 0.2),
                                            (4, 4, 0.8)])
def test_cagrad_dual_matches_official_solver(k, seed, alpha):
  g = _grads(k, seed=seed)
  want = _cagrad_np(g, alpha)
  got = _apply(gradient.cagrad(_gram(g), alpha), g)
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.linalg.norm(want))


def test_cagrad_c0_is_the_mean_gradient():
  g = _grads(3, seed=5)
  np.testing.assert_allclose(_apply(gradient.cagrad(_gram(g), 0.0), g), g.mean(0), rtol=1e-5)


# ------------------------------------------------------------------ weightings
class _Adam:
  """torch.optim.Adam's update in numpy (lr, betas 0.9/0.999, eps 1e-8, L2 weight_decay)."""

  def __init__(self, lr, weight_decay=0.0):
    self.lr, self.wd, self.m, self.v, self.t = lr, weight_decay, 0.0, 0.0, 0

  def step(self, x, g):
    g = g + self.wd * x
    self.t += 1
    self.m = 0.9 * self.m + 0.1 * g
    self.v = 0.999 * self.v + 0.001 * g * g
    mh, vh = self.m / (1 - 0.9 ** self.t), self.v / (1 - 0.999 ** self.t)
    return x - self.lr * mh / (np.sqrt(vh) + 1e-8)


def _losses(steps, k, seed=0):
  return np.random.default_rng(seed).uniform(0.2, 3.0, size=(steps, k))


def _fd(f, x, h=1e-6):
  """Central finite differences of a scalar numpy function."""
  out = np.zeros_like(x)
  for i in range(len(x)):
    e = np.zeros_like(x)
    e[i] = h
    out[i] = (f(x + e) - f(x - e)) / (2 * h)
  return out


def test_uncertainty_gradients_and_steps():
  k, lr = 3, 0.05
  w = weighting.uncertainty(k, lr)
  state = w.init()
  s, adam = np.zeros(k), _Adam(lr)
  present = jnp.ones(k)
  for losses in _losses(5, k):
    obj = lambda s_, L=losses: np.sum(0.5 * np.exp(-s_) * L + 0.5 * s_)  # Kendall Eq. 7
    obj_l = lambda L_, s_=s: np.sum(0.5 * np.exp(-s_) * L_ + 0.5 * s_)
    # the weight on grad L_t is dObj/dL_t
    np.testing.assert_allclose(w.weights(state, jnp.asarray(losses)), _fd(obj_l, losses),
                               rtol=1e-5)
    s = adam.step(s, _fd(obj, s))
    state = w.update(state, jnp.asarray(losses, jnp.float32), present)
    np.testing.assert_allclose(state["log_var"], s, rtol=1e-4, atol=1e-6)


def test_uncertainty_absent_task_keeps_its_variance():
  w = weighting.uncertainty(2, 0.1)
  state = w.update(w.init(), jnp.array([2.0, 0.0]), jnp.array([1.0, 0.0]))
  assert float(state["log_var"][1]) == 0.0 and float(state["log_var"][0]) != 0.0


def test_dwa_weights_step_by_step():
  k, temp, period = 3, 2.0, 2
  w = weighting.dwa(k, temp, period)
  state = w.init()
  seq = _losses(9, k, seed=1)
  means = []  # completed period means
  for n, losses in enumerate(seq):
    if len(means) >= 2:  # Liu et al. 2019, Eq. 7
      r = means[-1] / means[-2]
      want = k * np.exp(r / temp) / np.exp(r / temp).sum()
    else:
      want = np.ones(k)
    np.testing.assert_allclose(w.weights(state, jnp.asarray(losses)), want, rtol=1e-5)
    state = w.update(state, jnp.asarray(losses, jnp.float32), jnp.ones(k))
    if (n + 1) % period == 0:
      means.append(seq[n + 1 - period:n + 1].mean(0))
  assert len(means) == 4


def test_gradnorm_weight_update_step_by_step():
  k, alpha, lr = 3, 1.5, 0.02
  w = weighting.gradnorm(k, alpha, lr)
  state = w.init()
  rng = np.random.default_rng(3)
  weights, adam, l0 = np.ones(k), _Adam(lr), None
  for losses in _losses(5, k, seed=2):
    norms = rng.uniform(0.5, 4.0, size=k)  # |grad_W L_t|
    np.testing.assert_allclose(w.weights(state, jnp.asarray(losses)), weights, rtol=1e-5)
    l0 = losses if l0 is None else l0
    ratio = losses / l0
    r = ratio / ratio.mean()
    target = (weights * norms).mean() * r ** alpha  # treated as a constant (Chen et al. 2018)
    l_grad = lambda ww: np.sum(np.abs(ww * norms - target))  # Eq. 2
    weights = adam.step(weights, _fd(l_grad, weights))
    weights = weights * k / weights.sum()  # renormalised to sum k
    state = w.update(state, jnp.asarray(losses, jnp.float32), jnp.ones(k),
                     grad_norms=jnp.asarray(norms, jnp.float32))
    np.testing.assert_allclose(state["w"], weights, rtol=1e-4)
  np.testing.assert_allclose(float(jnp.sum(state["w"])), k, rtol=1e-5)


def test_famo_weights_and_logit_update_step_by_step():
  """Against the official FAMO class (Cranial-XIX/FAMO): get_weighted_loss and update."""
  k, lr, gamma = 3, 0.025, 0.01
  w = weighting.famo(k, lr, gamma)
  state = w.init()
  xi, adam = np.zeros(k), _Adam(lr, weight_decay=gamma)
  seq = _losses(6, k, seed=4)
  for losses in seq:
    z = np.exp(xi) / np.exp(xi).sum()
    D = losses + 1e-8
    c = (z / D).sum()
    loss = lambda L, z=z, c=c: np.sum(np.log(L + 1e-8) * z / c)  # the official weighted loss
    np.testing.assert_allclose(w.weights(state, jnp.asarray(losses)), _fd(loss, losses, 1e-7),
                               rtol=1e-4)
    new = losses * np.random.default_rng(int(losses[0] * 1e6)).uniform(0.7, 1.1, size=k)
    delta = np.log(D) - np.log(new + 1e-8)
    softmax = lambda x: np.exp(x) / np.exp(x).sum()
    d = _fd(lambda x: softmax(x) @ delta, xi)  # autograd.grad(softmax(w), w, delta)
    xi = adam.step(xi, d)
    state = w.update(state, jnp.asarray(losses, jnp.float32), jnp.ones(k),
                     new_losses=jnp.asarray(new, jnp.float32))
    np.testing.assert_allclose(state["logits"], xi, rtol=1e-4, atol=1e-6)


def test_static_and_equal():
  cfg = ml_collections.ConfigDict({"weighting": "static", "weights": {"b": 2.0, "a": 0.5},
                                   "gradient": "none", "cagrad_c": 0.5})
  m = mtl.build(cfg, ["b", "a"])
  assert m.names == ("a", "b")  # vectors follow sorted task names
  np.testing.assert_allclose(m.weighting.weights({}, jnp.zeros(2)), [0.5, 2.0])
  cfg.weighting = "equal"
  np.testing.assert_allclose(mtl.build(cfg, ["a", "b"]).weighting.weights({}, None), [1, 1])


# ------------------------------------------------------------------ pytree helpers
def test_gram_and_combine_over_parameter_trees():
  rng = np.random.default_rng(7)
  trees = [{"trunk": {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))},
            "heads": {"a": {"w": rng.normal(size=(2,))}}} for _ in range(3)]
  trees = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), trees)
  mask = mtl.shared_mask(trees[0])
  assert mask["trunk"]["w"] and not mask["heads"]["a"]["w"]
  flat = np.stack([np.concatenate([np.ravel(t["trunk"]["b"]), np.ravel(t["trunk"]["w"])])
                   for t in trees])
  np.testing.assert_allclose(mtl.gram_matrix(trees, mask), flat @ flat.T, rtol=1e-5)
  beta, w = jnp.array([0.2, 0.3, 0.5]), jnp.array([1.0, 2.0, 3.0])
  out = mtl.combine(trees, mask, beta, w)
  want_w = sum(float(beta[i]) * np.asarray(trees[i]["trunk"]["w"]) for i in range(3))
  want_h = sum(float(w[i]) * np.asarray(trees[i]["heads"]["a"]["w"]) for i in range(3))
  np.testing.assert_allclose(out["trunk"]["w"], want_w, rtol=1e-5)
  np.testing.assert_allclose(out["heads"]["a"]["w"], want_h, rtol=1e-5)
