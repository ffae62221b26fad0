"""`jmtl bench scaling`: SST-2 classifier, AdamW, batch 16 x 128 tokens; the model size and the
mesh layout are set per row by jmtl/bench/scaling.py (tiny / small / base ~125M; data / fsdp /
tensor / mixed)."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.max_len = 128
  c.data.length_buckets = (128,)
  c.data.batch_size = 16
  c.model.max_len = 128
  c.optim.name = "adamw"
  return c
