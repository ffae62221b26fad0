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


def test_bench_loop_smoke(data_dir):
  import jax

  from jmtl import config as config_lib
  from jmtl.bench.loop import bench_loop

  c = config_lib.load_config_file(str(pathlib.Path(__file__).parent / "configs" / "tiny_sst2.py"))
  c.data.dir = str(data_dir)
  c.data.tokenizer = str(VOCAB)
  c.data.max_train_examples = 64
  # One device: the step compiles faster than over 8.
  r = bench_loop(c, steps=3, repeats=2, depth=2, devices=jax.devices()[:1])
  assert r["steps"] == 3 and r["repeats"] == 2 and r["tasks"] == "sst2"
  for feed in ("memory", "sync", "prefetch"):
    assert r[f"{feed}_steps_per_s"] > 0 and len(r[f"{feed}_times_s"]) == 2
  assert r["sync_over_memory"] > 0 and r["prefetch_over_memory"] > 0
  assert r["tokens_per_step"] == 16 * 32
