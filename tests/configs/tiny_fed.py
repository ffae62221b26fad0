"""A tiny federated config for tests: BBC topic + headline over 4 sites x 2 devices, seconds on
CPU. Site "d" holds only bbc_topic (its headline head is never trained or sent there)."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("bbc_topic", "bbc_headline")
  c.data.vocab_size = 500
  c.data.max_len = 32
  c.data.max_target_len = 8
  c.data.length_buckets = (32,)
  c.data.batch_size = 8
  c.data.mixture = "uniform"
  c.data.mixing = "mixed"
  c.data.max_train_examples = 240
  c.data.max_eval_examples = 16
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.model.decoder.layers = 1
  c.model.decoder.heads = 2
  c.model.decoder.d_ff = 64
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.progress = "none"
  c.eval.batch_size = 16
  c.eval.max_decode_len = 8
  c.fed.sites = (
      dict(name="a", cloud="gcp", devices=2, speed=1.0, price_device_hour=1.0,
           price_egress_gb=0.12),
      dict(name="b", cloud="gcp", devices=2, speed=0.5, price_device_hour=1.0,
           price_egress_gb=0.12),
      dict(name="c", cloud="aws", devices=2, speed=2.0, up_mbps=20.0, price_device_hour=2.0,
           price_egress_gb=0.09),
      dict(name="d", cloud="aws", devices=2, tasks=("bbc_topic",), price_device_hour=2.0,
           price_egress_gb=0.09),
  )
  c.fed.rounds = 6
  c.fed.local_steps = 2
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 3e-3
  c.fed.server_optimizer = "nesterov"
  c.fed.server_lr = 0.7
  c.fed.server_momentum = 0.9
  c.fed.partition = "dirichlet"
  c.fed.alpha = 0.5
  c.fed.min_per_site = 4
  c.fed.holdout = 0.1
  c.fed.step_time_s = 0.05
  c.fed.eval_every = 3
  c.fed.checkpoint_every = 2
  return c
