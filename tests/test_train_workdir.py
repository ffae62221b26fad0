"""Refusals and repairs on an existing workdir (found by trying to break a finished run):
a run cannot be shortened below its checkpoint, a broken W/tokenizer.json is named, `jmtl
eval` refuses a vocabulary that is not the checkpoint's, and an incomplete step directory left
by a kill during orbax's deletion of an old step is removed.

The runs that train use the session's JAX compilation cache (conftest.py). The refusals that end
before any work (a broken tokenizer file, another vocabulary) run `jmtl` in this process
(`faults.cli_in_process`: the same exit code and stderr); one refusal, the shortened run, is
checked on the `jmtl` process itself (its exit status and all of its stderr)."""

import json
import shutil

import pytest

import faults

pytestmark = pytest.mark.slow
STEPS = ["--config.train.steps=8", "--config.train.checkpoint_every=4",
         "--config.train.eval_every=0", "--config.train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def env(data_dir, jax_cache):
  """The subprocess environment with the session's JAX compilation cache (conftest.py)."""
  return faults.env(data_dir, cache=jax_cache)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env):
  w = tmp_path_factory.mktemp("finished") / "w"
  proc = faults.run(faults.cmd(w, *STEPS), env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return w


def _copy(finished, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(finished, w)
  return w


def _in_process(command, w, data_dir, capfd, monkeypatch, *extra):
  """`jmtl COMMAND --config TINY --workdir W STEPS... EXTRA...` in this process (a check that
  ends before any work: no interpreter start, no jax import per case)."""
  return faults.cli_in_process([command, "--config", str(faults.TINY), "--workdir", str(w),
                                *STEPS, *extra], capfd, monkeypatch,
                               {"JMTL_DATA_DIR": str(data_dir)})


def test_fewer_steps_than_the_checkpoint_is_refused(finished, tmp_path, env):
  """On the `jmtl` process itself: exit status 2, one line on all of its stderr."""
  w = _copy(finished, tmp_path)
  before = (w / "eval.json").read_bytes()
  proc = faults.run(faults.cmd(w, *STEPS, "--config.train.steps=6"), env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = faults.one_error_line(proc.stderr)
  assert "step 8" in line and "train.steps = 6" in line
  assert (w / "eval.json").read_bytes() == before


@pytest.mark.parametrize("content", ["garbage\n", ""])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_broken_tokenizer_file_is_named(finished, tmp_path, data_dir, content, command, capfd,
                                        monkeypatch):
  w = _copy(finished, tmp_path)
  (w / "tokenizer.json").write_text(content)
  proc = _in_process(command, w, data_dir, capfd, monkeypatch)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = faults.one_error_line(proc.stderr)
  assert "tokenizer.json" in line and "not a valid tokenizer file" in line


def test_eval_refuses_another_vocabulary(finished, tmp_path, data_dir, capfd, monkeypatch):
  w = _copy(finished, tmp_path)
  tok = json.loads((w / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  word = next(t for t in vocab if t.isalpha() and len(t) > 3)
  vocab[word + "zz"] = vocab.pop(word)  # still a valid file, another vocabulary
  (w / "tokenizer.json").write_text(json.dumps(tok))
  before = (w / "eval.json").read_bytes()
  proc = _in_process("eval", w, data_dir, capfd, monkeypatch)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = faults.one_error_line(proc.stderr)
  assert "vocabulary differs" in line
  assert (w / "eval.json").read_bytes() == before


def test_incomplete_step_directory_is_removed(finished, tmp_path, env):
  w = _copy(finished, tmp_path)
  broken = w / "checkpoints" / "4"
  (broken / "_CHECKPOINT_METADATA").unlink()  # what a kill during orbax's deletion leaves
  proc = faults.run(faults.cmd(w, *STEPS, "--config.train.steps=12"), env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "removing" in proc.stderr and str(broken) in proc.stderr
  assert faults.checkpoint_steps(w) == [8, 12]


def test_mixed_rows_that_do_not_split_over_the_shards_are_one_line(tmp_path, data_dir):
  """Proportional mixing of SST-2 (67k rows) and RTE (2.5k) in 16 rows gives 15 / 1: RTE's one
  row cannot be split over 2 batch shards (the preflight cannot tell without the data)."""
  proc = faults.run(faults.cmd(tmp_path / "w", "--config.tasks=sst2,rte",
                               "--config.data.mixing=mixed", "--config.data.max_train_examples=0",
                               "--config.train.steps=2"), faults.env(data_dir))
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = faults.one_error_line(proc.stderr)
  assert "'rte': 1" in line and "2 batch shards" in line
