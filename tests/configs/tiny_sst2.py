"""A tiny SST-2 config for tests: seconds on CPU."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.vocab_size = 500
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.data.batch_size = 16
  c.data.max_train_examples = 512
  c.data.max_eval_examples = 64
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.model.decoder.layers = 1
  c.model.decoder.heads = 2
  c.model.decoder.d_ff = 64
  c.optim.lr = 3e-3
  c.train.steps = 12
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.checkpoint_every = 4
  c.train.progress = "none"
  c.eval.batch_size = 32
  return c
