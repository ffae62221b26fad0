"""Prediction files and eval.json: round trip, strict JSON, atomic replacement; lead baseline."""

import json

import numpy as np
import pytest

from jmtl.eval import baselines
from jmtl.eval import metrics as M
from jmtl.eval import predictions as P


def test_predictions_round_trip(tmp_path):
  rows = [
      {"id": "0", "prediction": "positive", "reference": "negative"},
      {"id": np.str_("q1"), "prediction": "Denver Broncos",
       "reference": ["Denver Broncos", "Broncos"]},
      {"id": "2", "prediction": np.float32(3.5), "reference": 4.0, "extra": (1, 2)},
      {"id": "3", "prediction": "caf\u00e9 \u2014 \u00abok\u00bb", "reference": ("a", "b")},
  ]
  path = tmp_path / "predictions" / "task.jsonl"  # parent folder is created
  assert P.write_predictions(path, iter(rows)) == 4
  lines = path.read_text(encoding="utf-8").splitlines()
  assert len(lines) == 4
  assert json.loads(lines[0]) == rows[0]
  assert list(json.loads(lines[2])) == ["id", "prediction", "reference", "extra"]
  back = P.read_predictions(path)
  assert back[1] == {"id": "q1", "prediction": "Denver Broncos",
                     "reference": ["Denver Broncos", "Broncos"]}
  assert back[2] == {"id": "2", "prediction": 3.5, "reference": 4.0, "extra": [1, 2]}
  assert back[3]["prediction"] == "caf\u00e9 \u2014 \u00abok\u00bb"
  assert back[3]["reference"] == ["a", "b"]
  assert "\u00e9" in lines[3]  # written as UTF-8, not \\u escapes


def _leftovers(folder):
  return sorted(p.name for p in folder.iterdir())


def test_no_partial_file_on_exception(tmp_path):
  path = tmp_path / "task.jsonl"

  def rows():
    yield {"id": "0", "prediction": 1, "reference": 1}
    raise RuntimeError("model crashed mid-way")

  with pytest.raises(RuntimeError, match="mid-way"):
    P.write_predictions(path, rows())
  assert _leftovers(tmp_path) == []  # neither the target nor a temp file

  P.write_predictions(path, [{"id": "0", "prediction": 1, "reference": 1}])
  before = path.read_bytes()
  with pytest.raises(KeyError, match="row 1 lacks key"):
    P.write_predictions(path, [{"id": "0", "prediction": 2, "reference": 2},
                               {"id": "1", "prediction": 2}])
  assert path.read_bytes() == before  # the old complete file survives a failed rewrite
  assert _leftovers(tmp_path) == ["task.jsonl"]


def test_write_json_atomic(tmp_path):
  path = tmp_path / "eval.json"
  obj = {"step": np.int64(100), "sst2/accuracy": np.float64(91.25), "cola/mcc": float("nan"),
         "x": np.array([1.0, np.inf]), "nested": {"t": (1, "a")}}
  P.write_json_atomic(path, obj)
  back = json.loads(path.read_text())
  assert back == {"step": 100, "sst2/accuracy": 91.25, "cola/mcc": None, "x": [1.0, None],
                  "nested": {"t": [1, "a"]}}
  assert list(back) == list(obj)
  before = path.read_bytes()
  with pytest.raises(TypeError, match="object"):
    P.write_json_atomic(path, {"bad": object()})
  with pytest.raises(TypeError, match="keys must be strings"):
    P.write_json_atomic(path, {1: 2})
  assert path.read_bytes() == before
  assert _leftovers(tmp_path) == ["eval.json"]


def test_read_predictions_names_bad_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"id": "0", "prediction": 1, "reference": 1}\n{"id": "1"\n')
  with pytest.raises(ValueError, match=r"p.jsonl:2: not valid JSON"):
    P.read_predictions(path)
  path.write_text('{"id": "0", "prediction": 1}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:1: expected an object"):
    P.read_predictions(path)


def test_lead_baseline():
  sources = ["Ad sales boost Time Warner profit\n\nQuarterly profits at US media giant",
             "  short   text ", ""]
  assert baselines.lead_baseline(sources, 4) == ["Ad sales boost Time", "short text", ""]
  assert baselines.lead_baseline(sources[:1], 100) == [" ".join(sources[0].split())]
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="n_words"):
      baselines.lead_baseline(sources, bad)


def test_lead_n_for_targets():
  # word counts 4, 1, 7 -> median 4
  assert baselines.lead_n_for_targets(["a b c d", "a", "a b c d e f g"]) == 4
  # word counts 2, 3 -> median 2.5 -> rounded half up to 3
  assert baselines.lead_n_for_targets(["a b", "a b c"]) == 3
  # counts 1, 2, 3, 10 -> median 2.5 -> 3 (the median, not the mean 4)
  assert baselines.lead_n_for_targets(["a", "a b", "a b c", " ".join("x" * 10)]) == 3
  assert baselines.lead_n_for_targets(["", ""]) == 1
  with pytest.raises(ValueError, match="at least one"):
    baselines.lead_n_for_targets([])


def test_lead_baseline_rouge_on_real_scitldr(data_dir):
  """The lead of each paper's abstract beats the lead of another paper's, on every ROUGE type."""
  with open(data_dir / "summarization" / "scitldr_a" / "dev.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for _, line in zip(range(60), f)]
  sources = [" ".join(r["source"]) for r in rows]
  refs = [list(r["target"]) for r in rows]
  n = baselines.lead_n_for_targets([r[0] for r in refs])
  assert 8 <= n <= 40  # TLDRs are one sentence
  lead = baselines.lead_baseline(sources, n)
  assert all(len(x.split()) == n for x in lead)
  names = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
  own = M.compute(names, lead, refs)
  other = M.compute(names, lead[1:] + lead[:1], refs)
  for k in names:
    assert own[k] > other[k] + 3.0, (k, own, other)
  assert 15.0 < own["rouge1"] < 60.0
  # Max over the several TLDRs is at least the score against the first one alone.
  first_only = M.compute(["rouge1"], lead, [r[0] for r in refs])
  assert own["rouge1"] > first_only["rouge1"]
