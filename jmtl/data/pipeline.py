"""grain input pipelines: per-task MapDataset streams, task mixtures, eval batches.

Per task: records -> seeded shuffle, reshuffled every epoch -> global batch k = stream
elements [k R, (k+1) R) -> the rows of it this process holds (`local_rows`, derived by the
trainer from the batch sharding; all rows with one process) -> featurize -> pad (to the
smallest `data.length_buckets` entry that fits the longest row, capped by the task's max
length; in a mixed batch every task pads to the largest of those buckets (`shared_length`);
with `fixed_length`, as on several processes, which cannot see each other's rows, to the
task's max length so that all processes agree on shapes). The global batches are the same
whatever the process count, so a run's data (and its checkpointed position) does not depend on
how many processes read it.
Batch k of a task is random access (`stream[k]`), so the iterator state is just the step and
the number of batches taken per task (JSON), and a restored iterator replays the same stream.

Mixtures (T5/SeqIO): rate_t proportional to n_t ("proportional"), to n_t^(1/T)
("temperature"), equal ("uniform") or `data.rates` ("explicit"), normalised to sum 1; plus
"annealed_temperature" (Stickland & Murray 2019: the exponent 1/T moves linearly over
training, so the rates are a function of the step) and "unimax" (Chung et al. 2023,
Algorithm 1: a uniform split of the example budget with a per-task epoch cap); see
`mixture_rates`, `annealed_exponent` and `unimax_allocation`.
`data.mixing="task_per_batch"`: step s draws one task with the rates of step s from an RNG
seeded by (seed, s). `"mixed"`: every step holds every task with rows from `rows_per_task`
(fixed rates only; annealed_temperature is refused there by a rule in `jmtl.defaults`).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jmtl.data import sources
from jmtl.data.features import Featurizer, bucket_length
from jmtl.tasks.base import Task, get_task

_STATE_VERSION = 1


STEP_DEPENDENT_MIXTURES = frozenset({"annealed_temperature"})


def annealed_exponent(t_start: float, t_end: float, step: int, total_steps: int) -> float:
  """The exponent alpha(s) = 1/T(s) of annealed temperature sampling at step `s`.

  Rule (Stickland & Murray 2019, "BERT and PALs: Projected Attention Layers for Efficient
  Adaptation in Multi-Task Learning", ICML, "annealed sampling"; their run_multi_task.py,
  `alpha = 1. - 0.8 * epoch / (num_train_epochs - 1)` with epoch from 0): task i is sampled
  with p_i proportional to N_i^alpha, alpha = 1 - 0.8 (e - 1) / (E - 1) at epoch e = 1..E, i.e.
  alpha moves *linearly* from 1 (proportional) to 0.2 (T = 5, near uniform). Here alpha moves
  linearly from 1/T0 to 1/T1 (T0 = `data.temperature_start`, T1 = `data.temperature_end`)
  over the steps s = 0 .. S-1 (S = `train.steps`) instead of over epochs, and stays at 1/T1
  after step S-1 (clamped):

    alpha(s) = 1/T0 + (1/T1 - 1/T0) * min(s, S-1) / (S-1)        (S = 1: alpha = 1/T1)

  With the defaults T0 = 1, T1 = 5 this is exactly the paper's schedule, per step. Note that
  it is 1/T, not T, that is linear (T(s) = 1/alpha(s) is not linear unless T0 = T1).
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  a0, a1 = 1.0 / float(t_start), 1.0 / float(t_end)
  if total_steps == 1:
    return a1
  frac = min(max(int(step), 0), total_steps - 1) / (total_steps - 1)
  return a0 + (a1 - a0) * frac


def unimax_allocation(sizes: Mapping[str, int], budget: float, max_epochs: float
                      ) -> dict[str, float]:
  """Examples allocated to each task by UniMax (Chung et al. 2023, "UniMax: Fairer and More
  Effective Language Sampling for Large-Scale Multilingual Pretraining", ICLR, Algorithm 1).

  Rule: visit the tasks in increasing order of size n_t (ties: the order of `sizes`, a stable
  sort); with B the budget still unassigned and k the tasks not yet visited, the task gets
  U_t = min(B / k, N * n_t) (a uniform share of what is left, capped at N epochs of the
  task, N = `max_epochs`), and B <- B - U_t. What a capped task leaves over is thereby spread
  uniformly over the larger tasks. The paper's sampling distribution is normalize(U)
  (`mixture_rates`); it equals U / budget unless every task is capped (budget > N * sum n_t).

  Implemented from the description of Algorithm 1 (the paper's text was not at hand) and
  checked against the worked example of the `unimax_sampling` package (kgnlp/unimax).
  """
  if budget <= 0 or max_epochs <= 0:
    raise ValueError(f"UniMax needs budget > 0 and max_epochs > 0, got {budget}, {max_epochs}")
  order = sorted(sizes, key=lambda t: sizes[t])  # stable: ties keep the order of `sizes`
  left, alloc = float(budget), {}
  for i, t in enumerate(order):
    share = left / (len(order) - i)
    alloc[t] = min(share, float(max_epochs) * float(sizes[t]))
    left -= alloc[t]
  return {t: alloc[t] for t in sizes}


def mixture_rates(data_cfg: Any, sizes: Mapping[str, int], *, step: int = 0,
                  total_steps: int | None = None) -> dict[str, float]:
  """Normalised mixing rate per task from `data.mixture` and the train sizes n_t.

  `step` (the training step s) matters for "annealed_temperature" only; `total_steps` (S =
  `train.steps`) is required by "annealed_temperature" (the schedule's length) and "unimax"
  (budget = S * `data.batch_size` examples) and ignored by the others.
  """
  names = list(sizes)
  mixture = data_cfg.mixture
  if mixture in ("annealed_temperature", "unimax") and total_steps is None:
    raise ValueError(f"data.mixture = {mixture!r} needs total_steps (train.steps)")
  if mixture == "proportional":
    raw = [float(sizes[t]) for t in names]
  elif mixture == "temperature":
    raw = [float(sizes[t]) ** (1.0 / float(data_cfg.temperature)) for t in names]
  elif mixture == "annealed_temperature":
    alpha = annealed_exponent(data_cfg.temperature_start, data_cfg.temperature_end, step,
                              int(total_steps))
    raw = [float(sizes[t]) ** alpha for t in names]
  elif mixture == "unimax":
    alloc = unimax_allocation(sizes, float(total_steps) * float(data_cfg.batch_size),
                              float(data_cfg.unimax_epochs))
    raw = [alloc[t] for t in names]
  elif mixture == "uniform":
    raw = [1.0] * len(names)
  elif mixture == "explicit":
    rates = data_cfg.rates
    missing = [t for t in names if t not in rates]
    if missing:
      raise KeyError(f"data.rates has no rate for tasks {missing} (data.mixture='explicit')")
    raw = [float(rates[t]) for t in names]
  else:
    raise ValueError(f"data.mixture must be proportional, temperature, annealed_temperature, "
                     f"unimax, uniform or explicit, got {mixture!r}")
  if any(r < 0 for r in raw) or sum(raw) <= 0:
    raise ValueError(f"mixture rates must be >= 0 with a positive sum, got {dict(zip(names, raw))}")
  total = sum(raw)
  return {t: r / total for t, r in zip(names, raw)}


def rows_per_task(rates: Mapping[str, float], batch_size: int) -> dict[str, int]:
  """Rows per task summing to `batch_size`, each >= 1: floor(rate * B), the leftover rows to the
  largest remainders (ties: task order), then every task at 0 takes one row from the task
  with the most rows (ties: task order)."""
  names = list(rates)
  if batch_size < len(names):
    raise ValueError(f"batch of {batch_size} rows cannot hold {len(names)} tasks")
  ideal = [rates[t] * batch_size for t in names]
  rows = [int(np.floor(x)) for x in ideal]
  order = sorted(range(len(names)), key=lambda i: (-(ideal[i] - rows[i]), i))
  for i in order[:batch_size - sum(rows)]:
    rows[i] += 1
  for i in range(len(names)):
    if rows[i] == 0:
      donor = max(range(len(names)), key=lambda j: (rows[j], -j))
      rows[donor] -= 1
      rows[i] = 1
  return dict(zip(names, rows))


def batch_rows(config: Any, sizes: Mapping[str, int]) -> dict[str, int]:
  """Global rows per task in one batch: `data.batch_size` for every task under task_per_batch
  mixing (one task per step); `rows_per_task` of the step-0 rates under "mixed"."""
  data = config.data
  if data.mixing != "mixed":
    return {t: int(data.batch_size) for t in sizes}
  rates = mixture_rates(data, sizes, step=0, total_steps=int(config.train.steps))
  return rows_per_task(rates, int(data.batch_size))


class EpochShuffle(grain.MapDataset):
  """Infinite stream over a finite parent: element i is parent[perm_e[i mod n]] with
  e = i // n and perm_e = numpy permutation seeded by (seed, e), so every epoch is a fresh
  permutation. (Permutations are cached per epoch; grain's per-index shuffle costs ~2 ms an
  element here.)"""

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed, self._n, self._cache = int(seed), len(parent), {}
    if self._n == 0:
      raise ValueError("cannot shuffle an empty dataset")

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      if len(self._cache) >= 4:
        self._cache.pop(min(self._cache))
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      self._cache[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, pos = divmod(int(index), self._n)
    return self._parents[0][int(self._perm(epoch)[pos])]


def _task_seed(seed: int, name: str) -> int:
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


class _TaskStream:
  """One task's infinite, epoch-reshuffled stream of padded batches: batch k holds the rows
  `local` (indices into the global batch of `rows` rows) of global batch k."""

  def __init__(self, task: Task, records: list[dict], featurizer: Featurizer, rows: int,
               seed: int, local: Sequence[int] | None = None, fixed_length: bool = False):
    self.task, self.rows, self.featurizer = task, rows, featurizer
    self.local = list(range(rows)) if local is None else [int(r) for r in local]
    if not records:
      raise ValueError(f"task {task.name!r}: no training records")
    if task.kind == "span_qa":
      # Windows per question are only known after tokenizing, so features are built up front.
      items = [f for i, r in enumerate(records) for f in featurizer(r, i)]
      for j, f in enumerate(items):
        f["index"] = j
      ds = grain.MapDataset.source(items)
      featurize = lambda f: f  # noqa: E731
    else:
      ds = grain.MapDataset.range(len(records))
      featurize = lambda i: featurizer(records[i], i)[0]  # noqa: E731
    self.size = len(ds)
    self.items = EpochShuffle(ds, _task_seed(seed, task.name)).map(featurize)
    self.fixed_length = featurizer.max_len if fixed_length else None

  def features(self, k: int) -> list[dict]:
    """This process's rows of global batch k, featurized."""
    start = int(k) * self.rows
    return [self.items[start + r] for r in self.local]

  def bucket(self, feats: Sequence[dict]) -> int:
    """The smallest `data.length_buckets` entry that fits the longest row of `feats` (not yet
    capped by the task's max length, so that it is always one of the buckets)."""
    buckets = self.featurizer.buckets
    return bucket_length(max((len(f["input_ids"]) for f in feats), default=1), buckets,
                         max(buckets))

  def collate(self, feats: Sequence[dict], shared: int | None = None) -> dict[str, np.ndarray]:
    """Pads `feats` to `shared` capped at the task's max length (one length for every task of
    a batch), else to the task's own bucket; with `fixed_length` to the task's max length."""
    length = self.fixed_length or (min(shared, self.featurizer.max_len) if shared else None)
    return self.featurizer.collate(feats, length=length)

  def __getitem__(self, k: int) -> dict[str, np.ndarray]:
    return self.collate(self.features(k))


def shared_length(buckets: Iterable[int]) -> int:
  """The one padded length of a mixed batch: the largest of the tasks' own buckets.

  Why this rule (and not a per-batch token budget): every task's length is then a function of
  one value from `data.length_buckets` (capped by the task's max length, so a one-task batch
  gets exactly the length it had on its own), so a run compiles
  at most len(data.length_buckets) step variants, whatever the number of tasks, with fixed
  rows per task (a token budget would vary rows and lengths, i.e. shapes, together). The cost
  is padding: a batch's short-text tasks pad to its long-text task's bucket.
  """
  return max(buckets)


class TrainIterator:
  """Yields `{task: task_batch}` forever; `get_state()`/`set_state()` (JSON) restore the exact
  stream."""

  def __init__(self, config: Any, tasks: Sequence[Task | str], tokenizer: Any, *,
               local_rows: Callable[[int], Sequence[int]] | None = None,
               fixed_length: bool = False,
               records: Mapping[str, list[dict]] | None = None):
    data = config.data
    self.tasks = [get_task(t) for t in tasks]
    self.seed = int(config.seed)
    self.mixing = data.mixing
    if self.mixing not in ("task_per_batch", "mixed"):
      raise ValueError(f"data.mixing must be 'task_per_batch' or 'mixed', got {self.mixing!r}")
    recs = {t.name: (records[t.name] if records is not None else
                     sources.load_records(t, "train", data)) for t in self.tasks}
    self._data_cfg = data
    self._sizes = {t.name: len(recs[t.name]) for t in self.tasks}
    self._total_steps = int(config.train.steps)
    if self.mixing == "mixed" and data.mixture in STEP_DEPENDENT_MIXTURES:
      raise ValueError(f"data.mixture = {data.mixture!r} needs data.mixing = 'task_per_batch'")
    self.rates = self.rates_at(0)  # the rates of every step unless the mixture is annealed
    rows = batch_rows(config, self._sizes)
    self.rows = rows  # global rows per task and batch
    # The rows of each task's global batch this process reads (all of them by default).
    self.local = {t: np.asarray(list(range(n)) if local_rows is None else local_rows(n),
                                np.int64) for t, n in rows.items()}
    for t, held in self.local.items():
      if held.size == 0 or held.min() < 0 or held.max() >= rows[t]:
        raise ValueError(f"local_rows for task {t!r} ({rows[t]} rows) gave {held.tolist()}")
    self.streams = {
        t.name: _TaskStream(t, recs[t.name], Featurizer(t, tokenizer, data), rows[t.name],
                            self.seed, self.local[t.name], fixed_length)
        for t in self.tasks}
    self._names = [t.name for t in self.tasks]
    self._p = np.array([self.rates[n] for n in self._names])
    self.step = 0
    self.taken = dict.fromkeys(self._names, 0)

  def rates_at(self, step: int) -> dict[str, float]:
    """The mixing rates of step `step`: a pure function of the step (and the config and train
    sizes), so a restored iterator draws exactly what an uninterrupted one would."""
    return mixture_rates(self._data_cfg, self._sizes, step=step, total_steps=self._total_steps)

  def task_for_step(self, step: int) -> str:
    """The task of step `step` under task_per_batch mixing (same on every process), drawn with
    the rates of that step."""
    if self._data_cfg.mixture in STEP_DEPENDENT_MIXTURES:
      rates = self.rates_at(step)
      p = np.array([rates[n] for n in self._names])
    else:
      p = self._p
    rng = np.random.default_rng([self.seed, step, 0x6A6D746C])
    return self._names[int(rng.choice(len(self._names), p=p))]

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    names = self._names if self.mixing == "mixed" else [self.task_for_step(self.step)]
    feats = {name: self.streams[name].features(self.taken[name]) for name in names}
    # One length bucket per batch: the longest task's bucket pads every task (capped at each
    # task's max length), so a mixed run compiles at most one step per bucket, not up to
    # buckets^tasks (see `shared_length`).
    shared = shared_length(self.streams[n].bucket(f) for n, f in feats.items())
    out = {}
    for name in names:
      out[name] = self.streams[name].collate(feats[name], shared)
      self.taken[name] += 1
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {"version": _STATE_VERSION, "step": self.step, "taken": dict(self.taken)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} != "
                       f"{_STATE_VERSION}")
    taken = dict(state["taken"])
    if sorted(taken) != sorted(self._names):
      raise ValueError(f"data iterator state is for tasks {sorted(taken)}, this run has "
                       f"{sorted(self._names)}")
    self.step = int(state["step"])
    self.taken = {n: int(taken[n]) for n in self._names}


def train_iterator(config: Any, tasks: Sequence[Task | str], tokenizer: Any, *,
                   local_rows: Callable[[int], Sequence[int]] | None = None,
                   fixed_length: bool = False,
                   records: Mapping[str, list[dict]] | None = None) -> TrainIterator:
  """The training stream (see the module docstring). `local_rows(R)` gives the indices of the
  rows of an R-row global batch this process reads (default: all); `fixed_length` pads every
  batch to the task's max length; `records` overrides loading the train splits."""
  return TrainIterator(config, tasks, tokenizer, local_rows=local_rows,
                       fixed_length=fixed_length, records=records)


def eval_batches(task: Task | str, records: Sequence[dict], tokenizer: Any, config: Any
                 ) -> tuple[list[dict[str, np.ndarray]], list[dict]]:
  """All of `records` as batches of `eval.batch_size` rows (the last padded with rows of
  example_weight 0 and index -1) and `features_meta` (docs/architecture.md). span_qa batches
  all have the task's max length; other kinds are bucketed."""
  task = get_task(task)
  featurizer = Featurizer(task, tokenizer, config.data)
  rows = int(config.eval.batch_size)
  feats = [f for i, r in enumerate(records) for f in featurizer(r, i)]
  meta: list[dict] = []
  if task.kind == "span_qa":
    L = featurizer.max_len
    for j, f in enumerate(feats):
      f["index"] = j
      meta.append({"example_id": f["id"], "offsets": f["offsets"] + [None] * (L - len(f["offsets"]))})
  else:
    meta = [{"example_id": f["id"]} for f in feats]
  batches = []
  for s in range(0, len(feats), rows):
    chunk = feats[s:s + rows]
    length = featurizer.max_len if task.kind == "span_qa" else None
    batches.append(featurizer.collate(chunk, rows=rows, length=length))
  return batches, meta
