"""fed.partition = "own": each site trains on its OWN files (cross-silo: nothing is pooled).

Real data: disjoint slices of GLUE SST-2's train.tsv written into one data root per site (GLUE
layout, tmp dirs), and a server root holding only SST-2's dev.tsv. The tokenizer is a file
(data.tokenizer, a config rule under "own"), trained here on the dev text.
1. In process (the stand-in Grid of tests/test_flower_parts.py): the Flower server's per-round
   site losses and FedAvg weights equal `jmtl federated`'s mesh simulation of the same config
   (the same dirs through fed.sites[].data_dir) for 2 rounds, and each site's n_k is the row
   count of its own file less its held-out rows, counted here from the file; the server's root
   has only dev.tsv.
2. A site's root from the node config data-dir (`flower.site_run_config`), and a missing
   training file: one line naming site, task and path (CLI exit 2; on Flower the round goes on
   without that site, the line in rounds.jsonl `errors`).
3. Refusals: "own" without data.tokenizer, with share / examples, data_dir without "own".
4. (long) A real TLS cluster whose SuperNodes get their roots by node config data-dir and whose
   processes' JMTL_DATA_DIR holds no training file (one SuperNode's root has none either: its
   line is in `errors` and its log).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import _Grid, _Reply, _task_identity  # noqa: E402,F401

from jmtl.federated import flower  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SITES = {"a": (0, 96), "b": (96, 160), "c": (160, 300)}  # train.tsv data rows [lo, hi)
HOLDOUT = 0.1


def _write_roots(tmp_path: Path, data_dir: Path) -> dict[str, Path]:
  """Server root (dev.tsv only, 64 rows) and one root per site with its train.tsv slice."""
  src = data_dir / "glue" / "SST-2"
  train = (src / "train.tsv").read_text().splitlines()
  dev = (src / "dev.tsv").read_text().splitlines()
  roots = {}
  server = tmp_path / "server" / "glue" / "SST-2"
  server.mkdir(parents=True)
  (server / "dev.tsv").write_text("\n".join(dev[:65]) + "\n")
  roots["server"] = tmp_path / "server"
  for name, (lo, hi) in SITES.items():
    d = tmp_path / f"site_{name}" / "glue" / "SST-2"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("\n".join([train[0]] + train[1 + lo:1 + hi]) + "\n")
    roots[name] = tmp_path / f"site_{name}"
  return roots


def _tokenizer(tmp_path: Path, data_dir: Path) -> Path:
  from jmtl.data import tokenizer as tokenizer_lib
  dev = (data_dir / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:]
  tok = tokenizer_lib.train_tokenizer([x.split("\t")[0] for x in dev], vocab_size=300)
  path = tmp_path / "tokenizer.json"
  path.write_text(tok.backend.to_str())
  return path


def _config(tmp_path: Path, roots: dict, tokenizer: Path, *, data_dirs: bool = True,
            extra: str = "", name: str = "own_config.py") -> Path:
  sites = ", ".join(
      f"dict(name={n!r}, devices=1" + (f", data_dir={str(roots[n])!r})" if data_dirs else ")")
      for n in SITES)
  text = f'''from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.dir = {str(roots["server"])!r}
  c.data.tokenizer = {str(tokenizer)!r}
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.data.batch_size = 8
  c.data.max_eval_examples = 32
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.progress = "none"
  c.eval.batch_size = 16
  c.fed.sites = ({sites},)
  c.fed.rounds = 3
  c.fed.local_steps = 2
  c.fed.client_lr = 0.05
  c.fed.partition = "own"
  c.fed.holdout = {HOLDOUT}
  c.fed.step_time_s = 0.05
{extra}  return c
'''
  path = tmp_path / name
  path.write_text(text)
  return path


def _n_k(root: Path) -> int:
  """A site's FedAvg weight counted from its file: data rows less floor(holdout x rows)."""
  rows = len((root / "glue" / "SST-2" / "train.tsv").read_text().splitlines()) - 1
  return rows - max(1, math.floor(HOLDOUT * rows))


def _env(**kw):
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **kw)


def _rows(wd: Path) -> list[dict]:
  return [json.loads(x) for x in (wd / "rounds.jsonl").read_text().splitlines()]


def _files(root: Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def own(tmp_path, data_dir, monkeypatch):
  roots = _write_roots(tmp_path, data_dir)
  tok = _tokenizer(tmp_path, data_dir)
  # Nothing in this process may reach the shared data: its root is the server's (dev only).
  monkeypatch.setenv("JMTL_DATA_DIR", str(roots["server"]))
  return roots, tok


@pytest.mark.slow
def test_flower_sites_on_their_own_files_equal_the_mesh_simulation(tmp_path, own):
  roots, tok = own
  config = _config(tmp_path, roots, tok)
  sim_wd = tmp_path / "sim"
  sim = subprocess.Popen(
      [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(config), "--workdir",
       str(sim_wd), "--config.fed.rounds=2"], env=_env(JMTL_DATA_DIR=str(roots["server"]),
                              XLA_FLAGS="--xla_force_host_platform_device_count=3"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    wd = tmp_path / "flower"
    run_config = {"problem": "jmtl.federated.flower:jmtl_problem", "config": str(config),
                  "overrides": "--config.fed.rounds=2", "workdir": str(wd), "rounds": 2,
                  "round-timeout": 120.0, "wait-sites": 0.0}
    flower.serve(_Grid(run_config), run_config)
    log, _ = sim.communicate(timeout=300)
  finally:
    sim.kill()
  assert sim.returncode == 0, log
  rows, ref = _rows(wd), _rows(sim_wd)
  assert [r["round"] for r in rows] == [r["round"] for r in ref] == [1, 2]
  n = {s: _n_k(roots[s]) for s in SITES}
  assert n == {"a": 87, "b": 58, "c": 126}  # 96, 64, 140 rows less 10 % held out
  total = sum(n.values())
  for got, want in zip(rows, ref):
    assert got["sites"] == list(SITES) and got["applied"] == 1
    assert got["weights"] == pytest.approx({s: v / total for s, v in n.items()}, rel=1e-6)
    assert want["weights"] == pytest.approx(got["weights"], rel=1e-6)
    assert got["site_loss"] == pytest.approx(want["site_loss"], rel=1e-5, abs=1e-6)
  # round 2's losses are taken at the parameters after round 1: they moved
  assert rows[1]["site_loss"] != pytest.approx(rows[0]["site_loss"], rel=1e-4)
  # The server's root holds the dev file alone, and the server evaluated on it.
  assert _files(roots["server"]) == ["glue/SST-2/dev.tsv"]
  assert json.loads((wd / "eval.json").read_text())
  got_eval = {k: v for k, v in json.loads((wd / "eval.json").read_text()).items()
              if k.startswith("sst2/")}
  want_eval = {k: v for k, v in json.loads((sim_wd / "eval.json").read_text()).items()
               if k in got_eval}
  assert got_eval and got_eval == pytest.approx(want_eval, rel=1e-4, abs=1e-5)
  # Each site's held-out evaluation (fed.holdout of its own rows) ran at the site, on its own
  # rows (never a pooled split: no process here has one), and equals the simulation's.
  sim_eval = json.loads((sim_wd / "eval.json").read_text())
  got_site = {k: v for k, v in json.loads((wd / "eval.json").read_text()).items()
              if k.startswith("site/")}
  assert not rows[-1].get("site_eval_missing"), rows[-1]
  assert {k.split("/")[1] for k in got_site} == set(SITES)
  assert got_site == pytest.approx({k: v for k, v in sim_eval.items() if k.startswith("site/")},
                                   rel=1e-4, abs=1e-5)


def test_a_sites_root_from_the_node_config_and_its_n_k(tmp_path, own):
  """The ClientApp's run config carries the node config data-dir (`site_run_config`): site a
  reads its rows from there though its fed.sites entry gives no data_dir; its first round's
  batches are its own file's rows."""
  roots, tok = own
  config = _config(tmp_path, roots, tok, data_dirs=False)
  ctx = type("Context", (), {"run_config": {"problem": "jmtl.federated.flower:jmtl_problem",
                                             "config": str(config), "workdir": "unused"},
                             "node_config": {"site": "b", "data-dir": str(roots["b"])}})()
  rc = flower.site_run_config(ctx)
  assert rc[flower.SITE_DATA_DIR] == str(roots["b"])
  problem = flower._site(-1000, rc, "b")[0]  # noqa: SLF001
  batch, n = problem.batches(1, 0)
  assert n == _n_k(roots["b"]) == 58
  assert batch["sst2"]["example_weight"].shape[:2] == (2, 8)  # H local steps x batch rows
  # Without a node data-dir the site's root is this process's: no training file there.
  from jmtl.config import ConfigError
  problem = flower._site(-1001, {**rc, flower.SITE_DATA_DIR: ""}, "b")[0]  # noqa: SLF001
  with pytest.raises(ConfigError, match=r"site 'b' .*task 'sst2' training file not found: "
                     + str(roots["server"] / "glue" / "SST-2" / "train.tsv")):
    problem.batches(1, 0)


class _SiteErrorGrid(_Grid):
  """The stand-in Grid whose ClientApps' exceptions come back as a SuperNode sends them:
  an Error reply with reason "<class ...>:<'message'>" (flwr's run_clientapp)."""

  def push_messages(self, msgs):
    ids = []
    for i, msg in enumerate(msgs):
      node = msg.metadata.dst_node_id
      site = self.nodes[node - 1]
      mid = f"m{len(self.out)}_{i}_{node}"
      ids.append(mid)
      try:
        content = flower.site_train(msg.content, self.state[node - 1], site, self.run_id,
                                    self.run_config)
      except Exception as ex:  # noqa: BLE001 -- what a SuperNode does with it
        from flwr.app import Error
        self.out[mid] = _Reply(None, mid, node, Error(
            code=0, reason=str(type(ex)) + ":<'" + str(ex) + "'>"))
        continue
      self.out[mid] = _Reply(content, mid, node)
    return ids


@pytest.mark.slow
def test_a_site_without_its_training_file_is_lost_with_one_line(tmp_path, own):
  """Site c's root lacks train.tsv: on Flower its ClientApp's error names site, task and path
  in rounds.jsonl `errors`, and the rounds go on with a and b; `jmtl federated` (the mesh
  simulation) and `jmtl data` stop before any work with that line, exit 2."""
  roots, tok = own
  missing = roots["c"] / "glue" / "SST-2" / "train.tsv"
  missing.unlink()
  config = _config(tmp_path, roots, tok)
  wd = tmp_path / "flower"
  run_config = {"problem": "jmtl.federated.flower:jmtl_problem", "config": str(config),
                "workdir": str(wd), "rounds": 1, "round-timeout": 120.0, "wait-sites": 0.0}
  flower.serve(_SiteErrorGrid(run_config), run_config)
  row = _rows(wd)[0]
  assert row["sites"] == ["a", "b"] and row["dropped"] == ["c"] and row["applied"] == 1
  (err,) = row["errors"].values()
  assert f"site 'c' (fed.partition = 'own', its data root from field 'data_dir'): task " \
         f"'sst2' training file not found: {missing}" in err
  for command in ("federated", "data"):
    out = subprocess.run(
        [sys.executable, "-m", "jmtl.cli", command, "--config", str(config),
         *(["--workdir", str(tmp_path / "sim")] if command == "federated" else [])],
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=3"), capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jmtl: error: site 'c' ")
    assert str(missing) in lines[0]
  assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize("extra, key", [
    ('  c.data.tokenizer = ""\n', "'fed.partition' = 'own' needs data.tokenizer"),
    ('  c.fed.sites = tuple(dict(s, share=1.0) for s in c.fed.sites)\n',
     "'fed.partition' = 'own' trains each site on all of its own rows"),
    ('  c.fed.sites = tuple(dict(s, examples=10) for s in c.fed.sites)\n',
     "the fed.sites fields 'share' and 'examples' split pooled rows"),
    ('  c.fed.partition = "iid"\n  c.data.dir = {DATA!r}\n',
     "field 'data_dir' is read only with fed.partition = 'own'"),
])
def test_own_refusals_are_one_line(tmp_path, own, data_dir, extra, key):
  roots, tok = own
  config = _config(tmp_path, roots, tok, extra=extra.format(DATA=str(data_dir)))
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "data", "--config", str(config)],
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jmtl: error: ") and key in lines[0], lines


def test_jmtl_data_shows_each_sites_rows_from_its_own_root(tmp_path, own):
  roots, tok = own
  config = _config(tmp_path, roots, tok)
  out = subprocess.run([sys.executable, "-m", "jmtl.cli", "data", "--config", str(config)],
                       env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  for s in SITES:
    rows = len((roots[s] / "glue" / "SST-2" / "train.tsv").read_text().splitlines()) - 1
    assert (f"  {s} (-) from {roots[s]}: sst2 {_n_k(roots[s])} "
            f"(+{rows - _n_k(roots[s])} held out)") in out.stdout


@pytest.mark.slow
@pytest.mark.long
def test_tls_cluster_whose_supernodes_hold_only_their_own_files(tmp_path, own):
  """`jmtl federated` with fed.backend = flower on a local SuperLink + 4 SuperNodes (TLS), each
  started with `--node-config "site='a' data-dir='<its root>'"`; every process's
  JMTL_DATA_DIR (and data.dir) is the server root, which holds dev.tsv only. Site d's root has
  no training file: its ClientApp's line (site, task, path) is in each round's `errors` and its
  SuperNode's log, and the rounds go on with a, b, c, whose site losses and weights equal the
  mesh simulation's of sites a, b, c over the same roots (fed.sites data_dir)."""
  from flower_cluster import Cluster
  roots, tok = own
  roots["d"] = tmp_path / "site_d"
  (roots["d"] / "glue" / "SST-2").mkdir(parents=True)
  missing = roots["d"] / "glue" / "SST-2" / "train.tsv"

  class OwnCluster(Cluster):
    def _start(self, name, args, env=None):
      if name.startswith("supernode_"):
        site = name[len("supernode_"):]
        args = [*args[:-1], f'{args[-1]} data-dir="{roots[site]}"']
      super()._start(name, args, env)

  config = _config(tmp_path, roots, tok, data_dirs=False, name="flower_config.py", extra=(
      '  c.fed.sites = tuple(dict(name=n, devices=1) for n in "abcd")\n'))
  sim_config = _config(tmp_path, roots, tok, name="sim_config.py")
  c = OwnCluster(tmp_path / "cluster", [*SITES, "d"])
  c.env["JMTL_DATA_DIR"] = str(roots["server"])
  c.start()
  sim_wd, wd = tmp_path / "sim", tmp_path / "flower"
  sim = subprocess.Popen(
      [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(sim_config),
       "--workdir", str(sim_wd), "--config.fed.rounds=2"],
      env=_env(JMTL_DATA_DIR=str(roots["server"]),
               XLA_FLAGS="--xla_force_host_platform_device_count=3"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    out = subprocess.run(
        [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(config),
         "--workdir", str(wd), "--config.fed.rounds=2", "--config.fed.backend=flower",
         "--config.fed.flower.superlink=local", "--config.fed.flower.wait_s=240",
         "--config.fed.flower.round_timeout=200"],
        env=dict(c.env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr + c.logs()
    log, _ = sim.communicate(timeout=300)
  finally:
    sim.kill()
    c.stop()
  assert sim.returncode == 0, log
  rows, ref = _rows(wd), _rows(sim_wd)
  assert [r["round"] for r in rows] == [r["round"] for r in ref] == [1, 2], c.logs()
  n = {s: _n_k(roots[s]) for s in SITES}
  line = (f"site 'd' (fed.partition = 'own', its data root from node config data-dir): task "
          f"'sst2' training file not found: {missing}")
  for got, want in zip(rows, ref):
    assert got["sites"] == list(SITES) and got["dropped"] == ["d"], got
    (err,) = got["errors"].values()
    assert line in err
    assert got["weights"] == pytest.approx(
        {s: v / sum(n.values()) for s, v in n.items()}, rel=1e-6)
    assert got["site_loss"] == pytest.approx(want["site_loss"], rel=1e-5, abs=1e-6)
  assert line in (tmp_path / "cluster" / "supernode_d.log").read_text()
  assert _files(roots["server"]) == ["glue/SST-2/dev.tsv"]
  # The last round's per-site evaluation ran at a, b, c on their node config roots (the
  # ClientApp's evaluate handler), = the simulation's; d, without rows, is missing.
  got_site = {k: v for k, v in rows[-1].items() if k.startswith("site/")}
  want_site = {k: v for k, v in ref[-1].items() if k.startswith("site/")}
  assert {k.split("/")[1] for k in want_site} == set(SITES)
  assert got_site == pytest.approx(want_site, rel=1e-4, abs=1e-5), rows[-1]
  assert rows[-1]["site_eval_missing"] == ["d"]


def test_own_rows_and_padding_by_hand():
  """A site's rows per task come from ITS sizes (proportional mixture: 300 and 100 rows give
  6 and 2 of 8; a site holding one task gives it all 8); the simulation pads a site's batch to
  the largest site's rows with copies of row 0 at example_weight 0."""
  import numpy as np
  from jmtl.defaults import base_config
  from jmtl.federated import loop
  c = base_config()
  c.data.batch_size, c.data.mixture = 8, "proportional"
  assert loop.own_rows(c, ["sst2", "cola"], {"sst2": 300, "cola": 100}) == {"sst2": 6,
                                                                            "cola": 2}
  assert loop.own_rows(c, ["sst2", "cola"], {"cola": 100}) == {"cola": 8}
  b = {"ids": np.arange(6).reshape(3, 2), "example_weight": np.ones(3, np.float32)}
  p = loop.pad_rows(b, 5)
  np.testing.assert_array_equal(p["ids"], [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]])
  np.testing.assert_array_equal(p["example_weight"], [1, 1, 1, 0, 0])
  assert loop.pad_rows(b, 3) is b


@pytest.mark.slow
def test_two_tasks_on_sites_with_their_own_sizes(tmp_path, own, data_dir):
  """Sites a (SST-2 and CoLA) and b (SST-2 only): `jmtl federated` (the mesh simulation) runs
  with each site's own rows per task (a: 6 + 2 of 8 by its sizes, b: 8 SST-2 rows; padded to one
  shape) and n_k = its own rows less 10 % held out, counted here."""
  roots, tok = own
  cola = (data_dir / "glue" / "CoLA" / "train.tsv").read_text().splitlines()
  d = roots["a"] / "glue" / "CoLA"
  d.mkdir(parents=True)
  (d / "train.tsv").write_text("\n".join(cola[:32]) + "\n")  # no header in CoLA
  dev = roots["server"] / "glue" / "CoLA"
  dev.mkdir(parents=True)
  (dev / "dev.tsv").write_text((data_dir / "glue" / "CoLA" / "dev.tsv").read_text())
  config = _config(tmp_path, roots, tok, extra=(
      '  c.tasks = ("sst2", "cola")\n'
      '  c.data.mixture = "proportional"\n'
      f'  c.fed.sites = (dict(name="a", data_dir={str(roots["a"])!r}),\n'
      f'                 dict(name="b", data_dir={str(roots["b"])!r}, tasks=("sst2",)))\n'
      '  c.fed.rounds = 1\n'))
  wd = tmp_path / "sim"
  out = subprocess.run(
      [sys.executable, "-m", "jmtl.cli", "federated", "--config", str(config), "--workdir",
       str(wd)], env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  (row,) = _rows(wd)
  n_a = _n_k(roots["a"]) + (32 - 3)  # CoLA: 32 rows, floor(3.2) = 3 held out
  n_b = _n_k(roots["b"])
  assert row["weights"] == pytest.approx({"a": n_a / (n_a + n_b), "b": n_b / (n_a + n_b)},
                                         rel=1e-6)
  assert all(math.isfinite(v) for v in row["site_loss"].values())
  # A Flower site's batches: its own rows per task, no rows of a task it does not hold.
  rc = {"problem": "jmtl.federated.flower:jmtl_problem", "config": str(config), "workdir": ""}
  a = flower._site(-2000, rc, "a")[0].batches(0, 0)[0]  # noqa: SLF001
  b = flower._site(-2001, rc, "b")[0].batches(1, 0)[0]  # noqa: SLF001
  assert {t: v["example_weight"].shape for t, v in a.items()} == {"sst2": (2, 6),
                                                                   "cola": (2, 2)}
  assert {t: v["example_weight"].shape for t, v in b.items()} == {"sst2": (2, 8)}


def test_launch_supernode_gives_its_data_dir_by_node_config():
  import shlex
  script = ROOT / "launch" / "flower.py"
  out = subprocess.run([sys.executable, str(script), "supernode", "--superlink", "h:9093",
                        "--site", "east", "--data-dir", "/data/east", "--dry-run"],
                       capture_output=True, text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  cmd = shlex.split(out.stdout.strip())
  assert cmd[cmd.index("--node-config") + 1] == 'site="east" data-dir="/data/east"'
  bad = subprocess.run([sys.executable, str(script), "supernode", "--superlink", "h:9093",
                        "--site", "east", "--data-dir", 'a"b', "--dry-run"],
                       capture_output=True, text=True, timeout=30)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert "--data-dir" in bad.stderr
