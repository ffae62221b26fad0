"""The optimizer study (`jmtl sweep` + `jmtl report optim`): SST-2 + MRPC on one small trunk.

Every optimizer trains the same 2-layer encoder from scratch on the same data for the same
number of steps, over its own 4-point learning-rate grid and 3 seeds; the `jmtl_adaptive`
switches are then ablated at its best learning rate. Sized for a 2-core CPU (see
docs/results/optim_study/README.md for the measured time).
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.tasks = ("sst2", "mrpc")
  c.data.vocab_size = 4000
  c.data.max_len = 64
  c.data.length_buckets = (64,)  # one shape per task: fewer compilations per run
  c.data.batch_size = 32
  c.data.mixture = "uniform"
  c.data.mixing = "task_per_batch"
  c.data.max_train_examples = 4000
  c.data.max_eval_examples = 400  # the first 400 dev rows (SST-2 has 872, MRPC 408)
  c.model.layers = 2
  c.model.d_model = 64
  c.model.heads = 2
  c.model.d_ff = 256
  c.model.max_len = 64
  c.model.pooling = "mean"  # learns far faster from scratch than the [CLS] vector
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.optim.warmup_steps = 10
  c.optim.schedule = "linear"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.train.steps = 90
  c.train.log_every = 5
  c.train.eval_every = 15
  c.train.checkpoint_every = 90
  c.train.keep_checkpoints = 1
  c.train.progress = "none"
  c.eval.batch_size = 128
  # The paper's baselines (SGD, Momentum, AdaGrad, RMSProp, Adam) with AdamW (weight decay 0.01)
  # standing in for Adam, and our two. Add "adam" here to run it too (the sweep resumes).
  c.sweep.optimizers = ("sgd", "momentum", "adagrad", "rmsprop", "adamw", "paper_adaptive",
                        "jmtl_adaptive")
  # The adaptive optimizers bring their own metric-driven decay: no linear decay under it.
  c.sweep.overrides = (("paper_adaptive", "optim.schedule", "constant"),
                       ("jmtl_adaptive", "optim.schedule", "constant"))
  # Grid centres: the usual rate of each family; SGD-type rates are larger (no normalisation).
  c.sweep.lr_centres = (("sgd", 0.3), ("momentum", 0.03), ("adagrad", 0.01), ("rmsprop", 1e-3),
                        ("adam", 1e-3), ("adamw", 1e-3), ("paper_adaptive", 1e-3),
                        ("jmtl_adaptive", 1e-3))
  c.sweep.seeds = (0, 1, 2)
  c.sweep.lr_points = 4
  c.sweep.lr_ratio = 3.0
  return c
