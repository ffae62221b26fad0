"""SQuAD span decoding: per-feature start/end logits -> one answer text per example.

Rule (as the Google BERT / Hugging Face reference post-processing): for every feature (window)
of an example take the `n_best` highest start and end positions; keep pairs (s, e) where both
tokens are context tokens (offset not None), e >= s and e - s + 1 <= max_answer_len; score =
start_logit[s] + end_logit[e]. The best pair over all features of the example gives
`context[offsets[s][0]:offsets[e][1]]`; an example with no valid pair gets "".
Ties go to the earlier feature, then the higher-ranked start, then the higher-ranked end
(ranks from a stable sort, so equal logits rank by position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _valid_mask(meta: Mapping[str, Any], i: int, length: int) -> tuple[np.ndarray, list[Any]]:
  try:
    offsets = meta["offsets"]
    example_id = meta["example_id"]
  except KeyError as e:
    raise KeyError(f"features_meta[{i}] has no {e.args[0]!r} key") from None
  if len(offsets) != length:
    raise ValueError(f"features_meta[{i}] (example {example_id!r}) has {len(offsets)} offsets "
                     f"but the logits have length {length}")
  return np.array([o is not None for o in offsets], dtype=bool), offsets


def postprocess_squad(examples: Sequence[Mapping[str, Any]],
                      features_meta: Sequence[Mapping[str, Any]],
                      start_logits: Any, end_logits: Any, *, n_best: int = 20,
                      max_answer_len: int = 30) -> dict[str, str]:
  """Returns {example id: best answer text} (see the module docstring for the rule)."""
  if n_best < 1:
    raise ValueError(f"n_best must be >= 1, got {n_best}")
  if max_answer_len < 1:
    raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
  start = np.asarray(start_logits, dtype=np.float64)
  end = np.asarray(end_logits, dtype=np.float64)
  if start.ndim != 2 or start.shape != end.shape:
    raise ValueError(f"start/end logits must both be [num_features, L], got {start.shape} and "
                     f"{end.shape}")
  num_features, length = start.shape
  if num_features != len(features_meta):
    raise ValueError(f"{num_features} rows of logits but {len(features_meta)} features_meta")

  contexts = {}
  for ex in examples:
    if "id" not in ex or "context" not in ex:
      raise KeyError(f"example record needs 'id' and 'context' keys, got {sorted(ex)}")
    contexts[str(ex["id"])] = ex["context"]
  answers = dict.fromkeys(contexts, "")
  if num_features == 0:
    return answers

  k = min(n_best, length)
  # Top-k positions per feature, best first: [F, k].
  top_s = np.argsort(-start, axis=1, kind="stable")[:, :k]
  top_e = np.argsort(-end, axis=1, kind="stable")[:, :k]
  valid = np.zeros((num_features, length), dtype=bool)
  offsets = []
  for i, meta in enumerate(features_meta):
    valid[i], offs = _valid_mask(meta, i, length)
    offsets.append(offs)
  rows = np.arange(num_features)[:, None]
  s_idx, e_idx = top_s[:, :, None], top_e[:, None, :]  # [F, k, 1], [F, 1, k]
  ok = (valid[rows, top_s][:, :, None] & valid[rows, top_e][:, None, :]
        & (e_idx >= s_idx) & (e_idx - s_idx + 1 <= max_answer_len))
  scores = start[rows, top_s][:, :, None] + end[rows, top_e][:, None, :]
  scores = np.where(ok & ~np.isnan(scores), scores, -np.inf)  # [F, k, k]; NaN never wins
  flat = scores.reshape(num_features, -1)
  best_pair = np.argmax(flat, axis=1)  # first maximum: higher-ranked start, then end
  best_score = flat[np.arange(num_features), best_pair]

  best: dict[str, tuple[float, str]] = {}
  for i, meta in enumerate(features_meta):
    ex_id = str(meta["example_id"])
    if ex_id not in contexts:
      raise KeyError(f"features_meta[{i}] refers to unknown example id {ex_id!r}")
    if best_score[i] == -np.inf:
      continue  # no valid pair in this feature
    if ex_id in best and best[ex_id][0] >= best_score[i]:
      continue  # an earlier feature is at least as good
    s = int(top_s[i, best_pair[i] // k])
    e = int(top_e[i, best_pair[i] % k])
    text = contexts[ex_id][offsets[i][s][0]:offsets[i][e][1]]
    best[ex_id] = (float(best_score[i]), text)
  answers.update({ex_id: text for ex_id, (_, text) in best.items()})
  return answers
