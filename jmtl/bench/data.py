"""`jmtl bench data`: throughput of the input pipeline alone (no model).

examples/s counts real rows (example_weight > 0); tokens/s counts real tokens
(attention_mask + decoder_mask); padded_tokens/s counts every position of the padded arrays,
which is what the train step consumes.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from jmtl.data import pipeline
from jmtl.data import tokenizer as tokenizer_lib
from jmtl.tasks import get_task


def bench_data(config: Any, *, steps: int = 200, warmup: int = 10,
               workdir: str | None = None) -> dict:
  """Times `steps` batches of `train_iterator(config)` after `warmup` batches."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
  tasks = [get_task(t) for t in config.tasks]
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    tok = tokenizer_lib.build_tokenizer(config, tasks, workdir or tmp)
    t1 = time.perf_counter()
    it = pipeline.train_iterator(config, tasks, tok)
    t2 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  examples = tokens = padded = 0
  start = time.perf_counter()
  for _ in range(steps):
    for b in next(it).values():
      examples += int(np.count_nonzero(b["example_weight"]))
      tokens += int(b["attention_mask"].sum()) + int(b.get("decoder_mask", np.zeros(0)).sum())
      padded += b["input_ids"].size + (b["decoder_input_ids"].size if "decoder_input_ids" in b
                                       else 0)
  seconds = time.perf_counter() - start
  return {"tasks": [t.name for t in tasks], "steps": steps, "batch_size": int(config.data.batch_size),
          "seconds": seconds, "examples_per_s": examples / seconds,
          "tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds,
          "tokenizer_s": t1 - t0, "setup_s": t2 - t1}
