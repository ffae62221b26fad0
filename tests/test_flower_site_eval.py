"""Per-site held-out evaluation on the Flower backend: at each evaluation round the server sends
every site an evaluate message with the parameters it evaluates, the site evaluates them on its
own held-out rows (`flower.site_evaluate`, the ClientApp's evaluate handler) and replies plain
numbers, which the server writes as `site/<name>/<task>/<metric>` where `jmtl federated` does
(rounds.jsonl, eval.json).

In process (the stand-in Grid of tests/test_flower_parts.py, answering evaluate messages too):
a least-squares Problem whose sites' held-out MSE is checked against float64 numpy FedAvg; a
site that never answers (listed missing, nothing invented, the run goes on); fed.participation
< 1 (every site evaluated); a resumed run (earlier rounds' metrics stay); fed.holdout = 0 (no
messages); a real jmtl config against `jmtl federated` (slow, long). A real TLS cluster with
SecAgg+ (slow, long)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

import flower_problem as fp  # noqa: E402
from test_flower_parts import (CONFIG, ROOT, _Grid, _Reply, _run_config,  # noqa: E402,F401
                               _task_identity)

from jmtl.federated import flower  # noqa: E402

HELD_SEED = 7  # the held-out rows: flower_problem's batches of another seed (8 rows a site)


def held_rows(k):
  """Site k's held-out inputs [8, D] and targets [8] (float32)."""
  data, _ = fp.site_batches(HELD_SEED, k, 0, 1)
  return data["x"][0], data["y"][0]


def with_site_eval(run_config):
  """flower_problem's Problem, evaluated every round at the sites: site k's mean squared error
  of its held-out rows, `lsq/mse` (no server-side evaluation)."""
  problem = fp.make(run_config)

  def site_evaluate(params, k, r):
    x, y = held_rows(k)
    z = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    return {"lsq/mse": float(np.mean(np.square(z - y)))}

  problem.site_evaluate = site_evaluate
  problem.eval_every = 1
  return problem


def _numpy_mse(params, k):
  x, y = (a.astype(np.float64) for a in held_rows(k))
  return float(np.mean(np.square(x @ params["w"] + params["b"] - y)))


class _EvalGrid(_Grid):
  """`_Grid` that also answers evaluate messages (Flower `MessageType.EVALUATE`) with
  `flower.site_evaluate`, as a SuperNode's ClientApp does; `eval_lost` = sites (or (site,
  round) pairs) whose evaluate reply never comes. `asked` records (site, round) per evaluate
  message."""

  def __init__(self, run_config, eval_lost=(), **kw):
    super().__init__(run_config, **kw)
    self.eval_lost, self.asked = set(eval_lost), []

  def push_messages(self, msgs):
    msgs = list(msgs)
    if not msgs or msgs[0].metadata.message_type != "evaluate":
      return super().push_messages(msgs)
    ids = []
    for i, msg in enumerate(msgs):
      node = msg.metadata.dst_node_id
      site, r = self.nodes[node - 1], int(msg.content["config"]["round"])
      mid = f"e{r}_{i}_{time.time_ns()}"
      ids.append(mid)
      self.asked.append((site, r))
      if site in self.eval_lost or (site, r) in self.eval_lost:
        continue
      try:
        content = flower.site_evaluate(msg.content, site, self.run_id, self.run_config)
      except ValueError as e:  # a SuperNode replies its ClientApp's exception as an Error
        from flwr.app import Error
        self.out[mid] = _Reply(None, mid, node, Error(code=0, reason=f"ValueError: {e}"))
        continue
      self.out[mid] = _Reply(content, mid, node)
    return ids


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def _toy(wd, rounds, **kw):
  return _run_config(wd, rounds, **{"problem": "test_flower_site_eval:with_site_eval", **kw})


def test_site_metrics_equal_numpy_on_each_sites_held_out_rows(tmp_path):
  """3 FedAvg rounds evaluated every round: each round's `site/<k>/lsq/mse` equals float64
  numpy's MSE of site k's held-out rows at the float64 numpy FedAvg parameters of that round
  (round 0: the initial zeros); the evaluate messages carry the parameters (6 float32 values
  per site); nothing is missing."""
  import test_flower as tf
  wd = tmp_path / "wd"
  rc = _toy(wd, 3)
  grid = _EvalGrid(rc)
  flower.serve(grid, rc)
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [0, 1, 2, 3]
  assert sorted(grid.asked) == sorted((s, r) for s in ("a", "b") for r in range(4))
  for row in rows:
    r = row["round"]
    params = tf._numpy_fedavg([np.ones(2)] * r)
    for k, s in enumerate(("a", "b")):
      assert row[f"site/{s}/lsq/mse"] == pytest.approx(_numpy_mse(params, k), rel=1e-5), (r, s)
    assert "site_eval_missing" not in row
    assert row["site_eval_bytes_down"] == 2 * 4 * (fp.D + 1)
  assert rows[0]["site/a/lsq/mse"] != pytest.approx(rows[3]["site/a/lsq/mse"], rel=1e-2)


def test_a_site_that_never_answers_is_listed_missing_and_nothing_is_invented(tmp_path, capfd):
  """Site b never answers round 2's evaluate message (its training replies do come): round 2's
  row has site a's metric, no site/b key, `site_eval_missing` ["b"]; the run goes on (every
  round applied with both sites) and round 3 has both sites' metrics again."""
  wd = tmp_path / "wd"
  rc = _toy(wd, 3)
  flower.serve(_EvalGrid(rc, eval_lost={("b", 2)}), rc)
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [0, 1, 2, 3]
  assert all(r["sites"] == ["a", "b"] and r["applied"] == 1 for r in rows[1:])
  two = rows[2]
  assert two["site_eval_missing"] == ["b"] and "site/a/lsq/mse" in two
  assert not [k for k in two if k.startswith("site/b/")]
  assert all("site_eval_missing" not in r and "site/b/lsq/mse" in r for r in rows if r is not two)
  assert "round 2: per-site evaluation: no metrics from b" in capfd.readouterr().err


def test_a_site_whose_evaluation_raises_is_missing_with_its_error(tmp_path):
  wd = tmp_path / "wd"
  rc = _toy(wd, 1)
  grid = _EvalGrid(rc)

  def broken(params, k, r):
    if k == 1:
      raise ValueError("held-out rows unreadable")
    return {"lsq/mse": 1.0}
  for site in ("a", "b"):  # each site's cached Problem (`flower._site`)
    flower._site(grid.run_id, rc, site)[0].site_evaluate = broken  # noqa: SLF001
  flower.serve(grid, rc)
  for row in _rows(wd):
    assert row["site_eval_missing"] == ["b"] and row["site/a/lsq/mse"] == 1.0
    assert row["site_eval_errors"] == {"2": "ValueError: held-out rows unreadable"}
    assert not [k for k in row if k.startswith("site/b/")]


def test_every_site_is_evaluated_when_half_train(tmp_path):
  """fed.participation 0.5 of 4 sites: 2 train each round, all 4 are evaluated (as the
  simulation evaluates every site), each at the round's parameters."""
  wd = tmp_path / "wd"
  rc = _toy(wd, 2, sites="a,b,c,d", participation=0.5)
  flower.serve(_Grid(rc), rc)  # (test_flower_parts' stand-in answers evaluate messages too)
  rows = _rows(wd)
  assert all(len(r["sites"]) == 2 for r in rows[1:])
  for row in rows:
    assert sorted(k for k in row if k.startswith("site/")) == [
        f"site/{s}/lsq/mse" for s in "abcd"]
    assert "site_eval_missing" not in row


def test_a_resumed_run_keeps_the_earlier_rounds_metrics(tmp_path):
  """Stopped after round 2 and resumed to round 3: rounds 0-2's lines (with their site
  metrics) stay as written, round 3 is evaluated by the new server, equal to an uninterrupted
  run's lines."""
  wd, ref = tmp_path / "wd", tmp_path / "ref"
  flower.serve(_EvalGrid(_toy(wd, 2)), _toy(wd, 2))
  before = (wd / "rounds.jsonl").read_text().splitlines()
  grid = _EvalGrid(_toy(wd, 3))
  flower.serve(grid, _toy(wd, 3))
  assert sorted(grid.asked) == [("a", 3), ("b", 3)]  # only the new round is asked
  after = (wd / "rounds.jsonl").read_text().splitlines()
  assert after[:3] == before
  flower.serve(_EvalGrid(_toy(ref, 3)), _toy(ref, 3))
  for got, want in zip(_rows(wd), _rows(ref)):
    assert {k: v for k, v in got.items() if k.startswith("site/")} == pytest.approx(
        {k: v for k, v in want.items() if k.startswith("site/")}, rel=1e-6)


def with_outputs(run_config):
  """`with_site_eval` with a server evaluation and an eval.json of the last round's metrics."""
  problem = with_site_eval(run_config)
  problem.evaluate = lambda params, opt, r: ({"t/m": float(r)}, {})
  problem.write_outputs = lambda workdir, metrics, rows, r: (
      open(os.path.join(workdir, "eval.json"), "w").write(json.dumps({"step": r, **metrics})))
  return problem


def test_a_finished_run_submitted_again_keeps_the_site_metrics_in_eval_json(tmp_path):
  """eval.json holds the last round's site metrics; a finished run submitted again (eval.json
  lost by a kill after the last line) writes it again with them, from the checkpoint's line,
  without asking the sites."""
  wd = tmp_path / "wd"
  rc = _toy(wd, 2, problem="test_flower_site_eval:with_outputs")
  flower.serve(_EvalGrid(rc), rc)
  first = json.loads((wd / "eval.json").read_text())
  assert first["step"] == 2 and first["t/m"] == 2.0
  assert first["site/a/lsq/mse"] == _rows(wd)[-1]["site/a/lsq/mse"] and "site/b/lsq/mse" in first
  (wd / "eval.json").unlink()
  grid = _EvalGrid(rc)
  flower.serve(grid, rc)
  assert grid.asked == [] and json.loads((wd / "eval.json").read_text()) == first


def server_eval_only(run_config):
  """flower_problem's Problem with a server-side evaluation every round and no per-site one."""
  problem = fp.make(run_config)
  problem.evaluate = lambda params, opt, r: ({"t/m": float(r)}, {})
  problem.eval_every = 1
  return problem


def test_no_site_evaluation_no_messages(tmp_path):
  """A Problem without `site_evaluate` (a jmtl config with fed.holdout = 0) sends no evaluate
  message and writes no site keys, while the server evaluates every round."""
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2, problem="test_flower_site_eval:server_eval_only")
  grid = _EvalGrid(rc)
  flower.serve(grid, rc)
  assert grid.asked == []
  rows = _rows(wd)
  assert [r.get("t/m") for r in rows] == [0.0, 1.0, 2.0]
  assert not [k for r in rows for k in r if k.startswith(("site/", "site_eval"))]


def test_follow_says_which_sites_gave_no_metrics(tmp_path):
  """`jmtl federated --backend flower` prints each line it follows: a round whose per-site
  evaluation missed a site says so."""
  from test_flower_parts import _follow
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": "s1"}}))
  rows = [{"round": 1, "sites": ["a", "b"], "loss": 0.5, "seconds": 0.5},
          {"round": 2, "sites": ["a"], "loss": 0.25, "seconds": 0.5,
           "site_eval_missing": ["a", "b"]}]
  (wd / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  said, _ = _follow(wd, lambda: ("finished:failed", ""))  # ends after round 2 of 4
  assert said == ["round 1: loss 0.5 sites a,b 0.5 s",
                  "round 2: loss 0.25 sites a 0.5 s (no site metrics from a,b)"]


@pytest.mark.slow
@pytest.mark.long  # about 65 s of CPU (two jit compiles of the model, the simulation's and ours)
def test_jmtl_config_site_metrics_match_jmtl_federated(tmp_path, data_dir):
  """A real jmtl config (`tiny_fed_flower.py`: transformer, DiLoCo; here on STS-B with
  fed.holdout 0.2) evaluated every round, 2 rounds, through the Flower server (in-process stand-in Grid, each
  site's ClientApp evaluating its held-out rows with `flower.jmtl_problem`'s `site_evaluate`)
  against `jmtl federated`'s mesh simulation of the same config: every evaluated round's
  `site/<name>/<task>/<metric>` agree (rel 1e-5; the last round's, and eval.json's, rel 1e-4:
  see below), and they change from round 0 to 2; with fed.holdout = 0 the Problem has no
  per-site evaluation."""
  # STS-B (regression: Pearson / Spearman move with any change of the predictions; the tiny
  # BBC split's 6 held-out rows a site give an accuracy that 2 rounds leave unchanged).
  spec = ["--config.tasks=stsb", "--config.fed.holdout=0.2", "--config.fed.rounds=2",
          "--config.fed.eval_every=1"]
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  sim_wd = tmp_path / "sim"
  sim = subprocess.Popen([sys.executable, "-m", "jmtl.cli", "federated", "--config", CONFIG,
                          "--workdir", str(sim_wd), *spec], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
  try:
    wd = tmp_path / "flower"
    rc = {"problem": "jmtl.federated.flower:jmtl_problem", "config": CONFIG,
          "overrides": " ".join(spec), "workdir": str(wd), "rounds": 2,
          "round-timeout": 120.0, "wait-sites": 0.0}
    flower.serve(_EvalGrid(rc), rc)
    log, _ = sim.communicate(timeout=300)
  finally:
    sim.kill()
  assert sim.returncode == 0, log
  got, want = _rows(wd), _rows(sim_wd)
  assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2]
  for g, w in zip(got, want):
    keys = sorted(k for k in w if k.startswith("site/"))
    assert keys and {k[len("site/"):].split("/")[0] for k in keys} == {"a", "b"}
    assert sorted(k for k in g if k.startswith("site/")) == keys, g["round"]
    # Rounds 0-1: rel 1e-5. Round 2: rel 1e-4, as the two backends' server parameters after
    # 2 DiLoCo rounds differ by float32 rounding (measured: at most 1.4e-7 absolute on
    # parameters of size ~1), which the Pearson correlation of this tiny model's nearly constant
    # regression outputs over 24 rows amplifies (measured: 3e-5 relative).
    rel = 1e-5 if g["round"] < 2 else 1e-4
    for k in keys:
      assert g[k] == pytest.approx(w[k], rel=rel, abs=1e-6), (g["round"], k)
    assert "site_eval_missing" not in g
  assert got[0]["site/a/stsb/pearson"] != pytest.approx(got[2]["site/a/stsb/pearson"], rel=1e-3)
  e_got = json.loads((wd / "eval.json").read_text())
  e_want = json.loads((sim_wd / "eval.json").read_text())
  site = {k: v for k, v in e_want.items() if k.startswith("site/")}
  assert site and {k: e_got[k] for k in site} == pytest.approx(site, rel=1e-4, abs=1e-6)
  no_holdout = flower.jmtl_problem({**rc, "overrides": " ".join(
      [*spec, "--config.fed.holdout=0.0"])})
  assert no_holdout.site_evaluate is None


@pytest.mark.slow
@pytest.mark.long
def test_site_evaluation_on_a_tls_cluster_with_secagg_plus(tmp_path):
  """A real local cluster (SuperLink + 3 SuperNodes over TLS, tests/flower_cluster.py), 2
  FedAvg rounds through Flower's SecAgg+ workflow, evaluated every round at the sites (plain
  evaluate messages: the per-site metrics are revealed to the server, as in the simulation):
  rounds 0-2 hold every site's held-out MSE, equal to float64 numpy's at numpy FedAvg's
  parameters up to SecAgg+'s quantisation (the tolerance of tests/test_flower.py's SecAgg+
  case, propagated through the MSE)."""
  import test_flower as tf
  from flower_cluster import Cluster
  sites = ["a", "b", "c"]
  c = Cluster(tmp_path / "cluster", sites).start()
  try:
    wd = tmp_path / "wd"
    out = c.run(wd, secagg=True, algo="fedavg", rounds=2, sites=",".join(sites),
                problem="test_flower_site_eval:with_site_eval", **{"local-steps": 2})
    assert out.returncode == 0 and json.loads(out.stdout)["success"], out.stdout + out.stderr
    rows = tf._wait_rounds(c, wd / "rounds.jsonl", 3, timeout=300)
  finally:
    c.stop()
  assert [r["round"] for r in rows] == [0, 1, 2], c.logs()
  assert all(r.get("secure_aggregation") == "secagg+" for r in rows[1:])
  for row in rows:
    assert "site_eval_missing" not in row, row
    params = tf._numpy_fedavg([np.ones(3)] * row["round"])
    for k, s in enumerate(sites):
      want = _numpy_mse(params, k)
      # round 0 exact; later rounds: |delta params| < 6e-4 (SecAgg+ quantisation), whose
      # effect on an MSE of this size stays well under 1e-2 relative
      assert row[f"site/{s}/lsq/mse"] == pytest.approx(
          want, rel=1e-5 if row["round"] == 0 else 1e-2), (row["round"], s)
