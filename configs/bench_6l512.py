"""Step benchmark: BERT-style encoder (6 layers, d_model 512, d_ff 2048, vocab 16000) + classifier,
AdamW, batch 32, seq 128 (the reference configs of the performance table in the README)."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.vocab_size = 16000
  c.data.max_len = 128
  c.data.length_buckets = (128,)
  c.data.batch_size = 32
  c.model.layers = 6
  c.model.d_model = 512
  c.model.heads = 8
  c.model.d_ff = 2048
  c.optim.name = "adamw"
  return c
