"""Break-it review of the Flower backend's newest parts (issue 17): each test fails on the code
before its fix. In process: the stand-in Grid of test_flower_parts (node k + 1 runs the
ClientApp's `flower.site_train`), Flower's own SecAgg+ workflow classes where a stage matters."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401

from jmtl.federated import flower  # noqa: E402


def _rows(wd):
  return [json.loads(x) for x in (Path(wd) / "rounds.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- two claimants of one site

class _SwappingGrid(_Grid):
  """The stand-in Grid whose replies of the rounds (0-based) in `swap` arrive in reverse node
  order: on a real SuperLink which of two claimants answers first varies from round to round."""

  def __init__(self, run_config, swap, gone=(), **kw):
    super().__init__(run_config, **kw)
    self.swap, self.gone, self.round = set(swap), set(gone), None

  def push_messages(self, msgs):
    self.round = int(msgs[0].content["config"]["round"]) if msgs else None
    ids = super().push_messages(msgs)
    for mid, msg in zip(ids, msgs):  # (node, round) in `gone`: no reply ever comes
      if (msg.metadata.dst_node_id, self.round) in self.gone:
        self.out.pop(mid, None)
    return ids

  def pull_messages(self, ids):
    got = super().pull_messages(ids)
    return got[::-1] if self.round in self.swap else got


def test_a_site_claimed_twice_keeps_its_owner_whatever_order_the_replies_come_in(tmp_path):
  """DiLoCo (each site's AdamW moments live in its SuperNode's Context.state), nodes 1 and 3
  both claim site a, and in round 2 node 3's reply comes first. The site's owner (node 1, whose
  reply round 1 applied) must still count: the run equals the 2-site run without a claimant,
  bit for bit. (Counting the first arrival switched site a to node 3, whose moments were at
  their init: a different update.) When the owner does not answer (round 3: node 1 gone), the
  claimant takes the site over, and stays its owner after."""
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  rc, ref_rc = (_run_config(w, 3, algo="diloco") for w in (wd, ref_wd))
  flower.serve(_SwappingGrid(rc, swap={1}, nodes=["a", "b", "a"]), rc)
  flower.serve(_Grid(ref_rc), ref_rc)
  rows = _rows(wd)
  assert [r["sites"] for r in rows] == [["a", "b"]] * 3
  assert "node 3 claims site 'a', which node 1 already replied for" in rows[1]["errors"]["3"]
  assert rows[1]["site_loss"] == _rows(ref_wd)[1]["site_loss"]
  _, got, _, _ = _final(wd, rc)
  _, want, _, _ = _final(ref_wd, ref_rc)
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], want[k])

  # Node 1 gone from round 3 (index 2): node 3 takes site a over; in round 4 node 1 is back and
  # answers first, but node 3 is the owner now and its reply counts.
  wd2 = tmp_path / "takeover"
  rc2 = _run_config(wd2, 4, algo="diloco")
  flower.serve(_SwappingGrid(rc2, swap=set(), gone={(1, 2)}, nodes=["a", "b", "a"]), rc2)
  rows = _rows(wd2)
  assert [r["sites"] for r in rows] == [["a", "b"]] * 4
  assert "errors" not in rows[2]  # node 3 alone answered for a
  assert "node 1 claims site 'a', which node 3 already replied for" in rows[3]["errors"]["1"]


# ---------------------------------------------------------------- SecAgg+ rounds that halt

class _SilentGrid:
  """A Grid whose `nodes` SuperNodes are connected but never answer (hung, or gone before the
  SuperLink noticed): what Flower's SecAgg+ workflow sees when too few sites take part."""

  def __init__(self, nodes):
    self.nodes, self.pushed = list(nodes), 0
    self.run = type("Run", (), {"run_id": 1})()

  def get_node_ids(self):
    return list(self.nodes)

  def push_messages(self, msgs):
    msgs = list(msgs)
    self.pushed += len(msgs)
    return [f"m{self.pushed}_{i}" for i in range(len(msgs))]

  def pull_messages(self, ids):
    return []


def _in_thread(fn, within_s):
  """What `fn()` raised (None when it returned), failing the test when it has not ended within
  `within_s` seconds (the thread is a daemon: a hung server does not hang the test run)."""
  import threading
  out = []

  def run():
    try:
      fn()
      out.append(None)
    except BaseException as e:  # noqa: BLE001 - handed to the test
      out.append(e)
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(within_s)
  assert out, f"still running after {within_s:g} s (hung)"
  return out[0]


def _secagg_context(run_config):
  from flwr.app import Context, RecordDict
  return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                 run_config=dict(run_config))


@pytest.mark.parametrize("nodes", [(), (1, 2, 3)], ids=["no-supernode", "silent-supernodes"])
def test_a_secagg_round_too_few_sites_answer_is_written_and_counts_as_empty(tmp_path, capfd,
                                                                             nodes):
  """SecAgg+ on the server (`serve_secagg`, Flower's own workflow) with every SuperNode gone
  (none connected) or connected but silent. Before: `configure_fit`'s `sample(S, S)` waited up
  to a day for S sites and the workflow's stages waited forever for replies (no timeout), and a
  round the workflow halted wrote no line and no checkpoint (Flower only logs it). Now each such
  round takes round-timeout, is written with applied 0 and the stage that halted, and after
  max-empty-rounds of them the run stops with the plain server's one line."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 4, sites="a,b,c", **{"secure-aggregation": True, "round-timeout": 0.3,
                                           "max-empty-rounds": 2})
  raised = _in_thread(lambda: flower.serve_secagg(_SilentGrid(nodes), _secagg_context(rc)),
                      within_s=60.0)
  assert isinstance(raised, flower.EmptyRoundsError), raised
  assert str(raised).startswith("2 consecutive rounds (1-2) had no applied reply")
  rows = _rows(wd)
  assert [(r["round"], r["applied"], r["sites"]) for r in rows] == [(1, 0, []), (2, 0, [])]
  stage = "setup"  # nobody answered its first stage
  for r in rows:
    assert r["error"].startswith(f"secure aggregation halted at its {stage} stage: 0 of 3 "
                                 f"sites active, SecAgg+ needs 2") and r["loss"] is None
  err = capfd.readouterr().err
  assert "jmtl: error: 2 consecutive rounds (1-2) had no applied reply" in err
  step, got, _, meta = _final(wd, rc)  # round 2's checkpoint: the initial parameters
  assert step == 2 and meta["row"]["applied"] == 0
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], np.zeros_like(got[k]))


class _SecAggGrid(_SilentGrid):
  """A Grid whose node k + 1 is site `sites[k]` running the ClientApp's SecAgg+ side in process
  (`flower.secagg_train`: Flower's `secaggplus_mod` around the site's fit), each with its own
  Context (node config `site`, its state kept across messages as a SuperNode's within a run);
  message ids set as Flower's in-memory grid sets them."""

  def __init__(self, run_config, sites):
    from flwr.app import Context, RecordDict
    super().__init__(range(1, len(sites) + 1))
    self.contexts = {k + 1: Context(run_id=-7, node_id=k + 1, node_config={"site": s},
                                    state=RecordDict(), run_config=dict(run_config))
                     for k, s in enumerate(sites)}
    self.out = {}

  def push_messages(self, msgs):
    import copy
    import uuid
    ids = []
    for msg in msgs:
      mid = str(uuid.uuid4())
      msg.metadata.__dict__["_message_id"] = mid
      ids.append(mid)
      # A copy, as the wire gives each node its own (the workflow sends one content to all);
      # a ClientApp that raises answers with an Error, as a SuperNode does.
      try:
        self.out[mid] = flower.secagg_train(copy.deepcopy(msg),
                                            self.contexts[msg.metadata.dst_node_id])
      except Exception as e:  # noqa: BLE001
        from flwr.app import Error, Message
        self.out[mid] = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
    return ids

  def pull_messages(self, ids):
    return [self.out.pop(i) for i in list(ids) if i in self.out]


def test_a_secagg_round_writes_its_loss_as_a_plain_round_does(tmp_path):
  """Flower's SecAgg+ workflow and mod in process, 3 sites, 2 FedAvg rounds: each line carries
  `loss`, the n_k-weighted mean of the sites' site_loss (in the clear in their FitRes, as n_k),
  equal to the plain run's line (round 1: the same parameters, so the same numbers); before it
  had none (`jmtl federated` printed `loss None`). The parameters equal the plain run's within
  SecAgg+'s quantisation bound, K x 2 x clipping range / sum_k q_k per round (see README)."""
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  rc = _run_config(wd, 2, sites="a,b,c", **{"secure-aggregation": True, "round-timeout": 30.0})
  ref_rc = _run_config(ref_wd, 2, sites="a,b,c")
  assert _in_thread(lambda: flower.serve_secagg(_SecAggGrid(rc, "abc"), _secagg_context(rc)),
                    within_s=120.0) is None
  flower.serve(_Grid(ref_rc), ref_rc)
  rows, ref = _rows(wd), _rows(ref_wd)
  assert [(r["round"], r["applied"], r["sites"]) for r in rows] == [(1, 1, ["a", "b", "c"]),
                                                                    (2, 1, ["a", "b", "c"])]
  assert rows[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-6)
  # By hand from the plain run's per-site losses and n_k = 10, 20, 30 (flower_problem).
  n = {"a": 10.0, "b": 20.0, "c": 30.0}
  assert rows[0]["loss"] == pytest.approx(
      sum(n[s] * ref[0]["site_loss"][s] for s in n) / sum(n.values()), rel=1e-6)
  assert rows[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-3)
  _, got, _, _ = _final(wd, rc)
  _, want, _, _ = _final(ref_wd, ref_rc)
  bound = 2 * 3 * 2 * 8.0 / round(60 / 1000 * 2**22)  # 2 rounds x K x 2 x c / sum_k q_k
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], atol=bound, rtol=0)


class _DyingSecAggGrid(_SecAggGrid):
  """`_SecAggGrid` whose node `dies` answers its first `answers` messages and then none (a
  SuperNode killed between SecAgg+ stages)."""

  def __init__(self, run_config, sites, dies, answers):
    super().__init__(run_config, sites)
    self.dies, self.left = dies, answers

  def push_messages(self, msgs):
    msgs = list(msgs)
    ids = super().push_messages(msgs)
    for mid, msg in zip(ids, msgs):
      if msg.metadata.dst_node_id == self.dies:
        if self.left <= 0:
          self.out.pop(mid, None)
        self.left -= 1
    return ids


@pytest.mark.parametrize("answers", [0, 1, 2], ids=["before-setup", "after-setup",
                                                      "after-key-sharing"])
def test_a_site_killed_between_secagg_stages_leaves_the_others_sum(tmp_path, answers):
  """SecAgg+ with 3 sites (threshold 2): site c answers its first `answers` stage messages of
  round 1 (0, setup, setup and key sharing) and then nothing (killed, but still listed). Both
  rounds complete with a and b (after key sharing: SecAgg+ removes c's pairwise masks with the
  others' shares of its key); the parameters equal the plain run in which c never answered,
  within the quantisation bound. Before: a node silent from the setup or key-sharing stage on
  was unmasked as "dead" though no one held its shares: every site's unmasking raised KeyError
  and every such round halted."""
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  rc = _run_config(wd, 2, sites="a,b,c", **{"secure-aggregation": True, "round-timeout": 1.0})
  ref_rc = _run_config(ref_wd, 2, sites="a,b,c")
  assert _in_thread(lambda: flower.serve_secagg(
      _DyingSecAggGrid(rc, "abc", dies=3, answers=answers), _secagg_context(rc)),
      within_s=120.0) is None
  flower.serve(_Grid(ref_rc, lost={"c"}), ref_rc)
  rows = _rows(wd)
  assert [(r["round"], r["applied"], r["sites"]) for r in rows] == [(1, 1, ["a", "b"]),
                                                                    (2, 1, ["a", "b"])]
  _, got, _, _ = _final(wd, rc)
  _, want, _, _ = _final(ref_wd, ref_rc)
  bound = 2 * 2 * 2 * 8.0 / round(30 / 1000 * 2**22)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], atol=bound, rtol=0)


def test_a_secure_run_resumes_from_its_checkpoint_each_round_written_once(tmp_path):
  """A SecAgg+ server stopped after round 1 of 3 and started again: it continues from its
  checkpoint at round 2 (the sites get round index 1, not 0: their batches), rounds.jsonl holds
  rounds 1-3 once, and the parameters equal the plain 3-round run within the bound."""
  wd, ref_wd = tmp_path / "wd", tmp_path / "ref"
  one = _run_config(wd, 1, sites="a,b,c", **{"secure-aggregation": True,
                                             "round-timeout": 30.0})
  three = {**one, "rounds": 3}
  ref_rc = _run_config(ref_wd, 3, sites="a,b,c")
  for rc in (one, three):
    assert _in_thread(lambda rc=rc: flower.serve_secagg(_SecAggGrid(rc, "abc"),
                                                        _secagg_context(rc)),
                      within_s=120.0) is None
  flower.serve(_Grid(ref_rc), ref_rc)
  rows, ref = _rows(wd), _rows(ref_wd)
  assert [r["round"] for r in rows] == [1, 2, 3]
  for r, want in zip(rows, ref):
    assert r["loss"] == pytest.approx(want["loss"], rel=1e-3)
  _, got, _, _ = _final(wd, three)
  _, want, _, _ = _final(ref_wd, ref_rc)
  bound = 3 * 3 * 2 * 8.0 / round(60 / 1000 * 2**22)
  for k in ("w", "b"):
    np.testing.assert_allclose(got[k], want[k], atol=bound, rtol=0)


# ---------------------------------------------------------------- round-0 evaluation

def evaluated_problem(run_config):
  """flower_problem's Problem with an evaluation (the least-squares loss on a held-out batch,
  `eval/loss`) every `eval-every` rounds (run config; fed.eval_every)."""
  import jax.numpy as jnp
  import flower_problem as fp
  problem = fp.make(run_config)
  batch, _ = fp.site_batches(7, 0, 99, 1)

  def evaluate(params, opt_state, r):
    del opt_state, r
    return {"eval/loss": float(fp.loss_fn(params, {k: jnp.asarray(v[0]) for k, v in
                                                   batch.items()}))}, {}
  problem.evaluate, problem.eval_every = evaluate, int(run_config.get("eval-every", 0))
  return problem


def _numpy_eval_loss(w, b):
  import flower_problem as fp
  batch, _ = fp.site_batches(7, 0, 99, 1)
  x, y = batch["x"][0].astype(np.float64), batch["y"][0].astype(np.float64)
  return 0.5 * np.mean(np.square(x @ np.asarray(w, np.float64) + float(b) - y))


def test_the_server_evaluates_round_0_when_fed_eval_every_is_set_and_keeps_it_on_resume(
    tmp_path):
  """README: the server evaluates the initial model at round 0 when fed.eval_every is set (as
  `jmtl federated` does), then every fed.eval_every rounds and at the last. Checked: rounds.jsonl
  line 0 holds the initial parameters' loss (numpy, by hand, at w = 0, b = 0); a server stopped
  after round 1 and started again keeps that line once and does not evaluate round 0 again;
  without fed.eval_every there is no round-0 line."""
  wd = tmp_path / "wd"
  one = _run_config(wd, 1, problem="test_flower_break:evaluated_problem", **{"eval-every": 2})
  flower.serve(_Grid(one), one)
  flower.serve(_Grid({**one, "rounds": 3}), {**one, "rounds": 3})
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [0, 1, 2, 3]
  assert set(rows[0]) == {"round", "eval/loss"}
  assert rows[0]["eval/loss"] == pytest.approx(_numpy_eval_loss(np.zeros(5), 0.0), rel=1e-5)
  assert [("eval/loss" in r) for r in rows] == [True, True, True, True]  # 1: the last of run 1
  _, got, _, _ = _final(wd, {**one, "rounds": 3})
  assert rows[3]["eval/loss"] == pytest.approx(_numpy_eval_loss(got["w"], got["b"]), rel=1e-5)
  never = _run_config(tmp_path / "never", 2, problem="test_flower_break:evaluated_problem")
  flower.serve(_Grid(never), never)
  assert [(r["round"], "eval/loss" in r) for r in _rows(tmp_path / "never")] == [(1, False),
                                                                                (2, True)]


# ---------------------------------------------------------------- SecAgg+ max_weight too small

def test_a_secagg_max_weight_too_small_stops_the_run_naming_the_config_key(tmp_path):
  """fed.flower.secagg_max_weight = 0.1 with n_k = 10, 20, 30 examples: the mod would send
  clip(n_k / 0.1 x delta_k, -8, 8), a silently wrong sum (|delta| here is about 0.28). The round
  is refused: written with applied 0 and an error naming the user's config key
  fed.flower.secagg_max_weight (run config secagg-max-weight, which alone it named before) and
  a value that fits; nothing applied, no checkpoint, and the run ends with that message."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, sites="a,b,c", **{"secure-aggregation": True, "round-timeout": 30.0,
                                           "secagg-max-weight": 0.1})
  raised = _in_thread(lambda: flower.serve_secagg(_SecAggGrid(rc, "abc"), _secagg_context(rc)),
                      within_s=120.0)
  assert isinstance(raised, RuntimeError) and "secure aggregation refused" in str(raised)
  (row,) = _rows(wd)
  assert row["round"] == 1 and row["applied"] == 0 and row["sites"] == []
  assert "fed.flower.secagg_max_weight" in row["error"] and "raise" in row["error"]
  assert "fed.flower.secagg_max_weight" in str(raised)
  assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


# ---------------------------------------------------------------- a server killed mid-round

class _Killed(BaseException):
  """The ServerApp process dying (no `except Exception` catches it)."""


class _KillingGrid(_Grid):
  """The stand-in Grid whose server dies in round `kill` (0-based) after the sites ran it and
  their replies (with their pending state) came back, before anything was applied."""

  def __init__(self, run_config, kill, **kw):
    super().__init__(run_config, **kw)
    self.kill, self.round = kill, None

  def push_messages(self, msgs):
    self.round = int(msgs[0].content["config"]["round"])
    return super().push_messages(msgs)

  def pull_messages(self, ids):
    got = super().pull_messages(ids)
    if self.round == self.kill and got:
      raise _Killed()
    return got


def test_a_server_killed_between_the_replies_and_the_commit_resumes_as_a_clean_restart(
    tmp_path):
  """fed.compress = topk:0.1 (each site's error-feedback residual waits in its Context.state
  for the reply token): the server dies in round 3 of 4 after the sites replied. Submitted
  again (a new Flower run: every site's Context.state starts empty), it resumes from round 2's
  checkpoint; rounds.jsonl holds rounds 1-4 once, and the parameters equal those of a run
  stopped cleanly after round 2 and submitted again, bit for bit: nothing of the killed round
  (applied or pending) leaks into the resumed one. (They are not the uninterrupted run's: the
  residuals restart at zero after a server restart, as the README states.)"""
  kw = {"compress": "topk:0.1"}
  killed, clean = tmp_path / "killed", tmp_path / "clean"
  rc = _run_config(killed, 4, **kw)
  with pytest.raises(_Killed):
    flower.serve(_KillingGrid(rc, kill=2), rc)
  assert [r["round"] for r in _rows(killed)] == [1, 2]
  flower.serve(_Grid(rc), rc)
  two, four = _run_config(clean, 2, **kw), _run_config(clean, 4, **kw)
  flower.serve(_Grid(two), two)
  flower.serve(_Grid(four), four)
  assert [r["round"] for r in _rows(killed)] == [1, 2, 3, 4]
  assert _rows(killed)[2]["site_loss"] == _rows(clean)[2]["site_loss"]
  _, got, _, _ = _final(killed, rc)
  _, want, _, _ = _final(clean, four)
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], want[k])


def test_sites_back_before_max_empty_rounds_reset_the_count(tmp_path):
  """max-empty-rounds 3: every site gone in rounds 2-3, back in round 4, gone in 5-6: never 3
  empty rounds in a row, so the run completes all 6 rounds (the count restarts at an applied
  round); rows and parameters equal those of the same run with max-empty-rounds 0 (never
  stop)."""
  wd, ref = tmp_path / "wd", tmp_path / "ref"
  gone = {(s, r) for s in "ab" for r in (1, 2, 4, 5)}
  rc = _run_config(wd, 6, **{"max-empty-rounds": 3})
  ref_rc = _run_config(ref, 6, **{"max-empty-rounds": 0})
  flower.serve(_Grid(rc, lost=gone), rc)
  flower.serve(_Grid(ref_rc, lost=gone), ref_rc)
  assert [r["applied"] for r in _rows(wd)] == [1, 0, 0, 1, 0, 0]
  assert [r["sites"] for r in _rows(wd)] == [r["sites"] for r in _rows(ref)]
  _, got, _, _ = _final(wd, rc)
  _, want, _, _ = _final(ref, ref_rc)
  for k in ("w", "b"):
    np.testing.assert_array_equal(got[k], want[k])


# ---------------------------------------------------------------- on a real cluster

@pytest.mark.long
def test_cluster_secagg_with_a_supernode_killed_goes_on_with_the_others(tmp_path):
  """A SuperLink + 3 SuperNodes (TLS), SecAgg+ over 3 FedAvg rounds, round-timeout 20 s;
  SuperNode c SIGKILLed once round 1's line is written. Rounds 2 and 3 are written and applied
  with a and b (before: the SuperLink's client manager still listed c or `sample(3, 3)` waited
  a day for it; a node silent from the setup stage was unmasked as dead, so the rounds halted
  and were not written); the run ends, its last checkpoint at round 3."""
  from flower_cluster import Cluster
  from test_flower import _wait_rounds
  sites = ["a", "b", "c"]
  c = Cluster(tmp_path / "cluster", sites).start()
  wd = tmp_path / "wd"
  try:
    out = c.run(wd, secagg=True, algo="fedavg", rounds=3, sites="a,b,c",
                **{"local-steps": 2, "round-timeout": 20.0, "max-empty-rounds": 3})
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr

    def kill_c(n):
      if n == 1:
        c.kill("supernode_c")
    rows = _wait_rounds(c, wd / "rounds.jsonl", 3, timeout=240, on_line=kill_c)
  finally:
    c.stop()
  assert rows[0]["sites"] == sites and rows[0]["applied"] == 1
  for row in rows[1:]:
    assert row["applied"] == 1 and row["sites"] == ["a", "b"], rows
  assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["3"]


def test_a_site_claimed_twice_in_a_secure_run_is_not_summed_twice(tmp_path, capfd):
  """SecAgg+ with SuperNodes a, b, c and a second one claiming a (node 4). The secure sum
  cannot drop one participant afterwards, so round 1, which both claimants joined, is written
  with applied 0 and the claimant named in `errors` (before: site a's update was summed twice
  and the line listed a twice: `sites` [a, a, b, c], applied); from round 2 on the claimant is
  left out while node 1 (the lower id, no owner yet) answers: rounds 2-3 applied with a, b, c."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 3, sites="a,b,c", **{"secure-aggregation": True, "round-timeout": 30.0})
  assert _in_thread(lambda: flower.serve_secagg(_SecAggGrid(rc, "abca"), _secagg_context(rc)),
                    within_s=180.0) is None
  rows = _rows(wd)
  assert [(r["round"], r["applied"], r["sites"]) for r in rows] == [
      (1, 0, []), (2, 1, ["a", "b", "c"]), (3, 1, ["a", "b", "c"])]
  assert "node 4 claims site 'a', which node 1 also answered for" in rows[0]["errors"]["4"]
  assert "round 1: node 4 claims site 'a'" in capfd.readouterr().err
