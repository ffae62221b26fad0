"""A path written `gs:/bucket/x` (one slash: a typo for gs://) is refused before any work, in
one line naming the flag or key, instead of becoming a local folder ./gs:/bucket/x."""

import pathlib

import pytest

from jmtl import cli
from jmtl.defaults import malformed_uri

TINY = str(pathlib.Path(__file__).parent / "configs" / "tiny_sst2.py")


def test_malformed_uri():
  assert malformed_uri("gs:/b/x") == "gs://"
  assert malformed_uri("s3:/b") == "s3://"
  for fine in ("gs://b/x", "/tmp/x", "runs/a", "C:/x", "./gs:/x", "a:b", ""):
    assert malformed_uri(fine) is None, fine


def _run(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(["jmtl", *argv])
  err = capsys.readouterr().err.strip().splitlines()
  return e.value.code, err


@pytest.mark.parametrize("argv, name", [
    (["train", "--config", TINY, "--workdir", "gs:/bucket/run"], "--workdir gs:/bucket/run"),
    (["eval", "--config", TINY, "--workdir", "gs:/bucket/run"], "--workdir gs:/bucket/run"),
    (["train", "--config", TINY, "--workdir", "run", "--config.data.dir=gs:/b/glue"],
     "'data.dir'"),
    (["data", "prepare", "--config", TINY, "--config.data.tfds_dir=gs:/b/tfds"],
     "'data.tfds_dir'"),
])
def test_refused_in_one_line_before_any_work(capsys, tmp_path, monkeypatch, argv, name):
  monkeypatch.chdir(tmp_path)
  code, err = _run(capsys, argv)
  assert code == 2 and len(err) == 1 and err[0].startswith("jmtl: error: ") and name in err[0], err
  assert not (tmp_path / "gs:").exists() and not list(tmp_path.iterdir())


def test_workdir_message_suggests_the_uri(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _, err = _run(capsys, ["train", "--config", TINY, "--workdir", "gs:/bucket/run"])
  assert "gs://bucket/run" in err[0]
