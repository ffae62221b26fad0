"""SST-2 + MRPC + STS-B + RTE over 4 clouds, non-IID: Dirichlet(0.3) label skew per task, and
tasks spread unevenly (no cloud holds all four; every task is held by two or three clouds).
Dynamic weighted aggregation (jmtl.federated.aggregation) with DiLoCo-style rounds.
Needs 8 devices (4 sites x 2); GLUE files under $JMTL_DATA_DIR/glue.
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2", "mrpc", "stsb", "rte")
  c.data.vocab_size = 16000
  c.data.max_len = 128
  c.data.length_buckets = (128,)
  c.data.batch_size = 32  # one site's batch per local step, all four tasks
  c.data.mixture = "uniform"
  c.data.mixing = "mixed"
  c.model.layers = 4
  c.model.d_model = 256
  c.model.heads = 4
  c.model.d_ff = 1024
  c.model.max_len = 128
  c.model.norm = "pre"
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.grad_clip = 1.0
  c.eval.batch_size = 64
  c.fed.sites = (
      dict(name="gcp", cloud="gcp", region="us-central1", devices=2, speed=1.0,
           up_mbps=1000.0, down_mbps=1000.0, latency_ms=20.0, price_device_hour=2.5,
           price_egress_gb=0.12, tasks=("sst2", "mrpc", "stsb")),
      dict(name="aws", cloud="aws", region="eu-west-1", devices=2, speed=0.8, up_mbps=500.0,
           down_mbps=1000.0, latency_ms=90.0, price_device_hour=3.0, price_egress_gb=0.09,
           tasks=("sst2", "rte")),
      dict(name="azure", cloud="azure", region="southeastasia", devices=2, speed=1.2,
           up_mbps=200.0, down_mbps=500.0, latency_ms=180.0, price_device_hour=2.8,
           price_egress_gb=0.087, tasks=("sst2", "mrpc", "rte")),
      dict(name="oci", cloud="oci", region="us-ashburn-1", devices=2, speed=0.6, up_mbps=100.0,
           down_mbps=200.0, latency_ms=60.0, price_device_hour=2.0, price_egress_gb=0.0085,
           tasks=("stsb", "sst2")),
  )
  c.fed.rounds = 50
  c.fed.local_steps = 20
  c.fed.client_optimizer = "adamw"
  c.fed.client_lr = 4e-4  # DiLoCo's inner lr
  c.fed.server_optimizer = "nesterov"
  c.fed.server_lr = 0.7
  c.fed.server_momentum = 0.9
  c.fed.aggregator = "dynamic"
  c.fed.temperature = 1.0
  c.fed.partition = "dirichlet"
  c.fed.alpha = 0.3
  c.fed.min_per_site = 32
  c.fed.holdout = 0.05
  c.fed.participation = 0.75
  c.fed.eval_every = 10
  c.fed.checkpoint_every = 5
  return c
