"""Sources: real-data row counts, deterministic splits, file-format quirks and bad-row policy."""

import json
import logging
import pathlib

import pytest
from ml_collections import ConfigDict

from jmtl import tasks
from jmtl.data import sources
from jmtl.tasks import JsonlSource, Task, TextFolderSource, TsvSource

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


def _cfg(root, **kw):
  c = ConfigDict({"dir": str(root), "tfds_dir": "", "bad_rows": "error", "split_seed": 0,
                  "max_train_examples": 0, "max_eval_examples": 0})
  c.update(kw)
  return c


@pytest.mark.parametrize("name,split,count", [
    ("sst2", "validation", 872), ("cola", "validation", 1043), ("mrpc", "validation", 408),
    ("rte", "validation", 277), ("stsb", "validation", 1500), ("qnli", "validation", 5463),
    ("wnli", "validation", 71), ("cola", "train", 8551), ("mrpc", "train", 3668),
    ("squad_dev", "validation", 10570), ("dialogsum", "test", 500), ("scitldr", "validation", 619)])
def test_row_counts(data_dir, name, split, count):
  assert len(sources.load_records(name, split, _cfg(data_dir))) == count


def test_glue_quirks(data_dir):
  cfg = _cfg(data_dir)
  cola = sources.load_records("cola", "validation", cfg)  # no header row: row 0 is data
  assert cola[0] == {"id": "0", "text_a": "The sailors rode the breeze clear of the rocks.",
                     "text_b": None, "label": 1}
  assert sum(r["label"] for r in cola) == 721  # PROVENANCE: 1: 721
  mrpc = sources.load_records("mrpc", "validation", cfg)  # BOM before the "Quality" header
  assert sum(r["label"] for r in mrpc) == 279
  assert mrpc[0]["text_b"].startswith('"The foodservice pie')  # bare quote kept (QUOTE_NONE)
  rte = sources.load_records("rte", "validation", cfg)
  assert sum(r["label"] == 0 for r in rte) == 146  # entailment = class 0
  stsb = sources.load_records("stsb", "validation", cfg)
  assert stsb[0]["label"] == 5.0 and all(0.0 <= r["label"] <= 5.0 for r in stsb)
  test = sources.load_records("sst2", "test", cfg)
  assert len(test) == 1821 and {r["label"] for r in test} == {-1}


def test_squad_article_split(data_dir):
  cfg = _cfg(data_dir)
  full = sources.load_records("squad_dev", "validation", cfg)
  parts = {s: sources.load_records("squad", s, cfg) for s in ("train", "validation", "test")}
  ids = [r["id"] for recs in parts.values() for r in recs]
  assert len(ids) == len(set(ids)) == 10570
  assert set(ids) == {r["id"] for r in full}
  titles = {s: {r["title"] for r in recs} for s, recs in parts.items()}
  assert [len(titles[s]) for s in ("train", "validation", "test")] == [38, 5, 5]
  assert not (titles["train"] & titles["validation"] or titles["train"] & titles["test"]
              or titles["validation"] & titles["test"])
  # Deterministic for a seed, different for another seed.
  again = sources.load_records("squad", "test", cfg)
  assert [r["id"] for r in again] == [r["id"] for r in parts["test"]]
  other = sources.load_records("squad", "test", _cfg(data_dir, split_seed=1))
  assert {r["title"] for r in other} != titles["test"]


def test_summarization_fields(data_dir):
  cfg = _cfg(data_dir)
  test = sources.load_records("dialogsum", "test", cfg)
  assert all(len(r["references"]) == 3 and r["target"] == r["references"][0] for r in test)
  dev = sources.load_records("scitldr", "validation", cfg)
  assert sum(len(r["references"]) for r in dev) / len(dev) == pytest.approx(2.35, abs=0.01)
  assert all(isinstance(r["source"], str) for r in dev)


def test_bbc_tasks_share_split():
  cfg = _cfg("")
  seen = {}
  for split in ("train", "validation", "test"):
    topic = sources.load_records("bbc_topic", split, cfg)
    head = sources.load_records("bbc_headline", split, cfg)
    assert [r["id"] for r in topic] == [r["id"] for r in head]
    seen[split] = {r["id"] for r in topic}
  assert [len(seen[s]) for s in ("train", "validation", "test")] == [1780, 222, 223]
  assert len(set().union(*seen.values())) == 2225
  allrec = {r["id"]: r for s in seen for r in sources.load_records("bbc_topic", s, cfg)}
  counts = [sum(r["label"] == k for r in allrec.values()) for k in range(5)]
  assert counts == [510, 386, 417, 511, 401]
  # sports/199.txt is not UTF-8 (0xA3 pound sign in Windows-1252).
  assert "\u00a315.8m" in allrec["sports/199"]["text_a"]
  head = {r["id"]: r for r in sources.load_records("bbc_headline", "validation", cfg)}
  some = next(iter(head.values()))
  assert "\n" not in some["target"] and some["target"] not in some["source"][:len(some["target"])]


def test_bad_rows_policy(caplog):
  task = Task("bad", "classification", 2, ("accuracy",),
              {"train": TsvSource("glue/BAD/train.tsv", "sentence", None, "label",
                                  label_values=("0", "1"))})
  with pytest.raises(ValueError, match=r"^glue/BAD/train\.tsv:4: expected 2 columns, got 3$"):
    sources.load_records(task, "train", _cfg(FIXTURES))
  with caplog.at_level(logging.WARNING):
    recs = sources.load_records(task, "train", _cfg(FIXTURES, bad_rows="skip"))
  assert [r["id"] for r in recs] == ["0", "1", "3"]
  assert recs[1]["text_a"] == 'he said "hi' and [r["label"] for r in recs] == [1, 0, 1]
  assert "skipped 1 malformed rows" in caplog.text and "train.tsv:4" in caplog.text


def test_jsonl_references_and_bad_rows():
  spec = JsonlSource("summ.jsonl", "src", ("tgt",), id="id")
  task = Task("summ", "seq2seq", 0, ("rouge1",), {"train": spec})
  with pytest.raises(ValueError, match=r"^summ\.jsonl:3: invalid JSON"):
    sources.load_records(task, "train", _cfg(FIXTURES))
  recs = sources.load_records(task, "train", _cfg(FIXTURES, bad_rows="skip"))
  assert recs == [
      {"id": "x1", "source": "First sentence. Second one.", "target": "ref one",
       "references": ["ref one", "ref two"]},
      {"id": "x2", "source": "plain source", "target": "only ref", "references": ["only ref"]}]


def test_text_folder(tmp_path):
  for label, name, data in [("b", "1.txt", b"Head B\n\nbody \xa3 one"),
                            ("a", "2.txt", "Head A\nbody two".encode()),
                            ("a", "1.txt", "Héad\n\nbody".encode())]:
    (tmp_path / "docs" / label).mkdir(parents=True, exist_ok=True)
    (tmp_path / "docs" / label / name).write_bytes(data)
  cls = Task("tf", "classification", 2, ("accuracy",), {"all": TextFolderSource("docs")})
  recs = sources.load_records(cls, "all", _cfg(tmp_path))
  assert [(r["id"], r["label"]) for r in recs] == [("a/1", 0), ("a/2", 0), ("b/1", 1)]
  assert recs[2]["text_a"] == "Head B\n\nbody \u00a3 one" and recs[0]["text_a"].startswith("Héad")
  hl = Task("hl", "seq2seq", 0, ("rouge1",), {"all": TextFolderSource("docs", mode="headline")})
  recs = sources.load_records(hl, "all", _cfg(tmp_path))
  assert (recs[1]["source"], recs[1]["target"]) == ("body two", "Head A")


def test_missing_files_and_unknown_names(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"glue/SST-2/dev\.tsv.*JMTL_DATA_DIR"):
    sources.load_records("sst2", "validation", _cfg(tmp_path))
  assert sources.check_task_files("rte", _cfg(tmp_path), ["validation"]) == [
      str(tmp_path / "glue" / "RTE" / "dev.tsv")]
  assert sources.check_task_files("bbc_topic", _cfg(tmp_path)) == []
  assert sources.check_task_files("cola", _cfg(tmp_path, eval_split="test")) == [
      str(tmp_path / "glue" / "CoLA" / f) for f in ("train.tsv", "test.tsv")]
  assert sources.check_task_files("squad_dev", _cfg(tmp_path)) == [
      str(tmp_path / "squad" / "dev-v1.1.json")]
  with pytest.raises(KeyError, match="known tasks: .*sst2"):
    tasks.get_task("sst3")
  with pytest.raises(KeyError, match="no split 'dev'"):
    sources.load_records("sst2", "dev", _cfg(tmp_path))


def test_check_task_files_real(data_dir):
  assert sources.check_task_files("sst2", _cfg(data_dir)) == []
  assert sources.check_task_files("qnli", _cfg(data_dir)) == [
      str(data_dir / "glue" / "QNLI" / "train.tsv")]


def test_caps_keep_seeded_subset(data_dir):
  cfg = _cfg(data_dir, max_train_examples=50, max_eval_examples=20)
  train = sources.load_records("rte", "train", cfg)
  dev = sources.load_records("rte", "validation", cfg)
  assert len(train) == 50 and len(dev) == 20
  ids = [int(r["id"]) for r in train]
  assert ids == sorted(ids) and ids != list(range(50))
  assert ids == [int(r["id"]) for r in sources.load_records("rte", "train", cfg)]


def test_registry_metrics():
  want = {"sst2": ("accuracy",), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
          "cola": ("mcc",), "stsb": ("pearson", "spearman"), "squad": ("exact_match", "squad_f1"),
          "dialogsum": ("rouge1", "rouge2", "rougeL", "rougeLsum")}
  for name, metrics in want.items():
    assert tasks.get_task(name).metrics == metrics
  assert tasks.get_task("mnli").num_labels == 3 and tasks.get_task("stsb").kind == "regression"
  assert tasks.get_task("bbc_topic").label_names == ("business", "entertainment", "politics",
                                                     "sports", "tech")
  with pytest.raises(ValueError, match="already registered"):
    tasks.register(tasks.get_task("sst2"))


def test_blank_lines_in_tsv_are_no_rows(tmp_path):
  (tmp_path / "t.tsv").write_text("sentence\tlabel\ngood\t1\n\nbad\t0\n\n")
  task = Task("blank", "classification", 2, ("accuracy",),
              {"train": TsvSource("t.tsv", "sentence", None, "label", label_values=("0", "1"))})
  recs = sources.load_records(task, "train", _cfg(tmp_path))  # bad_rows="error": no error
  assert [(r["id"], r["text_a"], r["label"]) for r in recs] == [("0", "good", 1), ("1", "bad", 0)]


def test_squad_question_without_id(tmp_path, caplog):
  (tmp_path / "squad").mkdir()
  qas = [{"id": "a", "question": "Q1?", "answers": [{"text": "x", "answer_start": 0}]},
         {"question": "Q2?", "answers": [{"text": "x", "answer_start": 0}]}]
  data = {"data": [{"title": "T1", "paragraphs": [{"context": "x y", "qas": qas[:1]}]},
                   {"title": "T2", "paragraphs": [{"context": "x", "qas": qas[:1]},
                                                  {"context": "x z", "qas": qas[1:]}]}]}
  (tmp_path / "squad" / "dev-v1.1.json").write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"^squad/dev-v1\.1\.json: question 2 of article 'T2' has no "
                                       r"id$"):
    sources.load_records("squad_dev", "validation", _cfg(tmp_path))
  with caplog.at_level(logging.WARNING):
    recs = sources.load_records("squad_dev", "validation", _cfg(tmp_path, bad_rows="skip"))
  assert [(r["id"], r["title"]) for r in recs] == [("a", "T1"), ("a", "T2")]
  assert "skipped 1 malformed rows" in caplog.text
