"""The optimizer benchmark runs on a tiny tree and reports ratios to adamw."""

import math

import pytest

from jmtl.bench.optimizer import bench_optimizer, bert_small_shapes


def test_bench_small():
  r = bench_optimizer(params_shape={"a": (64, 32), "b": (32,)}, iters=2, warmup=1,
                      names=["jmtl_adaptive", "sgd"], total_steps=10)
  assert r["params"] == 64 * 32 + 32
  assert set(r["ms"]) == {"adamw", "jmtl_adaptive", "sgd", "optax_adamw"}
  assert r["ratio"]["adamw"] == 1.0 and r["ratio_vs_optax_adamw"]["optax_adamw"] == 1.0
  assert all(v > 0 for v in r["ms"].values())


def test_bench_bad_name_and_default_size():
  with pytest.raises(KeyError, match="adamx"):
    bench_optimizer(names=["adamx"], params_shape={"a": (2,)}, iters=1)
  n = sum(math.prod(s) for s in bert_small_shapes().values())
  assert 10e6 < n < 30e6  # BERT-small-like
