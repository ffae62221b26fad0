"""Asynchronous FedBuff rounds as an event-driven simulation on the host, and stragglers.

FedBuff (Nguyen et al. 2022, arXiv 2106.06639, Algorithm 1) with every site of `fed.sites`
training concurrently (concurrency = S) and a buffer of K = `fed.buffer_size` updates:

  time 0, server version v = 0: every site k downloads x_0 and starts a job (s_k = 0, v_k = 0).
  A job of site k started at time s_k from version v_k delivers at
      f_k = s_k + T_k,    T_k = 2 latency + download + H x step_time / speed x slow_k + upload
  (the synchronous round's seconds of `jmtl.federated.loop.site_seconds`; slow_k is the
  straggler factor of the job, below).
  Server step v -> v + 1: the K earliest deliveries, ordered by (f_k, k), fill the buffer; the
  clock moves to t = the K-th delivery time (the moment the buffer is full), and with
      tau_k = v - v_k                       (server versions since the site's model)
      s(tau) = 1 / sqrt(1 + tau)            (FedBuff's staleness scaling, its section 5)
      Delta_k = x_{v_k} - y_k               (y_k: the site's model after H local steps)
      Delta = sum_{k in buffer} n_k s(tau_k) Delta_k / sum_{k in buffer} n_k
      x_{v+1} = x_v + server_opt(Delta)     (sgd lr eta_g: x_v - eta_g Delta, Algorithm 1)
  Every deliverer then restarts at t from x_{v+1}: s_k = t, v_k = v + 1.
With equal n_k, Delta = (1/K) sum_k s(tau_k) Delta_k, exactly Algorithm 1's buffered update;
n_k (training rows) generalises it the way FedAvg weights sites. The staleness factor scales,
it is not renormalised away: a buffer of stale updates moves the model less. With K = S every
site delivers at every step, tau = 0, and a server step is a synchronous FedAvg round.

Only the plain-Python queue lives here (it is checkpointed as JSON in the run's meta); the
local work of the deliverers and the server step are the compiled round of
`jmtl.federated.algorithm.make_round`, run with mask = the buffer, `scale` = s(tau) and each
site's own start parameters (`ClientState.start_params`): a site's result depends only on its
start parameters and its data, so computing it at delivery time gives the same numbers as
computing it when it starts.

Stragglers (issue 14, requirement 9): for round r (synchronous) or for the jobs that start from
server version r - 1 (asynchronous: a job aims at step r), round(fraction x S) sites drawn
without replacement, seeded by (seed, r), compute `slowdown` times slower. A synchronous round
waits for them or, with `fed.deadline_s`, drops them; an asynchronous job delivers later.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


def staleness_scale(tau: Any) -> np.ndarray:
  """s(tau) = 1 / sqrt(1 + tau) (FedBuff, arXiv 2106.06639 section 5); tau >= 0 ints, float64."""
  tau = np.asarray(tau, np.float64)
  if np.any(tau < 0):
    raise ValueError(f"staleness must be >= 0, got {tau.tolist()}")
  return 1.0 / np.sqrt(1.0 + tau)


def straggler_mask(seed: int, round_index: int, n_sites: int, fraction: float) -> np.ndarray:
  """0/1 float32 mask [S] of the stragglers of round `round_index`: round(fraction x S) sites
  drawn without replacement, seeded by (seed, round); all zero when fraction is 0."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"straggler fraction must be in [0, 1], got {fraction}")
  mask = np.zeros(n_sites, np.float32)
  m = int(round(fraction * n_sites))
  if m == 0:
    return mask
  rng = np.random.default_rng([int(seed), int(round_index), 0x57A6])
  mask[rng.choice(n_sites, size=m, replace=False)] = 1
  return mask


def slowdown(seed: int, round_index: int, n_sites: int, fraction: float,
             factor: float) -> np.ndarray:
  """Compute-time multipliers [S] (float64) of round `round_index`: `factor` for its stragglers
  (`straggler_mask`), 1 for the others."""
  if factor < 1.0:
    raise ValueError(f"straggler slowdown must be >= 1, got {factor}")
  return np.where(straggler_mask(seed, round_index, n_sites, fraction) > 0, float(factor), 1.0)


@dataclasses.dataclass
class EventQueue:
  """The state of the simulation after server version `version` (plain Python, JSON-able).

  `clock`: simulated seconds of the last server step (0 before the first); `finish[k]`: when
  site k's running job delivers; `start_time[k]` / `start_version[k]`: when that job started
  and from which server version; `slow[k]`: its straggler factor (1 = none).
  """

  clock: float
  version: int
  finish: list[float]
  start_time: list[float]
  start_version: list[int]
  slow: list[float]

  @classmethod
  def start(cls, seconds: Any, slow: Any = None) -> "EventQueue":
    """Every site starts a job at time 0 from version 0; `seconds[k]` is that job's duration
    (with its straggler factor already in it), `slow[k]` the factor (recorded only)."""
    sec = [float(x) for x in np.asarray(seconds, np.float64)]
    _check_seconds(sec)
    n = len(sec)
    slow = [1.0] * n if slow is None else [float(x) for x in slow]
    return cls(0.0, 0, sec, [0.0] * n, [0] * n, slow)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "EventQueue":
    return cls(float(d["clock"]), int(d["version"]), [float(x) for x in d["finish"]],
               [float(x) for x in d["start_time"]], [int(x) for x in d["start_version"]],
               [float(x) for x in d["slow"]])

  def buffer(self, k: int) -> tuple[np.ndarray, float, np.ndarray]:
    """The next server step's buffer: (deliverers, sorted by delivery; t, the K-th delivery
    time; tau [K], the deliverers' staleness). Does not change the queue. ValueError unless
    1 <= k <= S."""
    n = len(self.finish)
    if not 1 <= k <= n:
      raise ValueError(f"buffer size must be in [1, {n}] (the sites), got {k}")
    order = sorted(range(n), key=lambda i: (self.finish[i], i))[:k]
    t = self.finish[order[-1]]
    tau = np.array([self.version - self.start_version[i] for i in order], np.int64)
    return np.array(order, np.int64), t, tau

  def restart(self, deliverers: Any, t: float, seconds: Any, slow: Any = None) -> "EventQueue":
    """The queue after the server step at time `t`: version + 1, clock t; each deliverer k
    starts a new job at t from the new version, lasting `seconds[k]` (indexed by site, [S]).
    Returns a new queue."""
    sec = np.asarray(seconds, np.float64)
    _check_seconds(sec)
    q = EventQueue.from_json(self.to_json())
    q.clock, q.version = float(t), self.version + 1
    for k in np.asarray(deliverers, np.int64).tolist():
      q.start_time[k] = float(t)
      q.start_version[k] = q.version
      q.finish[k] = float(t) + float(sec[k])
      q.slow[k] = 1.0 if slow is None else float(slow[k])
    return q


def _check_seconds(sec: Any) -> None:
  if any(not math.isfinite(x) or x < 0 for x in np.asarray(sec, np.float64).tolist()):
    raise ValueError(f"job seconds must be finite and >= 0, got {list(sec)}")


def fedbuff_inputs(examples: Any, deliverers: Any, tau: Any
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(mask [S], scale [S]) for `make_round`: mask 1 on the buffer, scale s(tau_k) there (1
  elsewhere; unused). With FedAvg weights n_k / sum_buffer n_j the aggregate is the module
  docstring's Delta."""
  n = len(np.asarray(examples))
  mask = np.zeros(n, np.float32)
  scale = np.ones(n, np.float32)
  idx = np.asarray(deliverers, np.int64)
  mask[idx] = 1
  scale[idx] = staleness_scale(tau).astype(np.float32)
  return mask, scale
