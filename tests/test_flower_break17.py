"""Break-it review of the Flower backend's own-data sites, per-site evaluation and async
FedBuff (issue 17): the cases that failed before their fix.

1. A malformed training file at one site under fed.partition = "own" (bad header, a wrong
   column count, a label outside the task's labels at line N, bytes that are not UTF-8, a
   directory where the file should be): every site's file has the same relative name
   (glue/SST-2/train.tsv), so the one line must name the site and its root, not only
   `glue/SST-2/train.tsv:7` (before the fix it did not; for non-UTF-8 bytes it named nothing).
2. A training reply whose example count n_k is NaN or negative (own data: n_k is the site's
   own count, which only the site knows): before the fix every FedAvg weight of the round was
   0 and the round was written `applied` 1 with parameters that did not move, one site
   silencing all; a reply without `examples` or `site_loss` crashed the server (KeyError, no
   checkpoint). Now the reply is refused as an error reply (the site `dropped`, the line in
   `errors`), the round goes on with the others, sync and async.
3. Two SuperNodes claiming one site answer its evaluate message: the second reply's metrics
   were dropped without a word (the training rounds refuse such a claimant in `errors`); now
   the row's `site_eval_errors` says which node's were not used.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_own_data import _config, _env, own  # noqa: E402,F401
from test_flower_parts import _final, _Grid, _run_config, _task_identity  # noqa: E402,F401

from jmtl import config as config_lib  # noqa: E402
from jmtl import tasks as task_registry  # noqa: E402
from jmtl.federated import flower  # noqa: E402
from jmtl.federated import loop  # noqa: E402
from jmtl.federated import sites as sites_lib  # noqa: E402


def _load(config_path):
  config = config_lib.complete(config_lib.load_config_file(str(config_path)))
  config = config_lib.validate(config, check_files=False)
  return config, sites_lib.sites_from_config(config), [task_registry.get_task("sst2")]


def _corrupt(path, how):
  lines = path.read_text().splitlines()
  if how == "header":
    lines[0] = "foo\tbar"
  elif how == "columns":  # line 5 of the file
    lines[4] += "\textra"
  elif how == "label":  # line 7: a label that is not 0 / 1
    lines[6] = lines[6].rsplit("\t", 1)[0] + "\tpositive"
  if how == "utf8":
    path.write_bytes(b"sentence\tlabel\n\xff\xfe bad\t1\n")
  elif how == "directory":
    path.unlink()
    path.mkdir()
  else:
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("how, said", [
    ("header", "glue/SST-2/train.tsv:1: column 'sentence' not in header"),
    ("columns", "glue/SST-2/train.tsv:5: expected 2 columns, got 3"),
    ("label", "glue/SST-2/train.tsv:7: label 'positive' is not one of ['0', '1']"),
    ("utf8", "'utf-8' codec can't decode"),
    ("directory", "Is a directory"),
])
def test_a_malformed_site_file_is_named_by_its_site_and_root(tmp_path, own, how, said):
  """Site b's own train.tsv is malformed: the error (what b's ClientApp raises on Flower, its
  first line going into rounds.jsonl `errors`; `jmtl data` / `jmtl federated` print it and exit
  2) names site 'b', its root and where the root came from, then the reader's file:line."""
  roots, tok = own
  config_path = _config(tmp_path, roots, tok)
  _corrupt(roots["b"] / "glue" / "SST-2" / "train.tsv", how)
  config, sites, tasks = _load(config_path)
  assert loop.own_records(config, tasks, sites[0])  # site a's file is fine
  with pytest.raises(config_lib.ConfigError) as e:
    loop.own_records(config, tasks, sites[1])
  msg = str(e.value)
  assert msg.startswith(f"site 'b' (fed.partition = 'own', its data root {roots['b']} from "
                        f"field 'data_dir'): task 'sst2' training file: "), msg
  assert said in msg and "\n" not in msg
  with pytest.raises(config_lib.ConfigError) as e:  # the node config data-dir names it so
    loop.own_records(config, tasks, sites[1], str(roots["b"]))
  assert str(e.value).startswith(f"site 'b' (fed.partition = 'own', its data root "
                                 f"{roots['b']} from node config data-dir)")
  if how == "label":  # the CLI: that one line, exit 2, nothing else
    out = subprocess.run([sys.executable, "-m", "jmtl.cli", "data", "--config",
                          str(config_path)], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"jmtl: error: {msg}"]


def _rows(wd):
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def _tampered(grid_class, site, key, value):
  """`grid_class` whose `site`'s training replies carry metrics `key` = `value` (None: the
  entry removed), as a SuperNode running other code, or a hostile one, could send."""
  from flwr.app import MetricRecord

  class Tampered(grid_class):
    def push_messages(self, msgs):
      msgs = list(msgs)
      ids = super().push_messages(msgs)
      replies = dict(self.out) if hasattr(self, "out") else {}
      replies.update({i: r for i, (_, r) in getattr(self, "waiting", {}).items()})
      for rep in replies.values():
        if rep.content is None or "delta" not in rep.content:
          continue
        if self.problem.sites[int(rep.content["metrics"]["site"])] == site:
          m = dict(rep.content["metrics"])
          m.pop(key) if value is None else m.__setitem__(key, value)
          rep.content["metrics"] = MetricRecord(m)
      return ids
  return Tampered


@pytest.mark.parametrize("key, value, says", [
    ("examples", math.nan, "site 'b' reported nan training examples"),
    ("examples", -30.0, "site 'b' reported -30 training examples"),
    ("examples", None, "site 'b': malformed training reply (metrics 'examples' missing"),
    ("site_loss", None, "site 'b': malformed training reply (metrics 'site_loss' missing"),
])
def test_a_reply_with_a_bad_example_count_is_refused_not_a_silent_zero_round(
    tmp_path, capfd, key, value, says):
  """Site b's replies carry a bad `examples` / no `site_loss`: each round applies site a alone
  (weight 1), b `dropped` with its line in `errors` and on stderr, and the final parameters
  equal float64 numpy FedAvg of site a alone (test_flower's reference)."""
  import test_flower as tf
  wd = tmp_path / "wd"
  rc = _run_config(wd, 2)
  flower.serve(_tampered(_Grid, "b", key, value)(rc), rc)
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [1, 2]
  for row in rows:
    assert row["sites"] == ["a"] and row["dropped"] == ["b"] and row["applied"] == 1
    assert row["weights"] == {"a": 1.0}
    (err,) = row["errors"].values()
    assert says in err and err.endswith("its reply is refused"), err
  assert says in capfd.readouterr().err
  ref = tf._numpy_fedavg([np.array([1.0, 0.0])] * 2)
  got = _final(wd, rc)[1]
  np.testing.assert_allclose(got["w"], ref["w"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["b"], ref["b"], rtol=1e-5, atol=1e-6)


def test_async_a_reply_with_a_nan_example_count_is_refused(tmp_path, monkeypatch):
  """FedBuff (K = 2 of sites a, b, c): c's replies say n_k = NaN. Before the fix one was
  buffered (server step 2 used it, with a NaN weight); now they are refused (line in `errors`), every
  buffer holds a and b, and the parameters equal numpy FedBuff of the schedule the rows
  report (test_flower_async's reference)."""
  import test_flower_async as ta
  monkeypatch.setattr(ta.flower_async, "POLL_S", 0.002)
  wd = tmp_path / "wd"
  rc = ta._rc(wd, 3, 2)
  ta.flower_async.serve_async(_tampered(ta._ScriptedGrid, "c", "examples", math.nan)(rc), rc)
  rows = _rows(wd)
  assert len(rows) == 3 and all(sorted(r["sites"]) == ["a", "b"] for r in rows), rows
  assert any("site 'c' reported nan training examples" in e
             for r in rows for e in r.get("errors", {}).values()), rows
  used, schedule = {"a": 0, "b": 0}, []
  for r in rows:
    buf = []
    for s in r["sites"]:
      buf.append(("abc".index(s), r["versions"][s], used[s]))
      used[s] += 1
    schedule.append(buf)
  xs = ta.numpy_fedbuff(schedule)
  ta._close(_final(wd, rc)[1], xs[3])


def test_a_second_node_claiming_a_site_in_evaluation_is_said_not_dropped_silently(tmp_path):
  """Nodes 1 and 3 both run site a (node 2 runs b), one evaluation round each round: a's
  metrics are node 1's (it replied first at round 0, then it owns a: its training replies are
  applied), equal to float64 numpy's MSE of a's held-out rows; every row's
  `site_eval_errors` names node 3's claim, and site a is not listed missing."""
  import test_flower as tf
  import test_flower_site_eval as se
  wd = tmp_path / "wd"
  rc = se._toy(wd, 2)
  flower.serve(se._EvalGrid(rc, nodes=["a", "b", "a"]), rc)
  rows = _rows(wd)
  assert [r["round"] for r in rows] == [0, 1, 2]
  for row in rows:
    r = row["round"]
    params = tf._numpy_fedavg([np.ones(2)] * r)
    assert row["site/a/lsq/mse"] == pytest.approx(se._numpy_mse(params, 0), rel=1e-5)
    assert "site_eval_missing" not in row
    assert row["site_eval_errors"] == {
        "3": "node 3 claims site 'a', which node 1 already replied for: its metrics are not "
             "used"}, row
