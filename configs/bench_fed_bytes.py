"""`jmtl bench federated` in bench.federated.mode = bytes_to_target on SST-2 (issue 15, req 6).

Uplink bytes to reach synchronous data-parallel training's best dev accuracy, for DiLoCo with
H = 10 and 50 local steps and uplink compression none / int8 / top-1 % + int8
(`jmtl.bench.federated.bytes_to_target`):
- SST-2 only (GLUE), training data capped at the first 20,000 records, the whole dev split
  (872 records); sentences cut at 64 tokens; a 4,000-word tokenizer trained once for every arm;
- a small trunk from scratch so that it fits a CPU: 2 layers, d_model 64, 2 heads, d_ff 256,
  pre-LN, mean pooling;
- 4 sites, one device each, IID split, no held-out rows (the synchronous arm trains on every
  row too), all sites in every round;
- T = 600 steps of the global batch 4 x 16 = 64 rows in every arm; dev evaluation every 50 steps;
- client AdamW lr 2e-3 constant (the synchronous arm's optimizer as well), weight decay 0.01,
  gradient clipping 1.0; DiLoCo's outer Nesterov step, lr 0.7, momentum 0.9 (Douillard et al.
  2023).
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2",)
  c.data.vocab_size = 4000
  c.data.max_len = 64
  c.data.length_buckets = (64,)
  c.data.batch_size = 16  # one site's batch per local step
  c.data.max_train_examples = 20000
  c.model.layers = 2
  c.model.d_model = 64
  c.model.heads = 2
  c.model.d_ff = 256
  c.model.max_len = 64
  c.model.norm = "pre"
  c.model.pooling = "mean"
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.train.progress = "none"
  c.eval.batch_size = 128
  c.fed.sites = tuple(dict(name=f"site{i}", devices=1) for i in range(4))
  c.fed.partition = "iid"
  c.fed.holdout = 0.0
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 2e-3
  c.fed.client_state = "keep"
  c.fed.server_optimizer = "nesterov"
  c.fed.server_lr = 0.7
  c.fed.server_momentum = 0.9
  c.fed.step_time_s = 0.1
  c.bench.federated.mode = "bytes_to_target"
  c.bench.federated.steps = 600
  c.bench.federated.eval_every = 50
  c.bench.federated.local_steps = (10, 50)
  c.bench.federated.compress = ("", "int8", "topk:0.01+int8")
  c.bench.federated.tolerance = 1.0
  return c
