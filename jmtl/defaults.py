"""The complete default configuration: every key jmtl knows, with its type and default.

Config files under `configs/` start from `base_config()` and change values; a key that is not
here is an error (see `jmtl.config`).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the default ConfigDict; every key of every config lives here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Task names from the registry (`jmtl.tasks.TASKS`).
  c.tasks = ("sst2",)

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.dir = ""  # root of the data files; "" = $JMTL_DATA_DIR
  c.data.tfds_dir = ""  # TFDS data_dir for tasks read through tfds.data_source
  c.data.tokenizer = ""  # path to tokenizer.json or vocab.txt; "" = train one
  c.data.tokenizer_kind = "wordpiece"  # wordpiece | bpe (when training one)
  c.data.vocab_size = 8000
  c.data.lowercase = True
  c.data.max_len = 128  # source length limit (tasks may set a smaller one)
  c.data.max_target_len = 32  # decoder length limit for seq2seq tasks
  c.data.length_buckets = (128,)  # pad each batch to the smallest bucket that fits
  c.data.batch_size = 32  # global batch (rows per step, all tasks together)
  c.data.mixture = "proportional"  # proportional | temperature | uniform | explicit
  c.data.temperature = 2.0  # for mixture=temperature: rate ~ size^(1/T)
  c.data.rates = ml_collections.ConfigDict()  # for mixture=explicit: {task: rate}
  c.data.mixing = "task_per_batch"  # task_per_batch | mixed
  c.data.max_train_examples = 0  # per task; 0 = all
  c.data.max_eval_examples = 0  # per task; 0 = all
  c.data.doc_stride = 64  # SQuAD windows
  c.data.bad_rows = "error"  # error | skip
  c.data.split_seed = 0  # seed of deterministic train/validation/test splits of unsplit data
  c.data.eval_split = "validation"  # split evaluated during and after training

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.trunk = "transformer"  # transformer | bilstm
  c.model.layers = 4
  c.model.d_model = 256
  c.model.heads = 4
  c.model.d_ff = 1024
  c.model.dropout = 0.1
  c.model.attention_dropout = 0.1
  c.model.max_len = 512  # size of the learned position table
  c.model.type_vocab_size = 2
  c.model.norm = "post"  # post (BERT) | pre
  c.model.positions = "learned"  # learned (BERT) | rope
  c.model.activation = "gelu"  # gelu (BERT, exact erf) | swiglu
  c.model.layer_norm_eps = 1e-12
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.pooling = "first"  # first | mean (classification heads)
  c.model.init_from = ""  # directory of a BERT-family checkpoint (model.safetensors + config.json)
  c.model.init_layers = 0  # load only the checkpoint's first N encoder layers (= model.layers); 0 = all
  c.model.lstm_hidden = 256  # bilstm trunk: hidden size per direction
  c.model.lstm_layers = 1
  c.model.decoder = ml_collections.ConfigDict()
  c.model.decoder.layers = 2
  c.model.decoder.heads = 4
  c.model.decoder.d_ff = 1024
  c.model.decoder.tie_embeddings = True
  c.model.decoder.label_smoothing = 0.1
  c.model.decoder.copy = False  # pointer-generator copy from the source (See et al. 2017)

  # ---------------------------------------------------------------- optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 0
  c.optim.schedule = "linear"  # constant | linear | cosine | exponential (decay after warmup)
  c.optim.end_lr_factor = 0.0  # final lr = lr * end_lr_factor
  c.optim.decay_rate = 0.1  # exponential schedule: lr * decay_rate^(t / decay_steps)
  c.optim.weight_decay = 0.01
  # which parameters decay: all | matrices (ndim >= 2: kernels, embeddings; not biases or
  # LayerNorm scales / offsets, the usual BERT fine-tuning rule)
  c.optim.weight_decay_mask = "all"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.momentum = 0.9
  c.optim.grad_clip = 1.0  # global-norm clip; 0 = off
  # paper_adaptive / jmtl_adaptive: metric-driven learning rate
  c.optim.plateau_patience = 2  # validations without improvement before lowering
  c.optim.plateau_factor = 0.5  # lr multiplier on a plateau
  c.optim.plateau_min_delta = 0.0
  c.optim.raise_after = 0  # validations of sustained improvement before raising (0 = never)
  c.optim.raise_factor = 1.1
  c.optim.min_scale = 0.01  # lower bound of the metric-driven lr multiplier
  c.optim.max_scale = 1.0
  c.optim.late_decay_start = 0.8  # fraction of training after which exponential decay starts
  c.optim.late_decay_rate = 0.1  # lr multiplier reached at the last step
  # jmtl_adaptive component switches
  c.optim.belief = False  # AdaBelief second moment (off: no gain in the optimizer study, +8 % time)
  c.optim.belief_eps = 1e-16  # added to the belief second moment each step (AdaBelief's eps)
  c.optim.cautious = True  # mask updates whose sign disagrees with the gradient
  c.optim.block_nu = True  # one second moment per output neuron of each kernel (Adam-mini)
  c.optim.trust_ratio = False  # LAMB layer-wise trust ratio
  c.optim.update_clip = 0.0  # clip each update element to [-c, c]; 0 = off
  c.optim.metric_schedule = True  # use the plateau / late-decay logic

  # ---------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 takes the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # logical axis -> mesh axes (None = replicated); T5X / MaxText style rules table.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("labels", None),
  )

  # ---------------------------------------------------------------- training
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500  # 0 = only at the end
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.on_nonfinite = "halt"  # halt | skip
  # score fed to the metric-driven optimizers after each evaluation: "mean" = mean over tasks of
  # each task's first metric; "<task>/<metric>" = that metric; "" = the first task's first metric
  c.train.val_metric = "mean"
  c.train.progress = "auto"  # auto | bar | lines | none

  # ---------------------------------------------------------------- evaluation
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.beam_size = 1  # 1 = greedy
  c.eval.length_penalty = 0.6
  c.eval.max_decode_len = 32
  c.eval.no_repeat_ngram = 0
  c.eval.n_best = 20  # SQuAD span candidates per feature
  c.eval.max_answer_len = 30  # SQuAD, in tokens

  # ---------------------------------------------------------------- optimizer study (`jmtl sweep`)
  c.sweep = ml_collections.ConfigDict()
  c.sweep.optimizers = ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw",
                        "paper_adaptive", "jmtl_adaptive")
  # (optimizer, centre lr) pairs; grid = centre * lr_ratio ** (k - (lr_points - 1) // 2)
  c.sweep.lr_centres = (
      ("sgd", 0.1), ("momentum", 0.01), ("nesterov", 0.01), ("adagrad", 0.01),
      ("rmsprop", 3e-4), ("adam", 1e-3), ("adamw", 1e-3), ("lion", 1e-4), ("lamb", 3e-3),
      ("adafactor", 1e-2), ("schedule_free_adamw", 1e-3), ("paper_adaptive", 1e-3),
      ("jmtl_adaptive", 1e-3),
  )
  c.sweep.lr_points = 4  # learning rates per optimizer (>= 4)
  c.sweep.lr_ratio = 3.0  # ratio of neighbouring grid points (> 1)
  c.sweep.seeds = (0, 1, 2)  # values of `seed`, >= 3
  c.sweep.select_metric = ""  # "<task>/<metric>"; "" = mean over tasks of each first metric
  # (optimizer, "section.key", value) triples applied to that optimizer's runs only
  c.sweep.overrides = ()
  # jmtl_adaptive switches turned off one at a time at its best lr; () = no ablation
  c.sweep.ablation = ("belief", "cautious", "block_nu", "metric_schedule")
  # fresh seeds (not in `seeds`, >= 2) run again at each optimizer's best lr; () = none
  c.sweep.confirm_seeds = ()
  c.sweep.target_fraction = 0.95  # steps-to-target: fraction of the best mean final score
  c.sweep.reference = "adamw"  # steps-to-target ratios are relative to this optimizer
  return c
