"""Federated quickstart (offline): the BBC News quickstart model trained over 4 simulated clouds.

Sites are slices of the device mesh (4 sites x 2 devices: run with 8 devices, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU). Topic labels are split non-IID
(Dirichlet alpha 0.5); the "edge" site holds only the topic task, so the headline head is
averaged over the three other sites. Rounds: AdamW clients whose state every site keeps across
rounds, FedAvg server (sgd, lr 1.0). DiLoCo's outer step is
`--config.fed.server_optimizer=nesterov --config.fed.server_lr=0.7` (momentum 0.9); with only 5
local steps a round it trained worse here (README, "Federated training").
Runs in about 4 minutes on a 2-core CPU host.
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("bbc_topic", "bbc_headline")
  c.data.vocab_size = 8000
  c.data.max_len = 128
  c.data.max_target_len = 16
  c.data.length_buckets = (128,)
  c.data.batch_size = 32  # one site's batch per local step (16 rows per task)
  c.data.mixture = "uniform"
  c.data.mixing = "mixed"
  c.model.layers = 2
  c.model.d_model = 128
  c.model.heads = 4
  c.model.d_ff = 512
  c.model.max_len = 128
  c.model.norm = "pre"
  c.model.pooling = "mean"
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.decoder.layers = 2
  c.model.decoder.heads = 4
  c.model.decoder.d_ff = 512
  c.model.decoder.label_smoothing = 0.1
  c.model.decoder.copy = True
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.train.progress = "auto"
  c.eval.batch_size = 64
  c.eval.beam_size = 4
  c.eval.max_decode_len = 16
  c.eval.no_repeat_ngram = 1
  # Four clouds; prices are list-price-like figures for a simulation, not quotes.
  c.fed.sites = (
      dict(name="gcp-us", cloud="gcp", region="us-central1", devices=2, speed=1.0,
           up_mbps=1000.0, down_mbps=1000.0, latency_ms=20.0, price_device_hour=2.5,
           price_egress_gb=0.12),
      dict(name="aws-eu", cloud="aws", region="eu-west-1", devices=2, speed=0.8,
           up_mbps=500.0, down_mbps=1000.0, latency_ms=90.0, price_device_hour=3.0,
           price_egress_gb=0.09),
      dict(name="azure-asia", cloud="azure", region="southeastasia", devices=2, speed=1.2,
           up_mbps=200.0, down_mbps=500.0, latency_ms=180.0, price_device_hour=2.8,
           price_egress_gb=0.087),
      dict(name="edge", cloud="onprem", region="lab", devices=2, speed=0.5, up_mbps=50.0,
           down_mbps=100.0, latency_ms=40.0, price_device_hour=0.5, price_egress_gb=0.0,
           tasks=("bbc_topic",)),
  )
  c.fed.rounds = 20
  c.fed.local_steps = 5
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 2e-3
  c.fed.server_optimizer = "sgd"  # FedAvg
  c.fed.server_lr = 1.0
  c.fed.server_momentum = 0.9  # used by server nesterov / momentum only
  c.fed.aggregator = "fedavg"
  c.fed.partition = "dirichlet"
  c.fed.alpha = 0.5
  c.fed.min_per_site = 16
  c.fed.holdout = 0.1
  c.fed.eval_every = 0
  c.fed.checkpoint_every = 5
  return c
