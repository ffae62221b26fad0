"""A tiny federated config for the Flower tests: BBC topic over 2 sites of 1 device, DiLoCo
(client AdamW, server Nesterov), 3 rounds of 2 local steps; seconds per round on CPU."""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("bbc_topic",)
  c.data.vocab_size = 300
  c.data.max_len = 32
  c.data.length_buckets = (32,)
  c.data.batch_size = 8
  c.data.max_train_examples = 120
  c.data.max_eval_examples = 16
  c.model.layers = 1
  c.model.d_model = 32
  c.model.heads = 2
  c.model.d_ff = 64
  c.model.max_len = 64
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.progress = "none"
  c.eval.batch_size = 16
  c.fed.sites = (dict(name="a", devices=1), dict(name="b", devices=1))
  c.fed.rounds = 3
  c.fed.local_steps = 2
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 3e-3
  c.fed.server_optimizer = "nesterov"
  c.fed.server_lr = 0.7
  c.fed.server_momentum = 0.9
  c.fed.partition = "iid"
  c.fed.holdout = 0.1
  c.fed.step_time_s = 0.05
  return c
