"""Step benchmark: BERT-style encoder (4 layers, d_model 256, d_ff 1024, vocab 8000) + classifier,
AdamW, batch 32, seq 128 (the reference configs of the performance table in the README)."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.vocab_size = 8000
  c.data.max_len = 128
  c.data.length_buckets = (128,)
  c.data.batch_size = 32
  c.model.layers = 4
  c.model.d_model = 256
  c.model.heads = 4
  c.model.d_ff = 1024
  c.optim.name = "adamw"
  return c
