"""`bench_data` reports pipeline throughput with consistent counts."""

import pathlib

from jmtl.bench.data import bench_data
from jmtl.defaults import base_config

VOCAB = pathlib.Path(__file__).parent / "fixtures" / "data" / "vocab.txt"


def test_bench_data_counts(data_dir):
  c = base_config()
  c.tasks = ("rte", "stsb")
  c.data.dir = str(data_dir)
  c.data.tokenizer = str(VOCAB)
  c.data.max_train_examples = 64
  c.data.mixing = "mixed"
  c.data.batch_size = 8
  r = bench_data(c, steps=5, warmup=1)
  assert r["steps"] == 5 and r["tasks"] == ["rte", "stsb"]
  # Every mixed batch holds 8 real rows, so examples/s * seconds = 40.
  assert round(r["examples_per_s"] * r["seconds"]) == 40
  assert 0 < r["tokens_per_s"] <= r["padded_tokens_per_s"]
  assert round(r["padded_tokens_per_s"] * r["seconds"]) == 5 * 8 * 128
