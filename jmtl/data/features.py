"""Records -> model features -> padded numpy batches (docs/architecture.md, "Batches").

Layouts (BERT): single text `[CLS] a [SEP]`; pair `[CLS] a [SEP] b [SEP]` with segment ids 0 for
`[CLS] a [SEP]` and 1 for `b [SEP]`; pairs too long drop tokens from the end of the longer side
(ties: from b), one at a time (Hugging Face "longest_first").
SQuAD: `[CLS] q [SEP] window [SEP]`, question cut to min(64, (L-3)//2) tokens, windows of the
context starting every min(doc_stride, window) tokens until one reaches the end; start/end =
token positions of the first answer when it lies fully inside the window, else 0 ([CLS]).
seq2seq: source `[CLS] s [SEP]`; decoder_input_ids = [BOS] + target[:T-1];
decoder_target_ids = (target + [EOS])[:T].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jmtl.tasks.base import Task

MAX_QUERY_LEN = 64  # question tokens kept for span_qa (BERT's max_query_length)


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths kept by longest-first truncation of a pair to at most `budget` tokens."""
  excess = len_a + len_b - budget
  if excess <= 0:
    return len_a, len_b
  if len_a > len_b:
    d = min(excess, len_a - len_b)
    len_a, excess = len_a - d, excess - d
  elif len_b > len_a:
    d = min(excess, len_b - len_a)
    len_b, excess = len_b - d, excess - d
  # Equal lengths now: the loop removes from b on ties, then alternates.
  return len_a - excess // 2, len_b - (excess + 1) // 2


def bucket_length(n: int, buckets: Sequence[int], max_len: int) -> int:
  """Smallest bucket >= n among `buckets` below `max_len`, else `max_len`."""
  for b in sorted(buckets):
    if n <= b < max_len:
      return b
  return max_len


class Featurizer:
  """Turns one record into features (a list: span_qa gives one per window) and features into
  padded batches for one task."""

  def __init__(self, task: Task, tokenizer: Any, data_cfg: Any):
    self.task, self.tok = task, tokenizer
    self.max_len = min(task.max_len, data_cfg.max_len) if task.max_len else int(data_cfg.max_len)
    self.max_target_len = (min(task.max_target_len, data_cfg.max_target_len)
                           if task.max_target_len else int(data_cfg.max_target_len))
    self.doc_stride = int(data_cfg.doc_stride)
    self.buckets = tuple(int(b) for b in data_cfg.length_buckets)
    if self.max_len < 4:
      raise ValueError(f"task {task.name!r}: max_len {self.max_len} is too small (need >= 4)")
    self._contexts: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

  # ------------------------------------------------------------------ features
  def __call__(self, record: dict, index: int) -> list[dict]:
    kind = self.task.kind
    if kind in ("classification", "regression"):
      feats = [self._text(record)]
    elif kind == "seq2seq":
      feats = [self._seq2seq(record)]
    else:
      feats = self._span_qa(record)
    for f in feats:
      f["index"] = index
      f["id"] = record["id"]
    return feats

  def _text(self, r: dict) -> dict:
    tok, L = self.tok, self.max_len
    a = tok.encode(r["text_a"])
    if r.get("text_b") is None:
      a = a[:L - 2]
      ids = [tok.cls_id, *a, tok.sep_id]
      seg = [0] * len(ids)
    else:
      b = tok.encode(r["text_b"])
      la, lb = truncate_pair(len(a), len(b), L - 3)
      ids = [tok.cls_id, *a[:la], tok.sep_id, *b[:lb], tok.sep_id]
      seg = [0] * (la + 2) + [1] * (lb + 1)
    return {"input_ids": ids, "segment_ids": seg, "label": r["label"]}

  def _seq2seq(self, r: dict) -> dict:
    tok, L, T = self.tok, self.max_len, self.max_target_len
    src = tok.encode(r["source"])[:L - 2]
    tgt = tok.encode(r["target"])
    ids = [tok.cls_id, *src, tok.sep_id]
    return {"input_ids": ids, "segment_ids": [0] * len(ids),
            "decoder_input_ids": [tok.bos_id, *tgt[:T - 1]],
            "decoder_target_ids": [*tgt, tok.eos_id][:T]}

  def _context(self, context: str) -> tuple[list[int], list[tuple[int, int]]]:
    hit = self._contexts.get(context)
    if hit is None:
      hit = self.tok.encode_with_offsets(context)
      self._contexts[context] = hit
    return hit

  def _span_qa(self, r: dict) -> list[dict]:
    tok, L = self.tok, self.max_len
    q = tok.encode(r["question"])[:min(MAX_QUERY_LEN, (L - 3) // 2)]
    ctx, offsets = self._context(r["context"])
    width = L - 3 - len(q)
    step = min(self.doc_stride, width)
    # Answer token span in the whole context (first answer), or None.
    span = None
    answers = r.get("answers") or {}
    if answers.get("text"):
      a0 = answers["answer_start"][0]
      a1 = a0 + len(answers["text"][0])
      inside = [i for i, (s, e) in enumerate(offsets) if s < a1 and e > a0]
      if inside:
        span = (inside[0], inside[-1])
    feats, start = [], 0
    while True:
      window = ctx[start:start + width]
      ids = [tok.cls_id, *q, tok.sep_id, *window, tok.sep_id]
      head = len(q) + 2
      sp = ep = 0
      if span is not None and span[0] >= start and span[1] < start + width:
        sp, ep = span[0] - start + head, span[1] - start + head
      feats.append({
          "input_ids": ids, "segment_ids": [0] * head + [1] * (len(window) + 1),
          "context_mask": [0] * head + [1] * len(window) + [0],
          "start_position": sp, "end_position": ep,
          "offsets": [None] * head + [tuple(o) for o in offsets[start:start + width]] + [None]})
      if start + width >= len(ctx):
        return feats
      start += step

  # ------------------------------------------------------------------ batches
  def padded_length(self, feats: Sequence[dict], bucketed: bool = True) -> int:
    if not bucketed or not feats:
      return self.max_len
    return bucket_length(max(len(f["input_ids"]) for f in feats), self.buckets, self.max_len)

  def collate(self, feats: Sequence[dict], rows: int | None = None, length: int | None = None
              ) -> dict[str, np.ndarray]:
    """Pads `feats` to [rows, length] (defaults: len(feats), the bucket of the longest row).
    Padding rows are `[CLS] [SEP]` with example_weight 0, index -1 and no decoder tokens."""
    kind, tok = self.task.kind, self.tok
    B = len(feats) if rows is None else rows
    if B < len(feats):
      raise ValueError(f"{len(feats)} features do not fit in {B} rows")
    L = self.padded_length(feats) if length is None else length
    out = {"input_ids": np.full((B, L), tok.pad_id, np.int32),
           "segment_ids": np.zeros((B, L), np.int32),
           "attention_mask": np.zeros((B, L), np.int32),
           "example_weight": np.zeros((B,), np.float32),
           "index": np.full((B,), -1, np.int32)}
    out["input_ids"][len(feats):, :2] = (tok.cls_id, tok.sep_id)
    out["attention_mask"][len(feats):, :2] = 1
    if kind == "classification":
      out["labels"] = np.zeros((B,), np.int32)
    elif kind == "regression":
      out["labels"] = np.zeros((B,), np.float32)
    elif kind == "span_qa":
      out["context_mask"] = np.zeros((B, L), np.int32)
      out["start_positions"] = np.zeros((B,), np.int32)
      out["end_positions"] = np.zeros((B,), np.int32)
    else:
      T = self.max_target_len
      out["decoder_input_ids"] = np.full((B, T), tok.pad_id, np.int32)
      out["decoder_target_ids"] = np.full((B, T), tok.pad_id, np.int32)
      out["decoder_mask"] = np.zeros((B, T), np.int32)
      out["decoder_input_ids"][len(feats):, 0] = tok.bos_id
    for i, f in enumerate(feats):
      n = len(f["input_ids"])
      if n > L:
        raise ValueError(f"feature of length {n} does not fit in length {L}")
      out["input_ids"][i, :n] = f["input_ids"]
      out["segment_ids"][i, :n] = f["segment_ids"]
      out["attention_mask"][i, :n] = 1
      out["example_weight"][i] = 1.0
      out["index"][i] = f["index"]
      if kind in ("classification", "regression"):
        out["labels"][i] = f["label"]
      elif kind == "span_qa":
        out["context_mask"][i, :n] = f["context_mask"]
        out["start_positions"][i] = f["start_position"]
        out["end_positions"][i] = f["end_position"]
      else:
        t = len(f["decoder_target_ids"])
        out["decoder_input_ids"][i, :t] = f["decoder_input_ids"]
        out["decoder_target_ids"][i, :t] = f["decoder_target_ids"]
        out["decoder_mask"][i, :t] = 1
    return out
