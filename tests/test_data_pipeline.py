"""Mixtures, train-iterator determinism / resume / process slicing, eval batches."""

import json
import pathlib

import numpy as np
import pytest

from jmtl.data import pipeline, sources
from jmtl.data.tokenizer import Tokenizer
from jmtl.defaults import base_config

TOK = Tokenizer.load(pathlib.Path(__file__).parent / "fixtures" / "data" / "vocab.txt")
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "big", "red"]


def _records(n, kind="classification", salt=0):
  recs = []
  for i in range(n):
    text = " ".join(WORDS[(i * 7 + j + salt) % 10] for j in range(1 + (i * 5 + salt) % 9))
    if kind == "classification":
      recs.append({"id": str(i), "text_a": text, "text_b": None, "label": i % 2})
    else:
      recs.append({"id": str(i), "source": text, "target": text[:12], "references": [text]})
  return recs


RECORDS = {"sst2": _records(24), "cola": _records(10, salt=3),
           "dialogsum": _records(15, "seq2seq", salt=1)}


def _config(**data):
  c = base_config()
  c.data.max_len = 16
  c.data.max_target_len = 6
  c.data.length_buckets = (8, 16)
  c.data.batch_size = 8
  c.data.update(data)
  return c


def _it(c, tasks=("sst2",), **kw):
  return pipeline.train_iterator(c, list(tasks), TOK, records=RECORDS, **kw)


def _same(a, b):
  assert a.keys() == b.keys()
  for t in a:
    assert a[t].keys() == b[t].keys()
    for k in a[t]:
      np.testing.assert_array_equal(a[t][k], b[t][k], err_msg=f"{t}/{k}")


def test_mixture_rates_by_hand():
  sizes = {"a": 100, "b": 400}
  c = _config()
  assert pipeline.mixture_rates(c.data, sizes) == pytest.approx({"a": 0.2, "b": 0.8})
  c.data.mixture, c.data.temperature = "temperature", 2.0  # sqrt: 10, 20
  assert pipeline.mixture_rates(c.data, sizes) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
  c.data.mixture = "uniform"
  assert pipeline.mixture_rates(c.data, sizes) == pytest.approx({"a": 0.5, "b": 0.5})
  c.data.mixture = "explicit"
  c.data.rates = {"a": 1.0, "b": 3.0}
  assert pipeline.mixture_rates(c.data, sizes) == pytest.approx({"a": 0.25, "b": 0.75})
  c.data.rates = {"a": 1.0}
  with pytest.raises(KeyError, match=r"\['b'\]"):
    pipeline.mixture_rates(c.data, sizes)


def test_rows_per_task_by_hand():
  assert pipeline.rows_per_task({"a": 0.2, "b": 0.8}, 8) == {"a": 2, "b": 6}  # 1.6, 6.4
  assert pipeline.rows_per_task({"a": 0.01, "b": 0.99}, 4) == {"a": 1, "b": 3}
  assert pipeline.rows_per_task({"a": 0.5, "b": 0.3, "c": 0.2}, 10) == {"a": 5, "b": 3, "c": 2}
  assert pipeline.rows_per_task({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 8) == {"a": 3, "b": 3,
                                                                            "c": 2}
  with pytest.raises(ValueError, match="cannot hold 3 tasks"):
    pipeline.rows_per_task({"a": 0.5, "b": 0.3, "c": 0.2}, 2)


def test_epochs_are_reshuffled_permutations():
  it = _it(_config())
  epochs = [[i for _ in range(3) for i in next(it)["sst2"]["index"]] for _ in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(24))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(24))


def test_batches_match_records():
  batch = next(_it(_config()))["sst2"]
  for row, i in enumerate(batch["index"]):
    ids = [2, *TOK.encode(RECORDS["sst2"][i]["text_a"]), 3]
    np.testing.assert_array_equal(batch["input_ids"][row, :len(ids)], ids)
    assert batch["labels"][row] == RECORDS["sst2"][i]["label"]
  longest = max(len(TOK.encode(RECORDS["sst2"][i]["text_a"])) + 2 for i in batch["index"])
  assert batch["input_ids"].shape[1] == (8 if longest <= 8 else 16)


@pytest.mark.parametrize("mixing", ["task_per_batch", "mixed"])
def test_determinism_and_resume(mixing):
  c = _config(mixing=mixing, mixture="uniform")
  tasks = ("sst2", "cola", "dialogsum")
  a, b = _it(c, tasks), _it(c, tasks)
  for _ in range(5):
    _same(next(a), next(b))
  state = json.loads(json.dumps(a.get_state()))  # JSON round trip
  expected = [next(a) for _ in range(7)]
  fresh = _it(c, tasks)
  fresh.set_state(state)
  for want in expected:
    _same(next(fresh), want)
  c2 = _config(mixing=mixing, mixture="uniform")
  c2.seed = 1

  def trace(it):
    return [(t, b["index"].tolist()) for _ in range(4) for t, b in sorted(next(it).items())]

  assert trace(_it(c, tasks)) == trace(_it(c, tasks))
  assert trace(_it(c2, tasks)) != trace(_it(c, tasks))


def test_task_per_batch_follows_rates():
  c = _config(mixture="explicit")
  c.data.rates = {"sst2": 3.0, "cola": 1.0}
  it = _it(c, ("sst2", "cola"))
  picks = [next(iter(next(it))) for _ in range(400)]
  assert picks.count("sst2") / 400 == pytest.approx(0.75, abs=0.07)


def test_mixed_rows():
  c = _config(mixing="mixed", mixture="proportional")  # sizes 24, 10, 15 -> rates /49
  it = _it(c, ("sst2", "cola", "dialogsum"))
  assert it.rows == {"sst2": 4, "cola": 2, "dialogsum": 2}  # 3.92, 1.63, 2.45
  batch = next(it)
  assert {t: b["input_ids"].shape[0] for t, b in batch.items()} == it.rows
  assert batch["dialogsum"]["decoder_input_ids"].shape == (2, 6)


@pytest.mark.parametrize("mixing", ["task_per_batch", "mixed"])
def test_process_rows_disjoint_and_cover(mixing):
  c = _config(mixing=mixing, mixture="uniform")
  tasks = ("sst2", "cola")
  whole = _it(c, tasks)
  # Two processes, each reading one contiguous half of every global batch (as a batch sharding
  # over devices ordered by process gives), and one reading the odd rows only.
  halves_of = [lambda n: range(0, n // 2), lambda n: range(n // 2, n)]
  parts = [_it(c, tasks, local_rows=f, fixed_length=True) for f in halves_of]
  odd = _it(c, tasks, local_rows=lambda n: range(1, n, 2), fixed_length=True)
  for _ in range(12):
    w = next(whole)
    halves = [next(p) for p in parts]
    odd_rows = next(odd)
    assert halves[0].keys() == halves[1].keys() == odd_rows.keys() == w.keys()
    for t in w:
      n = w[t]["index"].shape[0]
      expected = [{k: v[:n // 2] for k, v in w[t].items()}, {k: v[n // 2:] for k, v in w[t].items()}]
      for half, want in zip((halves[0][t], halves[1][t]), expected):
        np.testing.assert_array_equal(half["index"], want["index"])
        # fixed_length pads to the task max (16); the whole batch is bucketed (8 or 16).
        assert half["input_ids"].shape[1] == 16
        width = want["input_ids"].shape[1]
        np.testing.assert_array_equal(half["input_ids"][:, :width], want["input_ids"])
        assert not half["attention_mask"][:, width:].any()
      np.testing.assert_array_equal(odd_rows[t]["index"], w[t]["index"][1::2])
  with pytest.raises(ValueError, match="local_rows"):
    _it(c, tasks, local_rows=lambda n: range(n, n + 2))


def test_eval_batches_padding_and_meta():
  c = _config()
  c.eval.batch_size = 4
  recs = RECORDS["cola"]
  batches, meta = pipeline.eval_batches("cola", recs, TOK, c)
  assert len(batches) == 3 and [m["example_id"] for m in meta] == [r["id"] for r in recs]
  idx = np.concatenate([b["index"] for b in batches])
  w = np.concatenate([b["example_weight"] for b in batches])
  np.testing.assert_array_equal(idx, list(range(10)) + [-1, -1])
  np.testing.assert_array_equal(w, [1] * 10 + [0, 0])
  assert all(b["input_ids"].shape[0] == 4 for b in batches)


def test_eval_batches_squad_real(data_dir):
  c = base_config()
  c.data.dir = str(data_dir)
  c.data.max_eval_examples = 30
  c.data.max_len = 64
  c.eval.batch_size = 16
  recs = sources.load_records("squad", "validation", c.data)
  tok = Tokenizer.load(pathlib.Path(__file__).parent / "fixtures" / "data" / "vocab.txt")
  batches, meta = pipeline.eval_batches("squad", recs, tok, c)
  assert all(b["input_ids"].shape == (16, 64) for b in batches)
  assert all(len(m["offsets"]) == 64 for m in meta)
  assert {m["example_id"] for m in meta} == {r["id"] for r in recs}
  by_id = {r["id"]: r for r in recs}
  for b in batches:
    for row, i in enumerate(b["index"]):
      if i < 0:
        continue
      ctx = by_id[meta[i]["example_id"]]["context"]
      for pos in np.flatnonzero(b["context_mask"][row]):
        s, e = meta[i]["offsets"][pos]
        assert 0 <= s < e <= len(ctx)
