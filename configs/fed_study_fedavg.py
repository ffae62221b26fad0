"""Federated study (issue 15), arm `fedavg`, and the setting every arm shares.

The arm: FedAvg (McMahan et al. 2017): each round every one of 4 sites takes H = 10 local AdamW
steps from the server model, and the server adds the example-weighted mean of their deltas
(server sgd, lr 1). The other arms (configs/fed_study_*.py) load this file and change one
thing: the partition (Dirichlet alpha), the aggregator or server optimizer, the uplink
compression, differential privacy, the deadline or asynchrony, or no federation at all
(`fed_study_central`). This arm is the reference they are paired with, seed by seed.

The shared setting, fixed before any run of the study and not tuned per arm:
- tasks SST-2 + MRPC (GLUE), every local step holding 8 rows of each (`data.mixing = mixed`);
  training data capped at 8,000 SST-2 records (MRPC has 3,668), dev on 256 records of each
  task (seeded subsets); sentences cut at 64 tokens; one 4,000-word tokenizer for every arm;
- a small trunk from scratch: 2 layers, d_model 64, 2 heads, d_ff 256, pre-LN, mean pooling;
- 4 sites, one device each, with the clouds' bandwidth, latency, speed and prices below
  (list-price-like figures for the simulation, not quotes); each task's rows split by label
  skew, Dirichlet alpha 0.3 (`fed.partition = dirichlet`), 5 % of each site's rows held out;
- 60 rounds x H = 10 local steps; client AdamW, lr 2e-3 constant, each site keeping its own
  optimizer state (DiLoCo-style); evaluation on dev every 5 rounds (and round 0);
- simulated time: a local step takes `fed.step_time_s` = 0.1 s at speed 1 (fixed, so simulated
  seconds are the same on every host), 20 % of the sampled sites straggle each round with 5x
  compute time (`fed.faults.stragglers`; seeded per round).

Total compute of one run: 4 sites x 10 local steps x 60 rounds = 2,400 site-steps of 16 rows
(38,400 training rows); `fed_study_central` trains one model for 600 steps of the 64-row summed
batch: the same rows and forward/backward passes.
"""

from jmtl.defaults import base_config

TASKS = ("sst2", "mrpc")
ROWS_PER_TASK = 8


def get_config():
  c = base_config()
  c.tasks = TASKS
  c.data.vocab_size = 4000
  c.data.max_len = 64
  c.data.length_buckets = (64,)
  c.data.batch_size = ROWS_PER_TASK * len(TASKS)  # one site's batch per local step
  c.data.mixing = "mixed"
  c.data.mixture = "uniform"
  c.data.max_train_examples = 8000
  c.data.max_eval_examples = 256
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
  c.fed.sites = (
      dict(name="gcp", cloud="gcp", region="us-central1", devices=1, speed=1.0,
           up_mbps=1000.0, down_mbps=1000.0, latency_ms=20.0, price_device_hour=2.5,
           price_egress_gb=0.12),
      dict(name="aws", cloud="aws", region="eu-west-1", devices=1, speed=0.8, up_mbps=500.0,
           down_mbps=1000.0, latency_ms=90.0, price_device_hour=3.0, price_egress_gb=0.09),
      dict(name="azure", cloud="azure", region="southeastasia", devices=1, speed=1.2,
           up_mbps=200.0, down_mbps=500.0, latency_ms=180.0, price_device_hour=2.8,
           price_egress_gb=0.087),
      dict(name="oci", cloud="oci", region="us-ashburn-1", devices=1, speed=0.6, up_mbps=100.0,
           down_mbps=200.0, latency_ms=60.0, price_device_hour=2.0, price_egress_gb=0.0085),
  )
  c.fed.rounds = 60
  c.fed.local_steps = 10
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 2e-3
  c.fed.client_state = "keep"
  c.fed.server_optimizer = "sgd"  # FedAvg
  c.fed.server_lr = 1.0
  c.fed.aggregator = "fedavg"
  c.fed.partition = "dirichlet"
  c.fed.alpha = 0.3
  c.fed.min_per_site = 16
  c.fed.holdout = 0.05
  c.fed.step_time_s = 0.1
  c.fed.faults.stragglers = 0.2
  c.fed.faults.straggler_slowdown = 5.0
  c.fed.eval_every = 5
  c.fed.checkpoint_every = 5
  c.fed.log_every = 1
  c.study.arm = "fedavg"
  c.study.parts = ("central", "noniid", "aggregation", "compression", "dp", "clouds")
  return c
