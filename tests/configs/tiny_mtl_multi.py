"""Tiny multi-task arm of the smoke study (tests/configs/tiny_mtl_study.py): SST-2 + STS-B in
every batch (8 rows each), uncertainty weighting; seconds on CPU."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2", "stsb")
  c.data.vocab_size = 500
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.data.batch_size = 16
  c.data.mixing = "mixed"
  c.data.mixture = "uniform"
  c.data.max_train_examples = 64
  c.data.max_eval_examples = 16
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.optim.lr = 3e-3
  c.train.steps = 4
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.checkpoint_every = 4
  c.train.progress = "none"
  c.eval.batch_size = 16
  c.mtl.weighting = "uncertainty"
  c.study.arm = "multi"
  c.study.reference = "single"
  return c
