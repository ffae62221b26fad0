"""A site's held-out evaluation through the real ClientApp under fed.partition = "own".

A SuperNode started as the README says (`launch/flower.py supernode --data-dir D`, no
JMTL_DATA_DIR in its environment) gives its data root only as the node config `data-dir`. The
ClientApp's evaluate handler must build the site's Problem from that root, as its train handler
does (`flower.site_run_config`); it used to pass Flower's bare run config, so every site's
evaluation raised "no data root" and every `site/<name>/...` metric was missing on a real
cluster (the in-process tests call `flower.site_evaluate` directly and missed it).
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_own_data import HOLDOUT, SITES, _config, own  # noqa: E402,F401
from test_flower_parts import _task_identity  # noqa: E402,F401  (autouse: Message() needs it)

from jmtl.federated import flower  # noqa: E402


def test_the_clientapps_evaluate_handler_reads_the_node_config_data_dir(tmp_path, own,
                                                                          monkeypatch):
  """Site b's ClientApp (node config data-dir = its root, no data_dir fields in fed.sites,
  no data.dir, no JMTL_DATA_DIR) answers an evaluate message with metrics, not an error, and
  they are an accuracy over its own held-out rows: floor(0.1 x 64) = 6 rows, so a multiple of
  100/6 (the server's dev rows would give multiples of 100/32)."""
  from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
  roots, tok = own
  config = _config(tmp_path, roots, tok, data_dirs=False)
  text = config.read_text().replace(f"  c.data.dir = {str(roots['server'])!r}\n", "")
  config.write_text(text)
  monkeypatch.delenv("JMTL_DATA_DIR")  # a site machine: no data root but its node config's
  run_config = {"problem": "jmtl.federated.flower:jmtl_problem", "config": str(config),
                "workdir": "unused"}
  node_config = {"site": "b", "data-dir": str(roots["b"])}
  # run ids unique in the test session: flower._SITES caches a site per (run id, site)
  problem, _, like, _ = flower._site(-4100, {**run_config, flower.SITE_DATA_DIR:  # noqa: SLF001
                                             str(roots["b"])}, "b")
  content = RecordDict({"params": flower.to_record(like), "config": ConfigRecord({"round": 0})})
  msg = Message(content=content, dst_node_id=1, message_type=MessageType.EVALUATE)
  ctx = Context(run_id=-4101, node_id=1, node_config=node_config, state=RecordDict(),
                run_config=run_config)
  reply = flower._make_client_app()(message=msg, context=ctx)  # noqa: SLF001
  assert not reply.has_error(), reply.error
  metrics = dict(reply.content["metrics"])
  assert set(metrics) == {"sst2/accuracy"}
  lo, hi = SITES["b"]
  held = max(1, math.floor(HOLDOUT * (hi - lo)))
  assert held == 6
  correct = metrics["sst2/accuracy"] * held / 100.0
  assert correct == pytest.approx(round(correct), abs=1e-4)
  assert metrics == pytest.approx(problem.site_evaluate(like, 1, 0), rel=1e-6)


def test_follow_says_why_a_site_gave_no_metrics(tmp_path):
  """The followed line of a round whose sites' evaluation raised gives the first error (the
  reason a user needs, e.g. a site without its data), not only the sites' names."""
  import json
  from test_flower_parts import _follow
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "flower.json").write_text(json.dumps({"run_config": {"submission": "s1"}}))
  err = "<class 'jmtl.config.ConfigError'>:<'task 'sst2': data file not found: no data root'>"
  rows = [{"round": 1, "sites": ["a", "b"], "loss": 0.5, "seconds": 0.5,
           "site_eval_missing": ["a", "b"], "site_eval_errors": {"11": err, "12": err}}]
  (wd / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  said, _ = _follow(wd, lambda: ("finished:failed", ""))
  assert said == [f"round 1: loss 0.5 sites a,b 0.5 s (no site metrics from a,b: {err}; "
                  "see the line's site_eval_errors)"]
