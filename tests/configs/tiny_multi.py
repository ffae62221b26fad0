"""A tiny four-task config (classification, regression, extractive QA, summarization) for
multi-host tests: every task kind, mixed batches, a tensor-parallel axis; seconds on CPU."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2", "stsb", "squad", "dialogsum")
  c.data.vocab_size = 600
  c.data.max_len = 32
  c.data.max_target_len = 16
  c.data.length_buckets = (32,)
  c.data.doc_stride = 16
  c.data.mixing = "mixed"
  c.data.mixture = "uniform"
  c.data.batch_size = 16
  c.data.max_train_examples = 256
  c.data.max_eval_examples = 24
  c.mesh.data = -1
  c.mesh.tensor = 2
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.model.decoder.layers = 1
  c.model.decoder.heads = 2
  c.model.decoder.d_ff = 64
  c.optim.lr = 3e-3
  c.train.steps = 8
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.train.progress = "none"
  c.eval.batch_size = 8
  c.eval.max_decode_len = 12
  return c
