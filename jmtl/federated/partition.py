"""Partitioning a task's training rows over sites, deterministic by seed.

Every function returns one int64 index array per site (rows of the task's training split);
the arrays are disjoint, and every row lands on exactly one site unless exact `examples` leave
some unused. Random draws come from `numpy.random.default_rng(seed)`; the same arguments give
the same partition on every machine.

Rules (S sites with shares s_k >= 0, sum s_k = 1):
- `split_by_shares` (IID; Hsu et al. 2019's homogeneous baseline): a seeded permutation of the n
  rows cut into consecutive blocks of sizes `counts_from_shares(n, s)` (largest remainders).
- `dirichlet` (label skew; Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data
  distribution", arXiv 1909.06335, sec. 3): for each class c, proportions p_c ~ Dir(alpha * S *
  s) (equal shares: Dir(alpha, ..., alpha), the paper's rule); the class's rows, permuted, are
  cut at the cumulative proportions. alpha -> inf approaches IID; alpha <= 0.1 gives most sites
  few classes.
- `power_law_shares` (quantity skew): s_k proportional to k^-power for k = 1..S (power 0 =
  equal shares; Li et al. 2021, "Federated learning on non-IID data silos", quantity skew).
- `enforce_minimum`: while a site has fewer than m rows, it takes one row (its last) from the
  site with the most rows (ties: the lowest index); ValueError when S * m > n.
- `holdout`: from each site's rows, floor(f * n_k) (at least 1 when f > 0 and n_k >= 2) chosen
  by a seeded permutation are held out for that site's own evaluation.
`partition_task` combines them for one task as `jmtl federated` does (see its docstring).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np


def counts_from_shares(n: int, shares: Sequence[float]) -> np.ndarray:
  """Row counts summing to n: floor(n s_k), the leftover rows to the largest remainders (ties:
  the lower index). `shares` are >= 0 with a positive sum (normalised here)."""
  s = np.asarray(shares, np.float64)
  if s.ndim != 1 or not s.size or np.any(s < 0) or not s.sum() > 0:
    raise ValueError(f"shares must be >= 0 with a positive sum, got {list(s)}")
  ideal = n * s / s.sum()
  counts = np.floor(ideal).astype(np.int64)
  order = sorted(range(len(s)), key=lambda i: (-(ideal[i] - counts[i]), i))
  for i in order[: n - int(counts.sum())]:
    counts[i] += 1
  return counts


def split_by_shares(n: int, shares: Sequence[float], rng: np.random.Generator
                    ) -> list[np.ndarray]:
  """IID: a random permutation of range(n) cut into blocks of `counts_from_shares` sizes."""
  perm = rng.permutation(n)
  cuts = np.cumsum(counts_from_shares(n, shares))[:-1]
  return [np.sort(p) for p in np.split(perm, cuts)]


def split_exact(n: int, counts: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
  """Exact row counts per site (a site's `examples`), from a random permutation; when they sum
  to more than n, they are scaled down by `counts_from_shares(n, counts)`."""
  counts = np.asarray(counts, np.int64)
  if counts.sum() > n:
    counts = counts_from_shares(n, counts)
  perm = rng.permutation(n)[: int(counts.sum())]
  return [np.sort(p) for p in np.split(perm, np.cumsum(counts)[:-1])]


def dirichlet(labels: Sequence[int], shares: Sequence[float], alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
  """Label skew: per class c (in sorted order), p_c ~ Dir(alpha * S * s); the class's rows in a
  random order go to the sites in blocks of `counts_from_shares(n_c, p_c)`."""
  labels = np.asarray(labels)
  s = np.asarray(shares, np.float64)
  s = s / s.sum()
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  conc = alpha * len(s) * s
  parts: list[list[np.ndarray]] = [[] for _ in s]
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    p = np.zeros(len(s))
    live = conc > 0
    p[live] = rng.dirichlet(conc[live])
    cuts = np.cumsum(counts_from_shares(len(rows), p))[:-1]
    for k, block in enumerate(np.split(rows, cuts)):
      parts[k].append(block)
  return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def power_law_shares(n_sites: int, power: float) -> np.ndarray:
  """s_k = k^-power / sum_j j^-power, k = 1..S."""
  k = np.arange(1, n_sites + 1, dtype=np.float64)
  s = k ** -float(power)
  return s / s.sum()


def enforce_minimum(parts: Sequence[np.ndarray], minimum: int) -> list[np.ndarray]:
  """Each site gets >= `minimum` rows, taking the last row of the largest site one at a time."""
  parts = [np.asarray(p, np.int64) for p in parts]
  total = sum(len(p) for p in parts)
  if minimum * len(parts) > total:
    raise ValueError(f"{len(parts)} sites x {minimum} rows at least need {minimum * len(parts)} "
                     f"rows; there are {total}")
  for k in range(len(parts)):
    while len(parts[k]) < minimum:
      donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
      parts[k] = np.sort(np.append(parts[k], parts[donor][-1]))
      parts[donor] = parts[donor][:-1]
  return parts


def holdout(parts: Sequence[np.ndarray], fraction: float, rng: np.random.Generator
            ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(kept, held) per site: floor(f n_k) rows (>= 1 when f > 0 and n_k >= 2) held out."""
  kept, held = [], []
  for p in parts:
    p = np.asarray(p, np.int64)
    h = int(np.floor(fraction * len(p)))
    if fraction > 0 and len(p) >= 2:
      h = max(h, 1)
    h = min(h, max(len(p) - 1, 0))
    perm = rng.permutation(len(p))
    held.append(np.sort(p[perm[:h]]))
    kept.append(np.sort(p[perm[h:]]))
  return kept, held


def task_seed(seed: int, task: str) -> list[int]:
  """The seed of one task's partition: (seed, crc32(task name))."""
  return [int(seed), zlib.crc32(task.encode())]


def partition_task(n: int, labels: Sequence[int] | None, *, method: str, n_sites: int,
                   shares: Sequence[float] | None = None, examples: Sequence[int] | None = None, alpha: float = 0.5, power: float = 1.0,
                   minimum: int = 0, holdout_fraction: float = 0.0, seed: int = 0,
                   task: str = "") -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(train, held-out) row indices per holding site for one task of n training rows.

  method "iid": `split_by_shares` with `shares` (None: equal) or `split_exact` with `examples`;
  "quantity": the same, with `power_law_shares(n_sites, power)` unless shares or examples are
  given;
  "dirichlet": `dirichlet` over `labels` (tasks without class labels, `labels=None`, fall back
  to IID). Then `enforce_minimum(minimum)`, then `holdout(holdout_fraction)`. The generator is
  seeded by `task_seed(seed, task)`.
  """
  rng = np.random.default_rng(task_seed(seed, task))
  given = examples is not None and any(e > 0 for e in examples)
  if shares is None:
    shares = (power_law_shares(n_sites, power) if method == "quantity" and not given
              else np.full(n_sites, 1.0 / n_sites))
  if len(shares) != n_sites:
    raise ValueError(f"{len(shares)} shares for {n_sites} sites")
  if method == "dirichlet" and labels is not None:
    parts = dirichlet(labels, shares, alpha, rng)
  elif method in ("iid", "quantity", "dirichlet"):
    parts = split_exact(n, examples, rng) if given else split_by_shares(n, shares, rng)
  else:
    raise ValueError(f"unknown partition method {method!r}; known: iid, dirichlet, quantity")
  parts = enforce_minimum(parts, minimum)
  return holdout(parts, holdout_fraction, rng)
