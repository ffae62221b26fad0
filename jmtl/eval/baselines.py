"""The lead summarization baseline: the first n words of the source (e.g. a headline from the
first words of the article body)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def lead_baseline(sources: Sequence[str], n_words: int) -> list[str]:
  """Returns the first `n_words` whitespace-separated words of each source, joined by spaces."""
  if isinstance(n_words, bool) or not isinstance(n_words, (int, np.integer)) or n_words < 1:
    raise ValueError(f"n_words must be a positive integer, got {n_words!r}")
  return [" ".join(src.split()[:n_words]) for src in sources]


def lead_n_for_targets(targets: Sequence[str]) -> int:
  """Median target length in words, rounded half up, at least 1."""
  if len(targets) == 0:
    raise ValueError("lead_n_for_targets needs at least one target text")
  median = float(np.median([len(t.split()) for t in targets]))
  return max(1, math.floor(median + 0.5))
