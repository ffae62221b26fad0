"""Tiny FedAvg arm of the federated smoke study (tests/configs/tiny_fed_study.py): real SST-2
rows over 4 sites x 1 device, 2 rounds of 2 local steps, evaluated every round; seconds on CPU."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.vocab_size = 500
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.data.batch_size = 8
  c.data.max_train_examples = 256
  c.data.max_eval_examples = 32
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.progress = "none"
  c.eval.batch_size = 32
  c.fed.sites = (
      dict(name="a", cloud="gcp", devices=1, speed=1.0, price_device_hour=1.0,
           price_egress_gb=0.12),
      dict(name="b", cloud="gcp", devices=1, speed=0.5, price_device_hour=1.0,
           price_egress_gb=0.12),
      dict(name="c", cloud="aws", devices=1, speed=2.0, up_mbps=20.0, price_device_hour=2.0,
           price_egress_gb=0.09),
      dict(name="d", cloud="aws", devices=1, price_device_hour=2.0, price_egress_gb=0.09),
  )
  c.fed.rounds = 2
  c.fed.local_steps = 2
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 3e-3
  c.fed.partition = "dirichlet"
  c.fed.alpha = 0.5
  c.fed.min_per_site = 8
  c.fed.holdout = 0.0  # no per-site held-out evaluation: seconds saved
  c.fed.step_time_s = 0.1
  c.fed.eval_every = 1
  c.fed.checkpoint_every = 2
  c.study.arm = "fedavg"
  c.study.parts = ("central", "aggregation")
  return c
