"""Data reads through `etils.epath`: local behaviour is the one of Python's own file reading."""

import csv

from etils import epath
from ml_collections import ConfigDict

from jmtl import config as config_lib
from jmtl.data import sources
from jmtl.data.tokenizer import Tokenizer
from jmtl.tasks import TsvSource


def test_tsv_newlines_as_csv_reads_them(tmp_path):
  """CRLF line ends, a trailing blank line and a BOM: the same rows as `csv` over
  `open(newline="")` (what the reader did before epath)."""
  body = "\ufeffsentence\tlabel\r\na \"quoted\" film\t1\r\nbad\t0\r\n\r\n"
  path = tmp_path / "t.tsv"
  path.write_bytes(body.encode("utf-8"))
  with open(path, encoding="utf-8-sig", newline="") as f:
    want = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r][1:]
  spec = TsvSource("t.tsv", "sentence", None, "label", label_values=("0", "1"))
  got = sources.read_tsv(epath.Path(path), spec, "classification", "t.tsv")
  assert [(r["text_a"], r["label"]) for r in got] == [(t, int(y)) for t, y in want]
  assert want == [["a \"quoted\" film", "1"], ["bad", "0"]]


def test_paths_are_epaths_and_bucket_uris_stay_uris(tmp_path):
  cfg = ConfigDict({"dir": str(tmp_path), "tfds_dir": "gs://bucket/tfds"})
  p = sources.source_path(TsvSource("glue/x.tsv", 0), cfg)
  assert isinstance(p, epath.Path) and str(p) == str(tmp_path / "glue" / "x.tsv")
  assert str(sources.data_root(ConfigDict({"dir": "gs://bucket/data"}))) == "gs://bucket/data"
  assert config_lib.is_bucket("gs://bucket/data") and not config_lib.is_bucket(str(tmp_path))
  assert config_lib.path_exists(tmp_path, "x") and not config_lib.path_exists(tmp_path / "n", "x")


def test_tokenizer_json_loads_through_epath(tmp_path):
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film"]))
  tok = Tokenizer.load(str(vocab))
  tok.save(tmp_path / "tokenizer.json")
  again = Tokenizer.load(epath.Path(tmp_path / "tokenizer.json"))
  assert again.vocab_size == tok.vocab_size == 7
  ids = again.encode("the film")
  assert ids == tok.encode("the film") and [5, 6] == [i for i in ids if i >= 5]  # vocab lines
