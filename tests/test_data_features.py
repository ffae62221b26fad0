"""Features and batches against hand-computed examples (fixture vocab: the=5 cat=6 sat=7 on=8
mat=9 a=10 dog=11 ##s=12 .=13 ?=14 where=15 is=16 ran=17 big=18 red=19)."""

import itertools
import pathlib

import numpy as np
from ml_collections import ConfigDict

from jmtl.data.features import Featurizer, bucket_length, truncate_pair
from jmtl.data.tokenizer import Tokenizer
from jmtl.tasks import get_task, Task

TOK = Tokenizer.load(pathlib.Path(__file__).parent / "fixtures" / "data" / "vocab.txt")


def _data(**kw):
  c = ConfigDict({"max_len": 10, "max_target_len": 4, "doc_stride": 2, "length_buckets": (6, 8)})
  c.update(kw)
  return c


def _longest_first_reference(la, lb, budget):
  """The Hugging Face loop: drop one token from the longer side (ties: from b)."""
  while la + lb > budget:
    if la > lb:
      la -= 1
    else:
      lb -= 1
  return la, lb


def test_truncate_pair_matches_loop():
  for la, lb, budget in itertools.product(range(12), range(12), range(0, 15)):
    assert truncate_pair(la, lb, budget) == _longest_first_reference(la, lb, budget)


def test_bucket_length():
  assert [bucket_length(n, (6, 8), 10) for n in (2, 6, 7, 9, 10)] == [6, 6, 8, 10, 10]
  assert bucket_length(3, (128,), 64) == 64


def test_single_and_pair_layouts():
  f = Featurizer(get_task("sst2"), TOK, _data())
  feat = f({"id": "0", "text_a": "the dog sat", "text_b": None, "label": 1}, 0)[0]
  assert feat["input_ids"] == [2, 5, 11, 7, 3] and feat["segment_ids"] == [0] * 5
  rte = Featurizer(get_task("rte"), TOK, _data())
  feat = rte({"id": "1", "text_a": "the big red dog sat on the mat", "text_b": "a cat ran",
              "label": 0}, 7)[0]
  # budget 10 - 3 = 7: a (8 tokens) drops 4 from its end, b (3) is kept.
  assert feat["input_ids"] == [2, 5, 18, 19, 11, 3, 10, 6, 17, 3]
  assert feat["segment_ids"] == [0] * 6 + [1] * 4
  batch = rte.collate([feat], rows=3)
  assert batch["input_ids"].shape == (3, 10) and batch["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 10)
  np.testing.assert_array_equal(batch["example_weight"], [1, 0, 0])
  np.testing.assert_array_equal(batch["index"], [7, -1, -1])
  np.testing.assert_array_equal(batch["input_ids"][1], [2, 3] + [0] * 8)
  np.testing.assert_array_equal(batch["labels"], [0, 0, 0])


def test_bucketed_padding_and_regression_labels():
  f = Featurizer(get_task("stsb"), TOK, _data())
  feats = [f({"id": "0", "text_a": "the cat", "text_b": "a dog", "label": 3.5}, 0)[0],
           f({"id": "1", "text_a": "the cat sat", "text_b": "on", "label": 0.25}, 1)[0]]
  batch = f.collate(feats)  # longest row has 7 tokens -> bucket 8
  assert batch["input_ids"].shape == (2, 8)
  np.testing.assert_array_equal(batch["input_ids"][1], [2, 5, 6, 7, 3, 8, 3, 0])
  np.testing.assert_array_equal(batch["segment_ids"][1], [0, 0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(batch["attention_mask"][1], [1] * 7 + [0])
  assert batch["labels"].dtype == np.float32 and batch["labels"].tolist() == [3.5, 0.25]


def test_squad_windows_by_hand():
  task = get_task("squad")
  f = Featurizer(task, TOK, _data(max_len=12, doc_stride=2))
  context = "The cat sat on the mat."
  rec = {"id": "q1", "question": "Where is the cat?", "context": context,
         "answers": {"text": ["the mat"], "answer_start": [15]}}
  feats = f(rec, 0)
  # Question cut to (12-3)//2 = 4 tokens; window width 12-3-4 = 5; stride 2 -> starts 0, 2.
  assert len(feats) == 2
  a, b = feats
  assert a["input_ids"] == [2, 15, 16, 5, 6, 3, 5, 6, 7, 8, 5, 3]
  assert b["input_ids"] == [2, 15, 16, 5, 6, 3, 7, 8, 5, 9, 13, 3]
  assert a["segment_ids"] == [0] * 6 + [1] * 6
  assert a["context_mask"] == [0] * 6 + [1] * 5 + [0]
  # Answer "the mat" = context tokens 4..5: outside window 0, positions 8..9 in window 1.
  assert (a["start_position"], a["end_position"]) == (0, 0)
  assert (b["start_position"], b["end_position"]) == (8, 9)
  assert b["offsets"] == [None] * 6 + [(8, 11), (12, 14), (15, 18), (19, 22), (22, 23)] + [None]
  assert context[b["offsets"][8][0]:b["offsets"][9][1]] == "the mat"
  batch = f.collate(feats, rows=2, length=12)
  np.testing.assert_array_equal(batch["start_positions"], [0, 8])
  np.testing.assert_array_equal(batch["end_positions"], [0, 9])
  np.testing.assert_array_equal(batch["context_mask"][1], [0] * 6 + [1] * 5 + [0])


def test_squad_short_context_single_window():
  f = Featurizer(get_task("squad"), TOK, _data(max_len=16, doc_stride=2))
  feats = f({"id": "q", "question": "where is the dog?", "context": "a dog ran.",
             "answers": {"text": ["a dog"], "answer_start": [0]}}, 3)
  assert len(feats) == 1
  assert feats[0]["input_ids"] == [2, 15, 16, 5, 11, 14, 3, 10, 11, 17, 13, 3]
  assert (feats[0]["start_position"], feats[0]["end_position"]) == (7, 8)


def test_seq2seq_targets_by_hand():
  task = Task("s2s", "seq2seq", 0, ("rouge1",), {})
  rec = {"id": "d", "source": "the dog sat", "target": "the cats ran .", "references": ["x"]}
  short = Featurizer(task, TOK, _data(max_target_len=4))(rec, 0)[0]
  assert short["input_ids"] == [2, 5, 11, 7, 3]
  assert short["decoder_input_ids"] == [2, 5, 6, 12]
  assert short["decoder_target_ids"] == [5, 6, 12, 17]
  f = Featurizer(task, TOK, _data(max_target_len=8))
  batch = f.collate(f(rec, 0) + [], rows=2)
  np.testing.assert_array_equal(batch["decoder_input_ids"][0], [2, 5, 6, 12, 17, 13, 0, 0])
  np.testing.assert_array_equal(batch["decoder_target_ids"][0], [5, 6, 12, 17, 13, 3, 0, 0])
  np.testing.assert_array_equal(batch["decoder_mask"], [[1] * 6 + [0, 0], [0] * 8])
  np.testing.assert_array_equal(batch["decoder_input_ids"][1], [2] + [0] * 7)
  assert TOK.decode(batch["decoder_target_ids"][0]) == "the cats ran."
