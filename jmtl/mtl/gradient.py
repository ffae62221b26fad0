"""Gradient combination on the shared parameters: PCGrad, MGDA (min-norm), CAGrad.

Every method here is a pure function of the k x k Gram matrix `gram[i, j] = <g_i, g_j>` of the
tasks' gradients g_1..g_k on the shared (trunk) parameters, and returns coefficients `beta`
[k] such that the combined shared gradient is d = sum_i beta_i g_i. Working in the Gram
space costs O(k^2) dot products over the parameters (one pass per pair, each a sum over the
parameter's shards) and never stacks or flattens the gradients, so sharded parameters stay
sharded. Coefficients are float32, shape [k]; `gram` must be a float [k, k] symmetric
positive semi-definite array.

Scale: PCGrad returns a sum of k (projected) gradients, like equal weighting's sum of losses;
MGDA's convex combination (sum alpha = 1) and CAGrad's g_0 + ... (g_0 the *mean* gradient) are
about 1/k of that, as in their papers. Adam-family optimizers are insensitive to it; SGD's
learning rate is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-8

METHODS = ("none", "pcgrad", "mgda", "cagrad")


def pcgrad(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS, Algorithm 1).

  Rule: for each task i, g_i^PC = g_i; for j in a random order over the other tasks
  (`orders[i]`, a permutation of {0..k-1} \\ {i}, shape [k, k-1] int): if <g_i^PC, g_j> < 0 then
  g_i^PC <- g_i^PC - <g_i^PC, g_j> / |g_j|^2 g_j (projection onto the normal plane of the
  *original* g_j, Eq. 1 applied sequentially). The update is d = sum_i g_i^PC.
  Each g_i^PC is tracked as a row of coefficients C[i] over the original gradients, so
  <g_i^PC, g_j> = (C gram)[i, j]; beta = sum_i C[i]. |g_j|^2 gets +1e-8 (LibMTL's guard).
  """
  k = gram.shape[0]
  gram = gram.astype(jnp.float32)
  rows = []
  for i in range(k):
    c = jnp.zeros((k,), jnp.float32).at[i].set(1.0)
    for pos in range(k - 1):
      j = orders[i, pos]
      dot = c @ gram[:, j]
      coef = jnp.where(dot < 0, dot / (gram[j, j] + EPS), 0.0)
      c = c - coef * jax.nn.one_hot(j, k, dtype=jnp.float32)
    rows.append(c)
  return jnp.sum(jnp.stack(rows), axis=0)


def pcgrad_orders(key: jax.Array, k: int) -> jax.Array:
  """For each task i a uniformly random order of the other k-1 tasks, shape [k, k-1] int32."""
  out = []
  for i in range(k):
    others = jnp.array([j for j in range(k) if j != i], jnp.int32)
    out.append(jax.random.permutation(jax.random.fold_in(key, i), others))
  return jnp.stack(out) if k > 1 else jnp.zeros((1, 0), jnp.int32)


def min_norm_2(g11: jax.Array, g12: jax.Array, g22: jax.Array) -> jax.Array:
  """The weight gamma in [0, 1] minimising |gamma v1 + (1 - gamma) v2|^2 given <v1,v1> = g11,
  <v1,v2> = g12, <v2,v2> = g22 (Sener & Koltun 2018, Algorithm 1):
  gamma = clip((g22 - g12) / (g11 - 2 g12 + g22), 0, 1)."""
  den = g11 - 2.0 * g12 + g22
  return jnp.clip((g22 - g12) / jnp.maximum(den, EPS), 0.0, 1.0)


def mgda(gram: jax.Array, iters: int = 500) -> jax.Array:
  """MGDA (Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization",
  NeurIPS): the minimum-norm point of the convex hull of the task gradients,
  alpha = argmin_{alpha in simplex} |sum_i alpha_i g_i|^2 (their Eq. 3), d = sum alpha_i g_i.

  Two tasks: the closed form of Algorithm 1, alpha_1 = clip(<g_2 - g_1, g_2> / |g_1 - g_2|^2,
  0, 1), alpha_2 = 1 - alpha_1. More tasks: the same quadratic program over the simplex by
  projected gradient descent with Nesterov momentum from alpha = 1/k (`iters` steps of size
  1 / (2 lambda_max(gram))), in place of the paper's Frank-Wolfe (Algorithm 2), which zigzags
  when the minimum lies on a face of the simplex (250 Frank-Wolfe steps left |d|^2 17 % above
  the minimum on a three-task toy problem; see tests/test_mtl_rules.py).

  MGDA-UB (their Section 3.3) takes the gradients of the shared *representation* Z instead of
  the shared parameters; that needs one input shared by all tasks. In jmtl's mixed batches
  every task has its own rows, so the tasks' representations are different tensors and their
  Z-gradients are orthogonal by construction; jmtl therefore applies the min-norm solver to
  the gradients of the shared parameters (the exact MGDA that MGDA-UB bounds).
  """
  k = gram.shape[0]
  gram = gram.astype(jnp.float32)
  if k == 1:
    return jnp.ones((1,), jnp.float32)
  if k == 2:
    a = min_norm_2(gram[0, 0], gram[0, 1], gram[1, 1])
    return jnp.stack([a, 1.0 - a])

  a = gram / jnp.maximum(jnp.trace(gram), EPS)  # the minimiser is invariant to the scale
  step = 1.0 / (2.0 * jnp.maximum(jnp.linalg.eigvalsh(a)[-1], EPS))

  def body(t, carry):
    alpha, prev = carry
    y = alpha + (t / (t + 3.0)) * (alpha - prev)
    return project_simplex(y - step * 2.0 * (a @ y)), alpha

  start = jnp.full((k,), 1.0 / k, jnp.float32)
  alpha, _ = jax.lax.fori_loop(0, iters, body, (start, start))
  return alpha


def project_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection of v [k] onto the probability simplex (Duchi et al. 2008, Fig. 1)."""
  k = v.shape[0]
  u = jnp.sort(v)[::-1]
  css = jnp.cumsum(u)
  idx = jnp.arange(1, k + 1, dtype=v.dtype)
  cond = u - (css - 1.0) / idx > 0
  rho = jnp.max(jnp.where(cond, jnp.arange(k), 0))
  theta = (css[rho] - 1.0) / (rho + 1.0)
  return jnp.maximum(v - theta, 0.0)


def cagrad(gram: jax.Array, c: float = 0.5, rescale: int = 1, iters: int = 500) -> jax.Array:
  """CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning",
  NeurIPS, Eq. 2 and its dual, Algorithm 1; official code `cagrad()` in Cranial-XIX/CAGrad).

  With g_0 = (1/k) sum_i g_i and phi = c^2 |g_0|^2, the dual is
    w* = argmin_{w in simplex} <g_w, g_0> + sqrt(phi) |g_w|,   g_w = sum_i w_i g_i,
  i.e. in Gram terms F(w) = w^T A b + c |g_0| sqrt(w^T A w + 1e-8) with A = gram, b = 1/k
  (the official objective, solved there with scipy SLSQP). The update is
    d = g_0 + sqrt(phi) / |g_w*| g_w*,  divided by (1 + c^2) when rescale = 1 (the default
  of the official code), by (1 + c) when rescale = 2, as is when rescale = 0.
  Here the dual is solved by projected gradient descent with Nesterov momentum on the
  simplex (`iters` steps, step 1 / the local Lipschitz bound of F on the normalised A).
  """
  k = gram.shape[0]
  gram = gram.astype(jnp.float32)
  scale = jnp.maximum(jnp.mean(gram), EPS)  # |g_0|^2; F's minimiser is invariant to it
  a = gram / scale
  b = jnp.full((k,), 1.0 / k, jnp.float32)
  cc = float(c)  # c |g_0| on the normalised problem, where |g_0| = 1
  ab = a @ b
  lam = jnp.maximum(jnp.linalg.eigvalsh(a)[-1], EPS)

  def grad_f(w):
    aw = a @ w
    return ab + cc * aw / jnp.sqrt(w @ aw + EPS / scale)

  def body(t, carry):
    w, w_prev = carry
    y = w + (t / (t + 3.0)) * (w - w_prev)
    n = jnp.sqrt(jnp.maximum(y @ (a @ y), 0.0) + EPS / scale)
    step = 1.0 / (lam + cc * lam / jnp.maximum(n, 1e-3))
    return project_simplex(y - step * grad_f(y)), w

  w0 = b
  w, _ = jax.lax.fori_loop(0, iters, body, (w0, w0))
  gw_norm = jnp.sqrt(jnp.maximum(w @ (gram @ w), 0.0))
  lmbda = cc * jnp.sqrt(scale) / (gw_norm + EPS)
  beta = b + lmbda * w
  if rescale == 1:
    beta = beta / (1.0 + cc ** 2)
  elif rescale == 2:
    beta = beta / (1.0 + cc)
  return beta
