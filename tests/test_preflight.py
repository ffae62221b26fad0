"""The preflight: every mistake the config, its files and the registries reveal stops the command
before any work with exit code 2 and one stderr line naming the key; OS errors never traceback."""

import errno
import json
import pathlib
import subprocess
import sys

import pytest

from jmtl import cli
from jmtl.config import ConfigError
from jmtl.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
VOCAB = REPO / "tests" / "fixtures" / "data" / "vocab.txt"  # 20 tokens


class _Calls:
  """Stand-ins for the commands' work; record what they were called with."""

  def __init__(self):
    self.configs = []

  def train(self, config, workdir):
    self.configs.append(config)
    return {}


@pytest.fixture
def work(monkeypatch):
  """Patches the train loop, evaluation and the sweep: they record their calls (and would
  have started the work the preflight must come before)."""
  from jmtl.study import sweep
  from jmtl.train import loop
  calls = _Calls()
  monkeypatch.setattr(loop, "train", calls.train)
  monkeypatch.setattr(loop, "evaluate_checkpoint", lambda c, w: calls.train(c, w))
  monkeypatch.setattr(sweep, "run_sweep", lambda c, w: calls.train(c, w))
  return calls


def _cli(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", *argv])
  out = capsys.readouterr()
  return exit_info.value.code, out.out, out.err


def _error_line(capsys, argv, code: int = 2) -> str:
  got, _, err = _cli(capsys, argv)
  lines = err.strip().splitlines()
  assert got == code, err
  assert len(lines) == 1, lines
  assert lines[0].startswith("jmtl: error: ") and "Traceback" not in err
  return lines[0]


def _train(tmp_path, *overrides):
  return ["train", "--config", str(TINY), "--workdir", str(tmp_path / "w"), *overrides]


@pytest.mark.parametrize("override, needle", [
    ("--config.tasks=sst3", "config key 'tasks': unknown task 'sst3'; known tasks: "),
    ("--config.optim.plateau_factor=2.0", "'optim.plateau_factor' = 2.0 must be in (0, 1)"),
    ("--config.optim.eps=0", "'optim.eps' = 0.0 must be > 0"),
    ("--config.seed=-1", "'seed' = -1 must be >= 0"),
    ("--config.data.split_seed=-2", "'data.split_seed' = -2 must be >= 0"),
    ("--config.optim.b2=1.0", "'optim.b2' = 1.0 must be in [0, 1)"),
    ("--config.optim.raise_factor=0.5", "'optim.raise_factor' = 0.5 must be >= 1"),
    ("--config.optim.min_scale=2.0", "'optim.min_scale' = 2.0 must be <= optim.max_scale = 1.0"),
    ("--config.optim.late_decay_rate=0", "'optim.late_decay_rate' = 0.0 must be in (0, 1]"),
    ("--config.eval.n_best=0", "'eval.n_best' = 0 must be >= 1"),
    ("--config.model.layer_norm_eps=0", "'model.layer_norm_eps' = 0.0 must be > 0"),
    ("--config.data.length_buckets=16", "'data.length_buckets' = (16,) must have a largest "
                                        "bucket >= data.max_len = 32"),
    ("--config.train.val_metric=sst2/acc", "'train.val_metric' = 'sst2/acc' is not a metric"),
    ("--config.train.val_metric=mrpc/f1", "'train.val_metric' = 'mrpc/f1'"),
])
def test_bad_value_stops_before_work(capsys, tmp_path, work, override, needle):
  line = _error_line(capsys, _train(tmp_path, override))
  assert needle in line, line
  assert not work.configs  # nothing started
  assert not (tmp_path / "w").exists()  # and nothing was written


def test_unknown_task_is_one_plain_line(capsys, tmp_path, work):
  line = _error_line(capsys, _train(tmp_path, "--config.tasks=sst3"))
  assert "ast." not in line and "<" not in line
  assert "sst2" in line.split("known tasks: ")[1]


@pytest.mark.parametrize("text, want", [("64", (64,)), ("(32)", (32,)), ("(32, 64)", (32, 64)),
                                        ("[32,64]", (32, 64))])
def test_length_buckets_one_element_is_a_tuple(capsys, tmp_path, work, text, want):
  code, _, err = _cli(capsys, _train(tmp_path, f"--config.data.length_buckets={text}"))
  assert code == 0, err
  assert tuple(work.configs[0].data.length_buckets) == want


def test_good_config_reaches_the_work(capsys, tmp_path, work):
  """The positive control of the patched work: a good config does get to train."""
  code, _, err = _cli(capsys, _train(tmp_path, "--config.tasks=sst2,mrpc"))
  assert code == 0, err
  assert work.configs and tuple(work.configs[0].tasks) == ("sst2", "mrpc")


def test_init_from_empty_directory(capsys, tmp_path, work):
  (tmp_path / "ckpt").mkdir()
  line = _error_line(capsys, _train(tmp_path, f"--config.model.init_from={tmp_path / 'ckpt'}"))
  assert "'model.init_from'" in line and "config.json" in line and "model.safetensors" in line
  assert not work.configs


def test_init_from_architecture_mismatch(capsys, tmp_path, work):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  (ckpt / "model.safetensors").write_bytes(b"")
  (ckpt / "config.json").write_text(json.dumps({
      "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 128, "max_position_embeddings": 64, "type_vocab_size": 2,
      "layer_norm_eps": 1e-12, "vocab_size": 20}))
  line = _error_line(capsys, _train(tmp_path, f"--config.model.init_from={ckpt}"))
  assert "'model.d_ff' = 64 does not match the checkpoint" in line
  line = _error_line(capsys, _train(tmp_path, f"--config.model.init_from={ckpt}",
                                    "--config.model.d_ff=128", "--config.model.layers=2",
                                    "--config.model.init_layers=2"))
  assert "'model.init_layers' = 2: the checkpoint" in line and "only 1 encoder layers" in line
  line = _error_line(capsys, _train(tmp_path, f"--config.model.init_from={ckpt}",
                                    "--config.model.d_ff=128"))
  assert "'data.tokenizer' is empty: model.init_from needs the checkpoint's own vocabulary" in line
  assert not work.configs
  code, _, err = _cli(capsys, _train(tmp_path, f"--config.model.init_from={ckpt}",
                                     "--config.model.d_ff=128", f"--config.data.tokenizer={VOCAB}"))
  assert code == 0 and len(work.configs) == 1, err  # a matching checkpoint passes


def test_non_utf8_vocab(capsys, tmp_path, work):
  vocab = tmp_path / "vocab.txt"
  vocab.write_bytes(b"[PAD]\n[UNK]\ncaf\xe9\n")
  line = _error_line(capsys, _train(tmp_path, f"--config.data.tokenizer={vocab}"))
  assert "'data.tokenizer'" in line and str(vocab) in line and "UTF-8" in line
  assert not work.configs


def test_mixed_rows_not_divisible_by_data_shards(capsys, tmp_path, work):
  mixed = ("--config.tasks=sst2,mrpc", "--config.data.mixing=mixed")
  line = _error_line(capsys, _train(tmp_path, *mixed, "--config.data.mixture=uniform",
                                    "--config.data.batch_size=24"))
  assert "'data.batch_size' = 24" in line and "8 batch shards" in line
  line = _error_line(capsys, _train(tmp_path, *mixed, "--config.data.batch_size=8"))
  assert "'data.batch_size' = 8 cannot give each of 2 tasks" in line
  assert not work.configs


def test_workdir_is_a_file(capsys, tmp_path, work):
  (tmp_path / "w").write_text("not a directory")
  line = _error_line(capsys, _train(tmp_path))
  assert "--workdir" in line and str(tmp_path / "w") in line
  assert not work.configs


def test_squad_doc_stride_must_be_below_max_len(capsys, tmp_path, work):
  line = _error_line(capsys, _train(tmp_path, "--config.tasks=squad"))
  assert "'data.doc_stride' = 64 must be < data.max_len = 32" in line


@pytest.mark.parametrize("exc, code, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/w/checkpoints"), 1,
     "No space left on device (/runs/w/checkpoints)"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/w/metrics.jsonl"), 2,
     "Permission denied (/runs/w/metrics.jsonl)"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/w/eval.json"), 2,
     "Is a directory (/runs/w/eval.json)"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/w/x"), 2, "Not a directory"),
])
def test_os_errors_are_one_line(capsys, tmp_path, monkeypatch, exc, code, needle):
  from jmtl.train import loop

  def fail(config, workdir):
    raise exc
  monkeypatch.setattr(loop, "train", fail)
  line = _error_line(capsys, _train(tmp_path), code=code)
  assert line == f"jmtl: error: {needle}" or needle in line, line


def _data_dir(tmp_path, real_root, dev_lines):
  """A tmp data root with SST-2 train (30 real rows) and the given dev rows; no test.tsv."""
  real = real_root / "glue" / "SST-2" / "train.tsv"
  root = tmp_path / "data"
  (root / "glue" / "SST-2").mkdir(parents=True)
  with open(real, encoding="utf-8") as f:
    head = [next(f) for _ in range(31)]
  (root / "glue" / "SST-2" / "train.tsv").write_text("".join(head), encoding="utf-8")
  (root / "glue" / "SST-2" / "dev.tsv").write_text(
      "sentence\tlabel\n" + "".join(l + "\n" for l in dev_lines), encoding="utf-8")
  return root


def test_data_malformed_row_names_file_and_line(capsys, tmp_path, data_dir):
  root = _data_dir(tmp_path, data_dir, ["a fine film\t1", "no label column here", "dull\t0"])
  line = _error_line(capsys, ["data", "--config", str(TINY), f"--config.data.dir={root}"])
  assert "glue/SST-2/dev.tsv:3:" in line and "expected 2 columns, got 1" in line


def test_data_missing_test_split_and_blank_trailing_line(capsys, tmp_path, data_dir):
  root = _data_dir(tmp_path, data_dir, ["a fine film\t1", "dull\t0", ""])  # ends in a blank line
  code, out, err = _cli(capsys, ["data", "--config", str(TINY), f"--config.data.dir={root}"])
  assert code == 0, err
  assert "sst2 (classification): train 30, validation 2, test: not present" in out


def test_data_squad_question_without_id(capsys, tmp_path):
  root = tmp_path / "data"
  (root / "squad").mkdir(parents=True)
  qa = lambda i: {"question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}],
                  **({"id": f"q{i}"} if i != 2 else {})}
  (root / "squad" / "dev-v1.1.json").write_text(json.dumps({"data": [{
      "title": "Notes", "paragraphs": [{"context": "Ann wrote it.", "qas": [qa(1), qa(2)]}]}]}))
  argv = ["data", "--config", str(TINY), f"--config.data.dir={root}", "--config.tasks=squad_dev",
          "--config.data.doc_stride=16"]
  line = _error_line(capsys, argv)
  assert "squad/dev-v1.1.json: question 2 of article 'Notes' has no id" in line
  code, out, err = _cli(capsys, [*argv, "--config.data.bad_rows=skip"])
  assert code == 0, err
  assert "squad_dev (span_qa): validation 1" in out


def test_preflight_api_returns_completed_config(tmp_path):
  from jmtl import preflight
  cfg = load_config_file(TINY)
  out = preflight.run(cfg, "train", str(tmp_path / "w"))
  assert out.train.steps == cfg.train.steps and out.optim.eps == 1e-8
  with pytest.raises(ConfigError, match="'train.val_metric' = 'sst2/f1'"):
    preflight.check_val_metric("sst2/f1", ["sst2"])
  preflight.check_val_metric("squad/f1", ["squad"])  # output name of squad_f1
  assert not (tmp_path / "w").exists()


def test_subprocess_bad_value_and_version(tmp_path):
  """The module entry point: exit 2 with one line, and --version on stdout with exit 0."""
  argv = [sys.executable, "-m", "jmtl.cli", *_train(tmp_path, "--config.optim.eps=0")]
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "jmtl: error: config key 'optim.eps' = 0.0 must be > 0"]
  proc = subprocess.run([sys.executable, "-m", "jmtl.cli", "--version"], capture_output=True,
                        text=True, cwd=REPO, timeout=120)
  assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "jmtl 0.1.0", "")
