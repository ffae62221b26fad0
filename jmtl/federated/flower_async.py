"""Asynchronous FedBuff on Flower's deployment engine (fed.mode = "async", fed.backend = "flower").

FedBuff (Nguyen et al. 2022, arXiv 2106.06639, Algorithm 1) with every connected site training
concurrently and a buffer of K = `Problem.buffer_size` (fed.buffer_size) replies, the rule of
the mesh simulation (`jmtl.federated.asynchronous`), in real time:

  server version v = checkpoint's (0 for a new run). Every SuperNode that has no job gets one:
  a message (`grid.push_messages`) with the parameters x_v, config "round" v and "jobs" (per
  site, the index j_k of its next job). Site k trains exactly as in a synchronous round
  (`flower.site_train`: the same jitted `make_site_update`), with its round index = j_k: its
  batches are `Problem.batches(k, j_k)` and its key `site_key(key(seed), j_k, k)`, so its
  j-th used update reads the j-th block of H batches of its stream, as the simulation's site
  does; it replies Delta_k = x_{v_k} - y_k, n_k.
  The server polls the replies (`grid.pull_messages`, every POLL_S seconds) and keeps them in
  arrival order. As soon as K replies are buffered, one server step with the first K:
      tau_k = v - v_k                   (server versions since the site's model)
      s(tau) = 1 / sqrt(1 + tau)        (`asynchronous.staleness_scale`, via `fedbuff_inputs`)
      Delta = sum_k n_k s(tau_k) Delta_k / sum_k n_k   (`flower.aggregate`, rule fedavg, of the
                                         float32 deltas s(tau_k) Delta_k: the simulation's
                                         `make_round` with scale = s(tau))
      x_{v+1} = x_v + server_tx(Delta)  (`_Server.apply`: the Problem's server optimizer)
  and v <- v + 1. The K sites whose replies were used get a new job from x_{v+1} (j_k + 1);
  the others keep training on their older version. With K = S every site is in every buffer,
  tau = 0 and j_k = v: a server step is a synchronous FedAvg round (`flower.serve`).

What differs from the simulation: the time is real (wall seconds, no simulated clock, no
stragglers drawn: a slow site is slow), and the arrival order is the network's, so which
replies share a buffer is not reproducible from the config alone; a site's local-step key is
fold_in(fold_in(key(seed), j_k), k) (the simulation's uses the server version at delivery,
unknown when the job starts: the two differ only for a loss that uses its key, e.g. dropout);
with a codec the site compresses Delta_k and the server scales the decoded update by s(tau_k)
(the simulation compresses s(tau_k) Delta_k: the same for top-k's choice of coordinates,
error-feedback residuals then differ by that factor).

Reply tokens: a reply that a server step used is applied; its site's client state and
error-feedback residual are committed by that site's next message ("applied", as in sync:
`flower.set_pending`, `commit_pending`). A job that is dropped (below) is never applied: its
pending state is discarded when the site gets its next job.

Lost sites: a job with no reply `round-timeout` seconds after it was sent is dropped (a line on
stderr; `timed_out` in the next step's row); the node gets a new job (same j_k, the current
version) at once while it is still connected (`grid.get_node_ids()`), else when it connects
again. A node whose ClientApp raised, or whose reply is refused (a non-finite loss or update,
or a second reply for a site already in the buffer), gets its next job `round-timeout` seconds
later (`errors` in the next row). A reply to a dropped job is not read. The run stops (one line
`jmtl: error: ...` on stderr, `flower.EmptyRoundsError`; its checkpoint kept) after
`max-empty-rounds` x `round-timeout` seconds without a usable reply (0 = never).

rounds.jsonl, one row per server step (`round` = the new server version v + 1): `sites` (the
buffer, in arrival order), `staleness` {site: tau_k}, `versions` {site: v_k}, `applied` 1,
`loss` (example-weighted L_k), `site_loss`, `weights` {site: n_k s(tau_k) / sum n}, `bytes_up`
{site: payload bytes, total} (the used replies), `bytes_down` {site: the bytes of its job's
parameters, total: every message sent since the previous step}, `seconds` (wall seconds since
the previous step, or since the server started), `site_seconds` (each used site's measured
local work), `timed_out`, `errors` and, on the first row after a resume, `resumed_from` (the
checkpoint's version).
Checkpoints (`_Server.end_round`): every `checkpoint_every` server steps, at evaluation steps
and the last; their meta holds "async" {"jobs": [j_k]}. Resume: the server parameters,
optimizer state and the j_k of the checkpoint; the jobs in flight and the buffered replies
when the server stopped are lost (said on stderr and in the row's `resumed_from`): every site
gets a new job from the checkpointed version (the same j_k, so the same data).

Not supported (refused in one line, `check_problem`; a jmtl config is refused earlier by the
config rules of fed.backend and fed.mode; `flower.serve_secagg` refuses an asynchronous Problem
with this check too): SecAgg+ (`secure-aggregation`), DP-FedAvg, an aggregator other than fedavg
(robust rules, dynamic, gradient) and participation < 1.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import jax
import numpy as np

from jmtl.federated import asynchronous
from jmtl.federated import flower

POLL_S = flower.PULL_INTERVAL_S  # seconds between polls when nothing arrived


@dataclasses.dataclass
class _Job:
  """A message in flight: the node it went to, the server version of its parameters, when it
  was sent (time.time()) and its parameter bytes."""

  node: int
  version: int
  sent: float
  down: int


def check_problem(problem: flower.Problem, run_config: dict) -> None:
  """Refuses (ValueError, one line naming what to change) what asynchronous FedBuff on Flower
  does not run: buffer_size outside [1, S], SecAgg+ (run config `secure-aggregation`), DP
  (`Problem.dp`), an aggregator other than fedavg, participation < 1, per-site held-out
  evaluation (`Problem.site_evaluate`, fed.holdout > 0: its evaluate messages run between sync
  rounds, `flower.evaluate_sites`; here every site always has a job in flight)."""
  S, K = len(problem.sites), int(problem.buffer_size)
  why = None
  if not 1 <= K <= S:
    why = f"buffer_size (fed.buffer_size) must be in [1, {S}] (the sites), got {K}"
  elif flower.secure_aggregation(run_config):
    why = "run config secure-aggregation (fed.secure_aggregation) must be off"
  elif problem.dp is not None:
    why = "DP-FedAvg (fed.dp.clip_norm > 0) is not supported"
  elif problem.aggregator != "fedavg":
    why = (f"aggregator (fed.aggregator) must be 'fedavg' (FedBuff's weights), got "
           f"{problem.aggregator!r}")
  elif problem.participation < 1.0:
    why = (f"participation (fed.participation) must be 1 (every site trains concurrently), "
           f"got {problem.participation:g}")
  elif problem.site_evaluate is not None:
    why = ("per-site held-out evaluation (fed.holdout > 0) runs in synchronous rounds only; "
           "set fed.holdout = 0")
  if why:
    raise ValueError(f"asynchronous FedBuff on Flower (fed.mode = 'async'): {why}")


def step(server: flower._Server, problem: flower.Problem, buffer: list[dict], v: int) -> dict:  # noqa: SLF001
  """Server step v -> v + 1 with the buffered replies `buffer` (each {"k", "delta" (float32
  tree), "n", "version", ...}, distinct sites): the module docstring's rule through
  `asynchronous.fedbuff_inputs` (tau, s(tau)), `flower.aggregate` (rule fedavg) and
  `_Server.apply`. Returns the row's fields of the step (sites, staleness, versions, weights,
  losses, bytes_up, site_seconds)."""
  S = len(problem.sites)
  ks = [b["k"] for b in buffer]
  tau = np.array([v - b["version"] for b in buffer], np.int64)
  examples = np.zeros(S, np.float32)
  for b in buffer:
    examples[b["k"]] = b["n"]
  _, scale = asynchronous.fedbuff_inputs(examples, ks, tau)
  deltas: list[Any] = [None] * S
  for b in buffer:  # the simulation's d * scale_k (float32)
    deltas[b["k"]] = jax.tree.map(lambda d, s=scale[b["k"]]: np.asarray(d, np.float32) * s,
                                  b["delta"])
  delta, w = flower.aggregate(deltas, examples, server.params, problem.groups, problem.holds,
                              rule="fedavg")
  server.apply(delta)
  names = problem.sites
  fw = float(sum(b["n"] for b in buffer))
  return {"sites": [names[k] for k in ks],
          "staleness": {names[b["k"]]: int(t) for b, t in zip(buffer, tau)},
          "versions": {names[b["k"]]: int(b["version"]) for b in buffer},
          "applied": 1,
          "loss": flower._finite(sum(b["n"] * b["loss"] for b in buffer) / fw),  # noqa: SLF001
          "site_loss": {names[b["k"]]: flower._finite(b["loss"]) for b in buffer},  # noqa: SLF001
          "weights": {names[k]: float(w[k] * scale[k]) for k in ks},
          "bytes_up": {**{names[b["k"]]: b["up"] for b in buffer},
                       "total": sum(b["up"] for b in buffer)},
          "bytes_down_sites": {names[b["k"]]: b["down"] for b in buffer},
          "site_seconds": {names[b["k"]]: b["seconds"] for b in buffer}}


def serve_async(grid: Any, run_config: dict, problem: flower.Problem | None = None) -> Any:
  """The server of an asynchronous run (`flower.serve` when `Problem.mode` is "async"): the
  module docstring's loop until `rounds` server steps; returns the final server parameters.
  ValueError (one line) from `check_problem` or `_Server` (another run's checkpoint);
  flower.EmptyRoundsError when no usable reply came for max-empty-rounds x round-timeout s."""
  from flwr.app import ConfigRecord, Message, RecordDict  # noqa: PLC0415
  problem = flower.load_problem(run_config) if problem is None else problem
  check_problem(problem, run_config)
  timeout = float(run_config.get("round-timeout", 60.0))
  most = int(run_config.get("max-empty-rounds", flower.MAX_EMPTY_ROUNDS))
  S, K = len(problem.sites), int(problem.buffer_size)
  server = flower._Server(problem, run_config)  # noqa: SLF001
  try:
    v = server.start
    jobs = [0] * S  # per site, the index of its next job (= its used updates so far)
    resumed = None
    if v > 0:
      meta = server.ckpt.restore_meta(v)
      jobs = [int(j) for j in (meta.get("async") or {}).get("jobs", jobs)]
      resumed = v
      print(f"asynchronous run resumed at server version {v}: the jobs in flight and the "
            f"buffered replies when the server stopped are lost; every site gets a new job "
            f"from version {v}", file=sys.stderr, flush=True)
    deadline = time.time() + float(run_config.get("wait-sites", 120.0))
    while len(list(grid.get_node_ids())) < S and time.time() < deadline:
      time.sleep(POLL_S)
    inflight: dict[str, _Job] = {}  # message id -> job
    node_job: dict[int, str] = {}  # node -> its message id in flight
    benched: dict[int, float] = {}  # node -> when it may get a job again
    buffer: list[dict] = []  # accepted replies, in arrival order
    errors: dict[str, str] = {}
    timed_out: set = set()
    record, down = None, 0
    down_total, t_step, heard = 0, time.time(), time.time()
    while v < server.rounds:
      now = time.time()
      if record is None:  # the parameters of version v
        record = flower.to_record(server.params)
        down = flower.payload_bytes(record)
      waiting = {b["node"] for b in buffer}
      idle = [n for n in grid.get_node_ids()
              if n not in node_job and n not in waiting and benched.get(n, 0.0) <= now]
      if idle:
        cfg = ConfigRecord({
            "round": v, "jobs": " ".join(map(str, jobs)),
            "applied": " ".join(server.applied_replies[k]
                                for k in sorted(server.applied_replies))})
        msgs = [Message(content=RecordDict({"params": record, "config": cfg}),
                        message_type="train", dst_node_id=n) for n in idle]
        ids = list(grid.push_messages(msgs))
        sent = time.time()  # round-timeout counts from here (a push may take a while)
        for mid, n in zip(ids, idle):
          inflight[mid], node_job[n] = _Job(n, v, sent, down), mid
          benched.pop(n, None)
        down_total += down * len(idle)
      got = list(grid.pull_messages(list(inflight))) if inflight else []
      for rep in got:
        job = inflight.pop(rep.metadata.reply_to_message_id, None)
        if job is None:
          continue  # a dropped job's late reply
        del node_job[job.node]
        accepted = _accept(server, problem, rep, job, buffer, errors, v)
        if accepted is None:
          benched[job.node] = time.time() + timeout
        else:
          buffer.append(accepted)
          heard = time.time()
      now = time.time()
      for mid, job in list(inflight.items()):  # lost: dropped, the node gets a new job
        if now - job.sent >= timeout:
          del inflight[mid], node_job[job.node]
          name = server.node_sites.get(str(job.node), f"node {job.node}")
          timed_out.add(name)
          print(f"server version {v}: no reply within round-timeout {timeout:g} s from "
                f"{name} (its job from version {job.version} is dropped)", file=sys.stderr,
                flush=True)
      while len(buffer) >= K and v < server.rounds:
        used, buffer = buffer[:K], buffer[K:]
        fields = step(server, problem, used, v)
        for b in used:
          jobs[b["k"]] += 1
          if b["token"] is not None:
            server.applied_replies[b["k"]] = b["token"]
        v += 1
        by_site = fields.pop("bytes_down_sites")
        row = {"round": v, **fields,
               "bytes_down": {**by_site, "total": int(down_total)},
               "seconds": time.time() - t_step,
               **({"timed_out": sorted(timed_out)} if timed_out else {}),
               **({"errors": dict(errors)} if errors else {}),
               **({"resumed_from": resumed} if resumed is not None else {})}
        server.meta_extra = {"async": {"jobs": list(jobs)}}
        server.end_round(v, row)
        record, down_total, t_step, resumed = None, 0, time.time(), None
        errors, timed_out = {}, set()
      if most and time.time() - heard >= most * timeout and v < server.rounds:
        _stop(server, v, most, timeout, len(buffer), K)
      if not got:
        time.sleep(POLL_S)
  finally:
    server.close()
  return server.params


def _accept(server, problem, rep, job: _Job, buffer: list, errors: dict, v: int) -> dict | None:
  """A reply to `job`: the buffer entry, or None when it is refused (an error reply, a
  malformed one (`flower.train_reply`), a non-finite loss or update, a site already in the
  buffer; a line on stderr and in `errors` under the node)."""
  node = str(job.node)
  if rep.has_error():
    reason = str(getattr(rep.error, "reason", "") or rep.error).strip()
    errors[node] = (reason.splitlines() or [""])[0]
    print(f"server version {v}: node {node} replied with an error: {errors[node]}",
          file=sys.stderr, flush=True)
    return None
  try:  # a malformed reply (`flower.train_reply`: missing entries, n_k not finite > 0)
    k, nums = flower.train_reply(rep.content, problem)
    if "skipped" in nums:
      raise ValueError(f"site {problem.sites[k]!r}: a 'skipped' reply to an asynchronous job")
    delta = (flower.decode_update(problem, k, rep.content["delta"], server.params)
             if flower.codec_of(problem) is not None
             else flower.from_record(rep.content["delta"], server.params))
  except (KeyError, TypeError, ValueError) as e:
    errors[node] = f"node {node}: {e}: its reply is refused"
    print(f"server version {v}: {errors[node]}", file=sys.stderr, flush=True)
    return None
  name = problem.sites[k]
  if any(b["k"] == k for b in buffer):
    errors[node] = (f"node {node} claims site {name!r}, whose reply is already in the buffer: "
                    f"its reply is refused (give each SuperNode its own node config site)")
    print(f"server version {v}: {errors[node]}", file=sys.stderr, flush=True)
    return None
  loss = nums["site_loss"]
  if not (np.isfinite(loss) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(delta))):
    errors[node] = (f"site {name!r} (node {node}) reported a non-finite "
                    + ("loss" if not np.isfinite(loss) else "update") + ": its reply is refused")
    print(f"server version {v}: {errors[node]}", file=sys.stderr, flush=True)
    return None
  for other in [n for n, s in server.node_sites.items() if s == name]:
    del server.node_sites[other]  # one owner per site
  server.node_sites[node] = name
  info = rep.content["info"] if "info" in rep.content else {}
  return {"k": k, "node": job.node, "delta": delta, "n": nums["examples"],
          "version": job.version, "loss": loss, "seconds": nums["seconds"],
          "up": flower.payload_bytes(rep.content["delta"]), "down": job.down,
          "token": str(info["reply"]) if "reply" in info else None}


def _stop(server, v: int, most: int, timeout: float, buffered: int, k: int) -> None:
  """No usable reply for `most` x `timeout` seconds: one line `jmtl: error: ...` on stderr
  (the replies buffered of K, the version, the limit, the checkpoint a resubmitted run resumes
  from) and flower.EmptyRoundsError (`flower.serve`'s max-empty-rounds, in round-timeouts)."""
  c = server.ckpt.latest_step()
  msg = (f"no usable reply for {most} x round-timeout {timeout:g} s (max-empty-rounds {most}; "
         f"{buffered} of fed.buffer_size {k} replies buffered): "
         f"stopping the asynchronous run at server version {v} of {server.rounds}; submit the "
         f"run again once the sites are back: it resumes from its last "
         + (f"checkpoint, version {c}" if c is not None else
            "checkpoint only if one exists, and none was saved yet (fed.checkpoint_every): it "
            "starts at version 0"))
  print(f"jmtl: error: {msg}", file=sys.stderr, flush=True)
  raise flower.EmptyRoundsError(msg)
