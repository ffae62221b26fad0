"""Bad configs, overrides and paths: each gives one line `jmtl: error: ...` and exit code 2."""

import os
import pathlib
import subprocess
import sys

import pytest

import faults

from jmtl import cli
from jmtl import config as config_lib
from jmtl.defaults import base_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"


_error_line = faults.cli_error_line


def _write(tmp_path, body: str) -> str:
  p = tmp_path / "cfg.py"
  p.write_text(body)
  return str(p)


@pytest.mark.parametrize("override, needle", [
    ("--config.train.stpes=5", "'train.stpes' is unknown"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.tasks=('nope',)", "unknown task 'nope'"),
    ("--config.optim.name=adamx", "'optim.name' = 'adamx' is not one of"),
    ("--config.model.trunk=gru", "'model.trunk' = 'gru' is not one of: transformer, bilstm"),
    ("--config.data.mixture=random", "'data.mixture'"),
    ("--config.train.on_nonfinite=ignore", "'train.on_nonfinite'"),
    ("--config.train.steps=-3", "'train.steps' = -3 must be >= 1"),
    ("--config.model.heads=3", "'model.heads' = 3 must divide model.d_model"),
    ("--config.mesh.data=3", "does not match"),
    ("--config.mesh.tensor=0", "'mesh.tensor' = 0"),
    ("--config.data.tokenizer=/nonexistent/tok.json", "'data.tokenizer': file not found"),
    ("--config.model.dropout=1.5", "'model.dropout' = 1.5 must be in [0, 1)"),
    ("--config.data.max_len=1024", "exceeds model.max_len"),
])
def test_bad_override(capsys, tmp_path, override, needle):
  line = _error_line(capsys, ["train", "--config", str(TINY), "--workdir", str(tmp_path), override])
  assert needle in line, line


def test_missing_config_file(capsys, tmp_path):
  line = _error_line(capsys, ["train", "--config", str(tmp_path / "nope.py"), "--workdir", "w"])
  assert "file not found" in line and "nope.py" in line


def test_config_file_sets_unknown_key(capsys, tmp_path):
  path = _write(tmp_path, "from jmtl.defaults import base_config\n"
                "def get_config():\n  c = base_config()\n  c.unlock()\n  c.train.stpes = 3\n  return c\n")
  assert "'train.stpes' is unknown" in _error_line(capsys, ["train", "--config", path, "--workdir", "w"])


def test_config_file_without_get_config(capsys, tmp_path):
  path = _write(tmp_path, "x = 1\n")
  assert "defines no get_config()" in _error_line(capsys, ["train", "--config", path, "--workdir", "w"])


def test_config_file_that_raises(capsys, tmp_path):
  path = _write(tmp_path, "def get_config():\n  raise RuntimeError('boom')\n")
  line = _error_line(capsys, ["train", "--config", path, "--workdir", "w"])
  assert "get_config() failed: RuntimeError: boom" in line


def test_missing_data_file(capsys, tmp_path):
  line = _error_line(capsys, ["train", "--config", str(TINY), "--workdir", str(tmp_path / "w"),
                              f"--config.data.dir={tmp_path}"])
  assert "task 'sst2': data file not found" in line and str(tmp_path) in line


def test_missing_workdir_and_unknown_command(capsys):
  assert "needs --workdir" in _error_line(capsys, ["train", "--config", str(TINY)])
  assert "unknown command 'trian'" in _error_line(capsys, ["trian", "--config", str(TINY)])
  assert "unknown command line flag 'wrkdir'" in _error_line(
      capsys, ["train", "--config", str(TINY), "--wrkdir", "x"]).lower()


def test_eval_without_checkpoints(capsys, tmp_path):
  line = _error_line(capsys, ["eval", "--config", str(TINY), "--workdir", str(tmp_path)])
  assert "no checkpoints/ directory" in line


def test_explicit_rates_must_match_tasks():
  cfg = base_config()
  cfg.tasks = ("sst2", "mrpc")
  cfg.data.mixture = "explicit"
  cfg.data.rates = {"sst2": 1.0}
  with pytest.raises(config_lib.ConfigError, match=r"'data.rates'.*missing \['mrpc'\]"):
    config_lib.validate(cfg, check_files=False)


def test_rule_with_unknown_mesh_axis():
  cfg = base_config()
  cfg.mesh.rules = (("embed", "model"),)
  with pytest.raises(config_lib.ConfigError,
                     match=r"'mesh.rules' = .*'model'.* must be pairs .* axes data, fsdp, tensor"):
    config_lib.validate(cfg, check_files=False)


def test_batch_must_divide_data_shards():
  cfg = base_config()
  cfg.data.batch_size = 12
  with pytest.raises(config_lib.ConfigError, match="divisible by mesh data x fsdp = 8"):
    config_lib.validate(cfg, device_count=8, check_files=False)


def test_good_config_validates_and_completes():
  cfg = config_lib.load_config_file(TINY)
  out = config_lib.validate(cfg, device_count=8, check_files=False)
  assert out.train.steps == cfg.train.steps
  assert set(config_lib._flatten(out)) == set(config_lib._flatten(base_config()))


def test_subprocess_exit_code_and_single_line(tmp_path):
  """The installed console entry point: exit 2, one stderr line, no traceback."""
  env = dict(os.environ)
  proc = subprocess.run([sys.executable, "-m", "jmtl.cli", "train", "--config", str(TINY),
                         "--workdir", str(tmp_path), "--config.optim.name=adamx"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("jmtl: error:"), proc.stderr


def test_report_without_sweep(capsys, tmp_path):
  assert "no sweep.json" in _error_line(capsys, ["report", "optim", "--workdir", str(tmp_path)])
  assert "jmtl report needs one of: optim" in _error_line(capsys, ["report", "--workdir", "x"])


def _exit(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", *argv])
  out = capsys.readouterr()
  return exit_info.value.code, out.out, out.err


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_goes_to_stdout_with_exit_0(capsys, flag):
  code, out, err = _exit(capsys, [flag])
  assert (code, err) == (0, "")
  assert out.startswith("usage: jmtl train") and all(c in out for c in cli.COMMANDS)


@pytest.mark.parametrize("cmd, flags", [("train", ("--config", "--workdir")),
                                        ("bench", ("--config", "--json", "--out")),
                                        ("data", ("--config",))])
def test_command_help_lists_its_flags(capsys, cmd, flags):
  code, out, err = _exit(capsys, [cmd, "--help"])
  assert (code, err) == (0, "")
  assert out.startswith(f"usage: jmtl {cmd} ")
  assert all(f in out for f in flags)
  assert "--json" not in out if cmd == "train" else True


def test_version(capsys):
  code, out, err = _exit(capsys, ["--version"])
  assert (code, out, err) == (0, "jmtl 0.1.0\n", "")


def test_unknown_command_and_no_command(capsys):
  assert "unknown command 'trian'" in _error_line(capsys, ["trian"])
  assert "no command" in _error_line(capsys, [])


@pytest.mark.parametrize("key, text, want", [
    ("data.length_buckets", "64", (64,)),
    ("data.length_buckets", "(32)", (32,)),
    ("data.length_buckets", "(32, 64)", (32, 64)),
    ("tasks", "sst3", ("sst3",)),
    ("tasks", "sst2,mrpc", ("sst2", "mrpc")),
    ("tasks", "('sst2', 'mrpc')", ("sst2", "mrpc")),
    ("bench.federated.compress", ",int8", ("", "int8")),  # '' = float32: kept, not dropped
    ("tasks", "sst2,", ("sst2", "")),  # a stray comma reaches the key's check
    ("sweep.seeds", "[3, 4, 5]", (3, 4, 5)),
    ("optim.eps", "1e-6", 1e-6),
    ("data.lowercase", "False", False),
])
def test_override_parsing(key, text, want):
  cfg = base_config()
  cli.apply_overrides(cfg, [f"--config.{key}={text}"])
  got = cfg
  for part in key.split("."):
    got = got[part]
  assert got == want and type(got) is type(want)


@pytest.mark.parametrize("override, needle", [
    ("--config.train.steps=1e3", "config key 'train.steps': cannot parse '1e3' as int"),
    ("--config.data.lowercase=maybe", "'data.lowercase': cannot parse 'maybe' as bool"),
    ("--config.data.rates=3", "config key 'data.rates': '3' is not a dict literal"),
    ("--config.sweep.lr_centres=((", "config key 'sweep.lr_centres': cannot parse"),
])
def test_unparsable_override_is_one_line(capsys, tmp_path, override, needle):
  line = _error_line(capsys, ["train", "--config", str(TINY), "--workdir", str(tmp_path), override])
  assert needle in line and "ast." not in line, line


def test_every_key_is_declared_with_a_meaning_and_numeric_keys_with_a_range():
  from jmtl.defaults import KEYS
  assert set(KEYS) == set(config_lib._flatten(base_config()))
  for name, key in KEYS.items():
    assert key.help, name
    if key.type in (int, float):
      assert key.check is not None, f"{name} has no range"
      assert key.check[0](key.default), f"{name}: default {key.default!r} out of its own range"
    if key.choices is not None:
      assert key.default in key.choices, name


@pytest.mark.parametrize("argv, flag", [
    (["train", "--config", str(TINY), "--workdir", "{w}", "--topology", "v5e-16"], "--topology"),
    (["train", "--config", str(TINY), "--workdir", "{w}", "--json"], "--json"),
    (["eval", "--config", str(TINY), "--workdir", "{w}", "--out", "o.json"], "--out"),
    (["federated", "--config", str(TINY), "--workdir", "{w}", "--runs", "{w}"], "--runs"),
    (["data", "--config", str(TINY), "--workdir", "{w}"], "--workdir"),
    (["data", "prepare", "--config", str(TINY), "--json"], "--json"),
    (["bench", "step", "--config", str(TINY), "--workdir", "{w}"], "--workdir"),
    (["compile", "--config", str(TINY), "--workdir", "{w}"], "--workdir"),
    (["report", "optim", "--workdir", "{w}", "--runs", "{w}"], "--runs"),
    (["report", "mtl", "--runs", "{w}", "--workdir", "{w}"], "--workdir"),
    (["report", "optim", "--workdir", "{w}", "--config", str(TINY)], "--config"),
    (["report", "mtl", "--runs", "{w}", "--config.train.steps=3"], "--config.train.steps"),
], ids=["train-topology", "train-json", "eval-out", "federated-runs", "data-workdir",
        "prepare-json", "bench-workdir", "compile-workdir", "report-optim-runs",
        "report-mtl-workdir", "report-config", "report-override"])
def test_a_flag_the_command_does_not_take_is_refused_naming_it(capsys, tmp_path, argv, flag):
  """All commands parse one shared flag set: a flag outside the command's own (those its
  --help lists) was parsed and then ignored; it must be one line naming the flag, exit 2,
  before any work."""
  workdir = tmp_path / "w"
  line = _error_line(capsys, [a.format(w=workdir) for a in argv])
  assert f"flag {flag} does not apply to jmtl {argv[0]}" in line, line
  assert not workdir.exists()  # nothing ran (a train run took --topology and trained here)


def test_flags_of_each_command_are_still_accepted(capsys, tmp_path):
  """The refusal above does not touch the flags a command takes: `report optim` with --out
  gets as far as its own check (no sweep.json in the workdir)."""
  line = _error_line(capsys, ["report", "optim", "--workdir", str(tmp_path), "--out",
                              str(tmp_path / "o")])
  assert "no sweep.json" in line, line


def test_backend_flag_is_the_fed_backend_key_and_only_for_federated(capsys, tmp_path):
  """`jmtl federated --backend NAME` (the issue's command line) and `jmtl eval --backend NAME`
  set fed.backend, after and over any --config.fed.backend; other commands refuse it in one
  line."""
  fed = str(REPO / "tests" / "configs" / "tiny_fed.py")
  _, _, config, _ = cli.parse(["jmtl", "federated", "--config", fed, "--workdir",
                               str(tmp_path), "--config.fed.backend=shard_map",
                               "--backend", "pmap"])
  assert config.fed.backend == "pmap"
  _, _, config, _ = cli.parse(["jmtl", "federated", "--config", fed, "--workdir",
                               str(tmp_path)])
  assert config.fed.backend == "shard_map"  # the default when the flag is absent
  _, _, config, _ = cli.parse(["jmtl", "eval", "--config", fed, "--workdir", str(tmp_path),
                               "--backend", "flower"])  # evaluating a Flower workdir
  assert config.fed.backend == "flower"
  line = _error_line(capsys, ["train", "--config", str(TINY), "--workdir", str(tmp_path / "w"),
                              "--backend", "pmap"])
  assert "flag --backend does not apply to jmtl train" in line, line
  line = _error_line(capsys, ["federated", "--config", fed, "--workdir", str(tmp_path / "w"),
                              "--backend", "ray"])
  assert "fed.backend" in line and "ray" in line, line
