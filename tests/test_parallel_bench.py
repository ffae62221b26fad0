"""`bench_step` and the bench helpers, on a tiny config (8 fake CPU devices, data parallel)."""

import json
import time

import jax
import numpy as np
import pytest

from jmtl import defaults
from jmtl.bench import common
from jmtl.bench import step as bench_lib


def test_median_seconds_times_the_calls():
  calls = []

  def fn():
    calls.append(1)
    time.sleep(0.002)

  median, times = common.median_seconds(fn, warmup=2, iters=3)
  assert len(calls) == 5 and len(times) == 3
  assert 0.002 <= median < 0.5
  with pytest.raises(ValueError, match="iters"):
    common.median_seconds(fn, warmup=0, iters=0)


def test_matmul_peak_is_a_plausible_rate():
  gflops = common.matmul_peak_gflops(256, runs=3, warmup=1)
  assert 0.1 < gflops < 1e6
  with pytest.raises(ValueError, match="positive"):
    common.MatmulPeak(0)


@pytest.mark.parametrize("kind,extra", [
    ("classification", {"labels": ((6,), np.int32)}),
    ("regression", {"labels": ((6,), np.float32)}),
    ("span_qa", {"context_mask": ((6, 10), np.int32), "start_positions": ((6,), np.int32),
                 "end_positions": ((6,), np.int32)}),
    ("seq2seq", {"decoder_input_ids": ((6, 4), np.int32), "decoder_target_ids": ((6, 4), np.int32),
                 "decoder_mask": ((6, 4), np.int32)})])
def test_synthetic_batches_follow_the_batch_contract(kind, extra):
  b = bench_lib.synthetic_batch(kind, 3, 6, 10, 4, 50, np.random.RandomState(0))
  want = {"input_ids": ((6, 10), np.int32), "segment_ids": ((6, 10), np.int32),
          "attention_mask": ((6, 10), np.int32), "example_weight": ((6,), np.float32),
          "index": ((6,), np.int32), **extra}
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
  assert b["input_ids"].min() >= 1 and b["input_ids"].max() < 50
  if kind == "classification":
    assert b["labels"].max() < 3
  if kind == "span_qa":
    assert (b["start_positions"] <= b["end_positions"]).all()
    assert b["context_mask"][np.arange(6), b["start_positions"]].all()
  if kind == "seq2seq":
    np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["decoder_target_ids"][:, :-1])
  with pytest.raises(ValueError, match="unknown task kind"):
    bench_lib.synthetic_batch("ranking", 3, 6, 10, 4, 50, np.random.RandomState(0))


def test_bench_step_tiny_config():
  c = defaults.base_config()
  c.tasks = ("sst2",)
  d, ff, layers, vocab, seq = 32, 64, 1, 256, 16
  c.model.update(layers=layers, d_model=d, d_ff=ff, heads=2, max_len=seq)
  c.data.update(batch_size=8, max_len=seq, vocab_size=vocab)
  r = bench_lib.bench_step(c, warmup=1, iters=2, devices=jax.devices()[:2])
  json.dumps(r)
  assert r["device_count"] == 2 and r["mesh"] == "2x1x1" and r["device_kind"]
  # Non-embedding parameters counted by hand: per layer q,k,v,o (d*d + d each), FFN
  # (d*ff + ff + ff*d + d), two LayerNorms (2d each); the embedding LayerNorm (2d);
  # the classification head's pooler (d*d + d) and classifier (d*2 + 2).
  per_layer = 4 * (d * d + d) + (d * ff + ff + ff * d + d) + 2 * 2 * d
  non_embed = layers * per_layer + 2 * d + (d * d + d) + (d * 2 + 2)
  embed = vocab * d + c.model.max_len * d + 2 * d
  assert r["params_non_embedding"] == non_embed
  assert r["params"] == non_embed + embed
  assert r["flops_per_token"] == 6 * non_embed + 12 * layers * d * seq
  assert r["tokens_per_step"] == 8 * seq
  assert r["step_time_min_s"] <= r["step_time_s"] <= r["step_time_max_s"]
  np.testing.assert_allclose(r["tokens_per_s"], 8 * seq / r["step_time_s"])
  np.testing.assert_allclose(r["achieved_gflops"], r["tokens_per_s"] * r["flops_per_token"] / 1e9)
  np.testing.assert_allclose(r["mfu_percent"], 100 * r["achieved_gflops"] / r["peak_gflops"])
