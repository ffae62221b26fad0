"""Break-it review of the Flower backend's own-data sites, per-site evaluation and async
FedBuff (issue 17): the cases that failed before their fix.

1. A malformed training file at one site under fed.partition = "own" (bad header, a wrong
   column count, a label outside the task's labels at line N, bytes that are not UTF-8, a
   directory where the file should be): every site's file has the same relative name
   (glue/SST-2/train.tsv), so the one line must name the site and its root, not only
   `glue/SST-2/train.tsv:7` (before the fix it did not; for non-UTF-8 bytes it named nothing).
"""

import subprocess
import sys

import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_own_data import _config, _env, own  # noqa: E402,F401
from test_flower_parts import _task_identity  # noqa: E402,F401

from jmtl import config as config_lib  # noqa: E402
from jmtl import tasks as task_registry  # noqa: E402
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
