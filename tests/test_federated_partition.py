"""Partitioning rules of `jmtl.federated.partition`: hand-worked cases and statistics."""

import numpy as np
import pytest

from jmtl.federated import partition as part


def _disjoint_cover(parts, n):
  rows = np.concatenate(parts)
  assert len(rows) == len(set(rows.tolist())), "a row landed on two sites"
  assert sorted(rows.tolist()) == list(range(n)), "a row landed on no site"


def test_counts_from_shares_hand_worked():
  # 10 x (0.5, 0.3, 0.2) = (5, 3, 2) exactly.
  assert part.counts_from_shares(10, [0.5, 0.3, 0.2]).tolist() == [5, 3, 2]
  # 10 / 3 = 3.33 each: floors 3, 3, 3, the one leftover row to the first (ties: lower index).
  assert part.counts_from_shares(10, [1, 1, 1]).tolist() == [4, 3, 3]
  # 7 x (0.1, 0.45, 0.45) = (0.7, 3.15, 3.15): floors (0, 3, 3), leftover to the largest
  # remainder, site 0 (0.7).
  assert part.counts_from_shares(7, [0.1, 0.45, 0.45]).tolist() == [1, 3, 3]
  with pytest.raises(ValueError, match="positive sum"):
    part.counts_from_shares(5, [0, 0])


def test_iid_split_covers_every_row_once_with_the_share_sizes_and_is_seeded():
  rng = lambda: np.random.default_rng(7)
  parts = part.split_by_shares(1000, [0.1, 0.2, 0.3, 0.4], rng())
  _disjoint_cover(parts, 1000)
  assert [len(p) for p in parts] == [100, 200, 300, 400]
  again = part.split_by_shares(1000, [0.1, 0.2, 0.3, 0.4], rng())
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  other = part.split_by_shares(1000, [0.1, 0.2, 0.3, 0.4], np.random.default_rng(8))
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def _label_fractions(parts, labels, classes):
  return np.array([np.bincount(labels[p], minlength=classes) / max(len(p), 1) for p in parts])


def test_dirichlet_large_alpha_is_near_iid_and_small_alpha_concentrates_labels():
  rng = np.random.default_rng(0)
  classes, n, S = 5, 20000, 4
  labels = rng.integers(0, classes, n)
  global_frac = np.bincount(labels, minlength=classes) / n
  big = part.dirichlet(labels, [1 / S] * S, 1000.0, np.random.default_rng(1))
  small = part.dirichlet(labels, [1 / S] * S, 0.1, np.random.default_rng(1))
  _disjoint_cover(big, n)
  _disjoint_cover(small, n)
  # alpha = 1000: every site's label distribution within 0.02 of the global one (total
  # variation), and site sizes within 10 % of n / S.
  tv_big = 0.5 * np.abs(_label_fractions(big, labels, classes) - global_frac).sum(1)
  assert tv_big.max() < 0.02, tv_big
  assert all(abs(len(p) - n / S) < 0.1 * n / S for p in big)
  # alpha = 0.1: sites are far from the global distribution; a site's top class holds most of
  # its rows (mean over sites of the top-class fraction > 0.6, vs 0.2 under IID).
  fr = _label_fractions(small, labels, classes)
  tv_small = 0.5 * np.abs(fr - global_frac).sum(1)
  assert tv_small.mean() > 0.4, tv_small
  assert np.mean([f.max() for f, p in zip(fr, small) if len(p)]) > 0.6


def test_dirichlet_per_class_cut_matches_a_hand_computation():
  """The rule step by step with the same generator: per class (sorted), permute its rows, draw
  p ~ Dir(alpha * S * s), cut at counts_from_shares."""
  labels = np.array([0, 1, 0, 1, 1, 0, 2, 2, 0, 1])
  shares, alpha = np.array([0.5, 0.25, 0.25]), 2.0
  got = part.dirichlet(labels, shares, alpha, np.random.default_rng(3))
  rng = np.random.default_rng(3)
  want = [[], [], []]
  for c in (0, 1, 2):
    rows = rng.permutation(np.flatnonzero(labels == c))
    p = rng.dirichlet(alpha * 3 * shares)
    counts = part.counts_from_shares(len(rows), p)
    start = 0
    for k in range(3):
      want[k] += rows[start:start + counts[k]].tolist()
      start += counts[k]
  assert [g.tolist() for g in got] == [sorted(w) for w in want]


def test_power_law_shares_hand_worked():
  # power 1 over 3 sites: (1, 1/2, 1/3) / (11/6) = (6/11, 3/11, 2/11).
  np.testing.assert_allclose(part.power_law_shares(3, 1.0), [6 / 11, 3 / 11, 2 / 11])
  np.testing.assert_allclose(part.power_law_shares(4, 0.0), [0.25] * 4)


def test_enforce_minimum_moves_rows_from_the_largest_site():
  parts = [np.array([0, 1, 2, 3, 4, 5]), np.array([6]), np.array([], np.int64)]
  out = part.enforce_minimum(parts, 2)
  # site 1 takes 5 (last of site 0), site 2 takes 4 then 3 (site 0 stays the largest).
  assert [p.tolist() for p in out] == [[0, 1, 2], [5, 6], [3, 4]]
  with pytest.raises(ValueError, match="need 12 rows"):
    part.enforce_minimum(parts, 4)


def test_holdout_sizes_hand_worked():
  parts = [np.arange(0, 20), np.arange(20, 23), np.arange(23, 24)]
  kept, held = part.holdout(parts, 0.1, np.random.default_rng(0))
  # floor(0.1 x 20) = 2; floor(0.3) = 0 -> at least 1 (3 >= 2 rows); a 1-row site keeps it.
  assert [len(h) for h in held] == [2, 1, 0]
  for p, k, h in zip(parts, kept, held):
    assert sorted(k.tolist() + h.tolist()) == p.tolist()


def test_partition_task_is_deterministic_by_seed_and_task_and_honours_examples():
  labels = np.arange(300) % 3
  a = part.partition_task(300, labels, method="dirichlet", n_sites=4, alpha=0.3, minimum=5,
                          holdout_fraction=0.1, seed=1, task="t")
  b = part.partition_task(300, labels, method="dirichlet", n_sites=4, alpha=0.3, minimum=5,
                          holdout_fraction=0.1, seed=1, task="t")
  c = part.partition_task(300, labels, method="dirichlet", n_sites=4, alpha=0.3, minimum=5,
                          holdout_fraction=0.1, seed=1, task="u")
  assert all(np.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
  assert not all(np.array_equal(x, y) for x, y in zip(a[0], c[0]))
  _disjoint_cover([*a[0], *a[1]], 300)
  assert all(len(k) + len(h) >= 5 for k, h in zip(*a))
  # quantity skew without shares: power law k^-1 over 4 sites (12/25, 6/25, 4/25, 3/25).
  kept, held = part.partition_task(250, None, method="quantity", n_sites=4, seed=0, task="t")
  assert [len(k) + len(h) for k, h in zip(kept, held)] == [120, 60, 40, 30]
  # exact examples: (10, 20) rows, the other 70 unused.
  kept, held = part.partition_task(100, None, method="iid", n_sites=2, examples=[10, 20],
                                   seed=0, task="t")
  assert [len(k) for k in kept] == [10, 20]
