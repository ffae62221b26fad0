"""Multi-task study (arXiv 2412.06249), arm `mtl_scratch`, and the setting every arm shares.

The arm: one transformer trunk (4 layers, d_model 256, BERT-style post-LN, mean pooling) from
random initialisation, with one head per task (a 2-layer decoder with the copy mechanism for
DialogSum), trained on all seven tasks at once: SST-2, CoLA, MRPC, RTE, STS-B, DialogSum and the
SQuAD split (`squad`: SQuAD v1.1 dev split by article, see README "Tasks"). Every batch holds
every task (`data.mixing = "mixed"`, uniform rates): 8 rows of each task per step, 56 rows.
Task losses are summed with equal weights. Paired in `jmtl report mtl` with `single_scratch`
(configs/mtl_single_scratch.py).

The shared setting. The other arms load this file and change only the model (pretrained
MiniLM-L6, Bi-LSTM + attention), the task weighting, or single- vs multi-task; the training
hyperparameters below are one fixed setting for every arm, not tuned per arm, and were chosen
without looking at any dev score of this study:
- AdamW, peak lr 3e-4, 24 warm-up steps (10 %), linear decay to 0, weight decay 0.01,
  gradient clip 1.0, dropout 0.1. 3e-4 is AdamW's rate in the optimizer study
  (docs/results/optim_study), which chose it on 128 dev rows (a seeded subset) of SST-2, MRPC
  and SQuAD with a 2-layer MiniLM trunk: another study, but the same dev sets for those three tasks.
- 240 steps of 8 rows per task: each task sees 1,920 training examples (about one pass over
  its capped train split). A single-task arm trains each task's model for the same 240 steps
  of that task's 8 rows (`study.single_task`), so every arm has the same per-task step and
  example budget.

Budgets sized for a 2-core CPU host (this is not the paper's scale; scores are far below
published ones): training data subsampled to 2,000 records of each task (a seeded subset in
file order, `data.max_train_examples`; SST-2 has 67k, DialogSum 12k), evaluation on 256 dev
records / questions of each task (`data.max_eval_examples`), sources cut at 128 tokens
(DialogSum dialogues are often longer: its ROUGE suffers), summaries at 64, greedy decoding,
3 evaluations per run. Run it with `jmtl study mtl --config configs/mtl_study.py`.
"""

from jmtl.defaults import base_config

TASKS = ("sst2", "cola", "mrpc", "rte", "stsb", "dialogsum", "squad")
ROWS_PER_TASK = 8
STEPS = 240


def get_config():
  c = base_config()
  c.tasks = TASKS
  c.data.vocab_size = 8000  # one tokenizer trained on the seven tasks, shared by the arms
  c.data.max_len = 128
  c.data.length_buckets = (64, 128)
  c.data.doc_stride = 64  # SQuAD windows of 128 tokens, stride 64
  c.data.max_target_len = 64
  c.data.batch_size = ROWS_PER_TASK * len(TASKS)
  c.data.mixing = "mixed"
  c.data.mixture = "uniform"
  c.data.max_train_examples = 2000
  c.data.max_eval_examples = 256
  c.model.layers = 4
  c.model.d_model = 256
  c.model.heads = 4
  c.model.d_ff = 1024
  c.model.max_len = 128
  c.model.pooling = "mean"
  c.model.decoder.layers = 2
  c.model.decoder.heads = 4
  c.model.decoder.d_ff = 1024
  c.model.decoder.copy = True
  c.optim.name = "adamw"
  c.optim.lr = 3e-4
  c.optim.warmup_steps = STEPS // 10
  c.optim.schedule = "linear"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip = 1.0
  c.train.steps = STEPS
  c.train.log_every = 10
  c.train.eval_every = STEPS // 3
  c.train.checkpoint_every = STEPS // 3
  c.train.keep_checkpoints = 1
  c.train.progress = "none"
  c.eval.batch_size = 64
  c.eval.beam_size = 1
  c.eval.max_decode_len = 64
  c.mtl.weighting = "equal"
  c.study.arm = "mtl_scratch"
  c.study.reference = "single_scratch"
  return c
