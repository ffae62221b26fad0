"""The complete default configuration: every key jmtl knows, each declared exactly once.

Read this file as the list of keys. One `_key(...)` line declares one key with all it needs:

  _key("optim.eps", 1e-8, "Adam epsilon, added to sqrt(nu)", check=gt(0))
        name         default  meaning (with units)            allowed values

- **type**: the type of the default (bool, int, float, str, tuple, dict). A float key also takes
  an int; a tuple key takes a tuple or list (`--config.data.length_buckets=64` means `(64,)`).
- **default**: the value `base_config()` gives.
- **meaning**: what the key does, with units; the comments of the old file live here.
- **allowed values**: `choices=(...)` (a fixed list), and/or `check=(predicate, text)` on the
  value alone (helpers: `ge(x)` ">= x", `gt(x)` "> x", `between(lo, hi)` "in [lo, hi]" with
  open ends as asked), and/or `rules=((predicate(value, config), text), ...)` for rules across
  keys (`text` may use `{c.section.key}` for other values, or be a function of the config).

A config that breaks a declaration raises `jmtl.config.ConfigError` with one line
`config key 'optim.eps' = 0.0 must be > 0`. `jmtl.config.validate` checks types, choices,
ranges and cross-key rules from `KEYS`; `jmtl.preflight` adds what needs registries, files and
devices (task names, data files, `model.init_from`, the mesh against the device count).
Config files under `configs/` start from `base_config()` and change values; a key that is not
here is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections

Check = tuple[Callable[[Any], bool], str]
Rule = tuple[Callable[[Any, Any], bool], "str | Callable[[Any], str]"]


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: dotted `name`, `default` (its type is the key's type), `help` (meaning),
  `choices` (allowed values or None), `check` (predicate on the value, description shown as
  "must be <description>") and `rules` (predicates on (value, config), each with the text shown
  after "config key 'k' = v " when it fails)."""

  name: str
  default: Any
  help: str
  choices: tuple[Any, ...] | None = None
  check: Check | None = None
  rules: tuple[Rule, ...] = ()

  @property
  def type(self) -> type:
    """bool, int, float, str, tuple or dict (the type a value of this key must have)."""
    d = self.default
    return dict if isinstance(d, (dict, ml_collections.ConfigDict)) else (
        tuple if isinstance(d, list) else type(d))


KEYS: dict[str, Key] = {}


def _key(name: str, default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
         check: Check | None = None, rules: tuple[Rule, ...] = ()) -> None:
  if name in KEYS:
    raise ValueError(f"config key {name!r} declared twice")
  KEYS[name] = Key(name, default, help, choices, check, rules)


# ------------------------------------------------------------------ range helpers
def ge(lo: float) -> Check:
  """Value >= lo."""
  return (lambda v: v >= lo, f">= {lo}")


def gt(lo: float) -> Check:
  """Value > lo."""
  return (lambda v: v > lo, f"> {lo}")


def finite_ge(lo: float) -> Check:
  """A finite value >= lo (where infinity would turn into NaN downstream)."""
  return (lambda v: math.isfinite(v) and v >= lo, f"finite and >= {lo}")


def finite_gt(lo: float) -> Check:
  """A finite value > lo."""
  return (lambda v: math.isfinite(v) and v > lo, f"finite and > {lo}")


def between(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> Check:
  """lo <= value <= hi, with either end open (strict) when asked; text like "in (0, 1]"."""
  def ok(v: Any) -> bool:
    return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
  return (ok, f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}")


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _ints(minimum: int, *, at_least: int = 0, distinct: bool = False) -> Check:
  """A tuple of ints >= minimum, with at least `at_least` entries (and distinct when asked)."""
  def ok(v: Any) -> bool:
    return (len(v) >= at_least and all(_is_int(x) and x >= minimum for x in v)
            and (not distinct or len(set(v)) == len(v)))
  what = f"{'distinct ' if distinct else ''}ints >= {minimum}"
  return (ok, f"a tuple of >= {at_least} {what}" if at_least else f"a tuple of {what}")


def _strs(*, at_least: int = 0) -> Check:
  """A tuple of distinct non-empty strings with at least `at_least` entries."""
  return (lambda v: len(v) >= at_least and len(set(v)) == len(v)
          and all(isinstance(x, str) and x for x in v),
          f"a tuple of >= {at_least} distinct names" if at_least else "a tuple of distinct names")


def malformed_uri(path: str) -> str | None:
  """The `scheme://` a path seems to mean when it starts `name:/` with one slash (`gs:/b/x`, a
  typo for `gs://b/x` that would otherwise be a local folder `./gs:/b/x`), else None. A scheme
  is a letter then letters, digits, '+', '-', '.' (RFC 3986 section 3.1), here >= 2 characters
  so that a drive letter (`C:/x`) is not one."""
  m = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", str(path))
  return f"{m.group(1)}://" if m else None


_URI_OK: Check = (lambda v: malformed_uri(v) is None,
                  "a local path or a URI with '://' (not 'name:/...': a missing slash)")


def _has_span_qa(c: Any) -> bool:
  """Whether a task of `c.tasks` reads SQuAD-style windows (unknown names: the registry check
  reports those)."""
  from jmtl import tasks  # noqa: PLC0415  (the registry is only needed for this rule)
  return any(tasks.TASKS[t].kind == "span_qa" for t in c.tasks if t in tasks.TASKS)


def _rates_ok(rates: Any) -> bool:
  return all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
             for r in rates.values())


def _mesh_rules_ok(rules: Any) -> bool:
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      return False
    axes = rule[1]
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if any(a not in MESH_AXES for a in names):
      return False
  return True


def _optim_names() -> str:
  from jmtl import optim  # noqa: PLC0415  (the registry is only needed for this rule)
  return ", ".join(optim.NAMES)


def _optim_name_ok(name: Any) -> bool:
  from jmtl import optim  # noqa: PLC0415
  return name in optim.NAMES


def _compress_ok(spec: Any) -> bool:
  from jmtl.federated import compression  # noqa: PLC0415  (a leaf module: jax and numpy only)
  return isinstance(spec, str) and compression.check_spec(spec)


MESH_AXES = ("data", "fsdp", "tensor")
_MESH_SIZE: Check = (lambda v: v >= 1 or v == -1, "a positive int or -1")
_UNIT: Check = between(0, 1, open_hi=True)  # probabilities, decay rates: [0, 1)

# ------------------------------------------------------------------ top level
_key("seed", 0, "PRNG seed of initialisation, dropout and the training data order", check=ge(0))
_key("tasks", ("sst2",), "task names from the registry (`jmtl.tasks.TASKS`)",
     check=_strs(at_least=1))

# ------------------------------------------------------------------ data
_key("data.dir", "", "root of the data files; '' = $JMTL_DATA_DIR", check=_URI_OK)
_key("data.tfds_dir", "", "TFDS data_dir for tasks read through tfds.data_source; '' = off",
     check=_URI_OK)
_key("data.tfds_download_dir", "",
     "jmtl data prepare: where TFDS downloads and extracts archives; '' = "
     "<data.tfds_dir>/downloads", check=_URI_OK)
_key("data.tfds_manual_dir", "",
     "jmtl data prepare: folder of manually downloaded archives (TFDS manual_dir; a file is used "
     "when its name and sha256 match TFDS's registered checksum); '' = <download dir>/manual",
     check=_URI_OK)
_key("data.tokenizer", "", "path to tokenizer.json or vocab.txt (UTF-8); '' = train one")
_key("data.tokenizer_kind", "wordpiece", "kind of tokenizer trained when data.tokenizer is ''",
     choices=("wordpiece", "bpe"))
_key("data.vocab_size", 8000, "tokens in a trained tokenizer", check=ge(100))
_key("data.lowercase", True, "lowercase text in a trained tokenizer")
_key("data.max_len", 128, "source length limit in tokens (tasks may set a smaller one)",
     check=ge(8),
     rules=((lambda v, c: c.model.positions != "learned" or v <= c.model.max_len,
             "exceeds model.max_len = {c.model.max_len} (the learned position table)"),))
_key("data.max_target_len", 32, "decoder length limit in tokens for seq2seq tasks", check=ge(2))
_key("data.length_buckets", (128,),
     "padding lengths in tokens: each batch is padded to the smallest bucket that fits",
     check=_ints(1, at_least=1),
     rules=((lambda v, c: max(v) >= c.data.max_len,
             "must have a largest bucket >= data.max_len = {c.data.max_len}"),))
_key("data.batch_size", 32, "global batch in rows per step, all tasks together", check=ge(1),
     rules=((lambda v, c: c.data.mixing != "mixed" or v >= len(c.tasks),
             lambda c: f"must be >= the number of tasks ({len(c.tasks)}) with data.mixing = "
                       f"'mixed'"),))
_key("data.mixture", "proportional",
     "task mixing rates: proportional to size, temperature (size^(1/T)), annealed_temperature "
     "(size^(1/T(s)), 1/T linear over train.steps; Stickland & Murray 2019), unimax (uniform "
     "split of train.steps * data.batch_size examples, each task capped at data.unimax_epochs "
     "epochs; Chung et al. 2023), uniform, explicit",
     choices=("proportional", "temperature", "annealed_temperature", "unimax", "uniform",
              "explicit"),
     rules=((lambda v, c: v != "annealed_temperature" or c.data.mixing == "task_per_batch",
             "needs data.mixing = 'task_per_batch' (its rates change every step; 'mixed' "
             "fixes the rows of each task for the whole run)"),))
_key("data.temperature", 2.0, "mixture=temperature: rate ~ size^(1/T)", check=gt(0))
_key("data.temperature_start", 1.0,
     "mixture=annealed_temperature: T at step 0 (1 = proportional; Stickland & Murray's alpha = 1)",
     check=gt(0))
_key("data.temperature_end", 5.0,
     "mixture=annealed_temperature: T at the last step (5 = Stickland & Murray's alpha = 0.2)",
     check=gt(0))
_key("data.unimax_epochs", 1.0,
     "mixture=unimax: at most this many epochs of each task's train split (UniMax's N)",
     check=gt(0))
_key("data.rates", ml_collections.ConfigDict(), "mixture=explicit: {task: rate > 0}",
     check=(_rates_ok, "a dict {task: number > 0}"),
     rules=((lambda v, c: c.data.mixture != "explicit" or set(v) == set(c.tasks),
             lambda c: f"must give a rate for exactly the tasks {list(c.tasks)} (missing "
                       f"{[t for t in c.tasks if t not in c.data.rates]}, extra "
                       f"{[t for t in c.data.rates if t not in c.tasks]})"),))
_key("data.mixing", "task_per_batch",
     "task_per_batch: each step one task drawn by the rates; mixed: every task in every batch",
     choices=("task_per_batch", "mixed"))
_key("data.max_train_examples", 0,
     "training records per task (a seeded subset, file order kept); 0 = all", check=ge(0))
_key("data.max_eval_examples", 0,
     "evaluation records per task (a seeded subset, file order kept); 0 = all", check=ge(0))
_key("data.doc_stride", 64, "SQuAD windows: tokens between window starts", check=ge(1),
     rules=((lambda v, c: v < c.data.max_len or not _has_span_qa(c),
             "must be < data.max_len = {c.data.max_len} (windows would skip context)"),))
_key("data.bad_rows", "error", "a malformed data row: error (stop, naming file:line) or skip "
     "(count and log)", choices=("error", "skip"))
_key("data.split_seed", 0, "seed of deterministic train/validation/test splits of unsplit data",
     check=ge(0))
_key("data.eval_split", "validation", "split evaluated during and after training",
     choices=("train", "validation", "test"))

# ------------------------------------------------------------------ model
_key("model.trunk", "transformer", "shared trunk: transformer or bilstm (+ attention) baseline",
     choices=("transformer", "bilstm"))
_key("model.layers", 4, "trunk encoder layers", check=ge(1))
_key("model.d_model", 256, "trunk width", check=ge(1))
_key("model.heads", 4, "attention heads", check=ge(1),
     rules=((lambda v, c: c.model.d_model % v == 0,
             "must divide model.d_model = {c.model.d_model}"),))
_key("model.d_ff", 1024, "feed-forward width", check=ge(1))
_key("model.dropout", 0.1, "dropout rate", check=_UNIT)
_key("model.attention_dropout", 0.1, "attention-probability dropout rate", check=_UNIT)
_key("model.max_len", 512, "size of the learned position table (positions)", check=ge(1))
_key("model.type_vocab_size", 2, "token-type (segment) embeddings", check=ge(1))
_key("model.norm", "post", "LayerNorm placement: post (BERT) or pre", choices=("post", "pre"))
_key("model.positions", "learned", "positions: learned (BERT) or rope",
     choices=("learned", "rope"),
     rules=((lambda v, c: v != "rope" or (c.model.d_model // c.model.heads) % 2 == 0,
             "needs an even head size (model.d_model / model.heads)"),))
_key("model.activation", "gelu", "feed-forward activation: gelu (BERT, exact erf) or swiglu",
     choices=("gelu", "swiglu"))
_key("model.layer_norm_eps", 1e-12, "LayerNorm epsilon", check=gt(0))
_key("model.dtype", "float32", "compute dtype (parameters stay float32)",
     choices=("float32", "bfloat16"))
_key("model.pooling", "first", "classification heads pool the first token or the mean",
     choices=("first", "mean"))
_key("model.init_from", "",
     "directory of a BERT-family checkpoint (model.safetensors + config.json); '' = random init")
_key("model.init_layers", 0,
     "load only the checkpoint's first N encoder layers (N = model.layers); 0 = all",
     check=ge(0),
     rules=((lambda v, c: not v or bool(c.model.init_from),
             "is set but model.init_from is empty"),
            (lambda v, c: not v or v == c.model.layers,
             "must equal model.layers = {c.model.layers} (the trunk gets the checkpoint's first "
             "init_layers layers)")))
_key("model.lstm_hidden", 256, "bilstm trunk: hidden size per direction", check=ge(1))
_key("model.lstm_layers", 1, "bilstm trunk: layers", check=ge(1))
_key("model.decoder.layers", 2, "summarization decoder layers", check=ge(1))
_key("model.decoder.heads", 4, "decoder attention heads", check=ge(1),
     rules=((lambda v, c: c.model.d_model % v == 0,
             "must divide model.d_model = {c.model.d_model}"),))
_key("model.decoder.d_ff", 1024, "decoder feed-forward width", check=ge(1))
_key("model.decoder.tie_embeddings", True, "decoder output projection = the token embedding")
_key("model.decoder.label_smoothing", 0.1, "label smoothing of the decoder loss", check=_UNIT)
_key("model.decoder.copy", False, "pointer-generator copy from the source (See et al. 2017)")

# ------------------------------------------------------------------ optimizer
_key("optim.name", "adamw", "optimizer from the registry (`jmtl.optim.NAMES`)")
_key("optim.lr", 1e-3, "peak learning rate", check=gt(0))
_key("optim.warmup_steps", 0, "linear warmup steps", check=ge(0))
_key("optim.schedule", "linear", "lr decay after warmup",
     choices=("constant", "linear", "cosine", "exponential"))
_key("optim.end_lr_factor", 0.0, "final lr = lr * end_lr_factor", check=ge(0))
_key("optim.decay_rate", 0.1, "exponential schedule: lr * decay_rate^(t / decay_steps)",
     check=between(0, 1, open_lo=True))
_key("optim.weight_decay", 0.01, "decoupled weight decay per step (times lr)", check=ge(0))
_key("optim.weight_decay_mask", "all",
     "which parameters decay: all, or matrices (ndim >= 2: kernels, embeddings; not biases or "
     "LayerNorm scales / offsets, the usual BERT fine-tuning rule)", choices=("all", "matrices"))
_key("optim.b1", 0.9, "first-moment decay", check=_UNIT)
_key("optim.b2", 0.999, "second-moment decay", check=_UNIT)
_key("optim.eps", 1e-8, "Adam epsilon, added to sqrt(second moment)", check=gt(0))
_key("optim.momentum", 0.9, "momentum / nesterov coefficient", check=_UNIT)
_key("optim.grad_clip", 1.0, "global-norm gradient clip; 0 = off", check=ge(0))
# paper_adaptive / jmtl_adaptive: metric-driven learning rate
_key("optim.plateau_patience", 2, "validations without improvement before lowering the lr",
     check=ge(1))
_key("optim.plateau_factor", 0.5, "lr multiplier on a plateau",
     check=between(0, 1, open_lo=True, open_hi=True))
_key("optim.plateau_min_delta", 0.0, "improvement (metric points) that counts", check=ge(0))
_key("optim.raise_after", 0,
     "validations of sustained improvement before raising the lr; 0 = never", check=ge(0))
_key("optim.raise_factor", 1.1, "lr multiplier on sustained improvement", check=ge(1))
_key("optim.min_scale", 0.01, "lower bound of the metric-driven lr multiplier", check=gt(0),
     rules=((lambda v, c: v <= c.optim.max_scale,
             "must be <= optim.max_scale = {c.optim.max_scale}"),))
_key("optim.max_scale", 1.0, "upper bound of the metric-driven lr multiplier", check=gt(0))
_key("optim.late_decay_start", 0.8,
     "fraction of training after which exponential decay starts", check=between(0, 1))
_key("optim.late_decay_rate", 0.1, "lr multiplier reached at the last step",
     check=between(0, 1, open_lo=True))
# jmtl_adaptive component switches
_key("optim.belief", False,
     "AdaBelief second moment (off: no gain in the optimizer study, +8 % time)")
_key("optim.belief_eps", 1e-16, "added to the belief second moment each step (AdaBelief's eps)",
     check=ge(0))
_key("optim.cautious", True, "mask updates whose sign disagrees with the gradient")
_key("optim.block_nu", True, "one second moment per output neuron of each kernel (Adam-mini)")
_key("optim.trust_ratio", False, "LAMB layer-wise trust ratio")
_key("optim.update_clip", 0.0, "clip each update element to [-c, c]; 0 = off", check=ge(0))
_key("optim.metric_schedule", True, "use the plateau / late-decay logic")

# ------------------------------------------------------------------ mesh
_key("mesh.data", -1, "data-parallel axis size; -1 takes the remaining devices",
     check=_MESH_SIZE)
_key("mesh.fsdp", 1, "fully-sharded axis size; -1 takes the remaining devices", check=_MESH_SIZE)
_key("mesh.tensor", 1, "tensor-parallel axis size; -1 takes the remaining devices",
     check=_MESH_SIZE)
_key("mesh.rules", (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("labels", None),
), "logical axis -> mesh axes (None = replicated); T5X / MaxText style rules table",
     check=(_mesh_rules_ok, f"pairs (logical axis, mesh axes or None) over mesh axes "
                            f"{', '.join(MESH_AXES)}"))

_key("mesh.dcn_data", 1,
     "slices (TPU multislice: data-center network) the data axis spans; the data axis is "
     "dcn_data x (its part inside a slice), slice boundaries outermost (a hybrid mesh); 1 = one "
     "slice", check=ge(1),
     rules=((lambda v, c: v == 1 or c.mesh.data == -1 or c.mesh.data % v == 0,
             "must divide mesh.data = {c.mesh.data}"),))

# ------------------------------------------------------------------ multi-host
_key("dist.initialize", False,
     "join a multi-host run with jax.distributed.initialize (one process per host); the "
     "dist.* values left empty are detected by JAX (Cloud TPU, Slurm, Open MPI)")
_key("dist.coordinator_address", "", "host:port of process 0's coordinator; '' = detected")
_key("dist.num_processes", 0, "processes in the run; 0 = detected", check=ge(0))
_key("dist.process_id", -1, "this process's index; -1 = detected", check=ge(-1),
     rules=((lambda v, c: v < 0 or c.dist.num_processes == 0 or v < c.dist.num_processes,
             "must be < dist.num_processes = {c.dist.num_processes}"),))
_key("dist.initialization_timeout_s", 300,
     "seconds to wait for every process to join; 0 = JAX's default", check=ge(0))

# ------------------------------------------------------------------ training
_key("train.steps", 1000, "optimizer steps", check=ge(1))
_key("train.log_every", 50, "steps between train lines of metrics.jsonl", check=ge(1))
_key("train.eval_every", 500, "steps between evaluations; 0 = only at the end", check=ge(0))
_key("train.checkpoint_every", 500, "steps between checkpoints", check=ge(1))
_key("train.keep_checkpoints", 3, "checkpoints kept", check=ge(1))
_key("train.on_nonfinite", "halt",
     "non-finite loss: halt (naming step and task) or skip (drop the update, count it)",
     choices=("halt", "skip"))
_key("train.val_metric", "mean",
     "score fed to the metric-driven optimizers after each evaluation: 'mean' = mean over tasks "
     "of each task's first metric; '<task>/<metric>' = that metric; '' = the first task's first "
     "metric")
_key("train.progress", "auto", "progress display", choices=("auto", "bar", "lines", "none"))

# ------------------------------------------------------------------ task balancing (jmtl.mtl)
def _mixed_only(what: str) -> Rule:
  return (lambda v, c: c.data.mixing == "mixed" or v in ("none", "equal", "static",
                                                          "uncertainty", "dwa"),
          f"needs data.mixing = 'mixed' ({what}, so every batch must hold every task)")


_key("mtl.weighting", "equal",
     "task weights w_t on the loss gradients: equal (1), static (mtl.weights), uncertainty "
     "(Kendall et al. 2018), dwa (Liu et al. 2019), gradnorm (Chen et al. 2018), famo (Liu et "
     "al. 2023); logged as train/<task>/weight",
     choices=("equal", "static", "uncertainty", "dwa", "gradnorm", "famo"),
     rules=(_mixed_only("it compares the tasks' losses or gradients within one step"),))
_key("mtl.weights", ml_collections.ConfigDict(), "weighting=static: {task: weight > 0}",
     check=(_rates_ok, "a dict {task: number > 0}"),
     rules=((lambda v, c: c.mtl.weighting != "static" or set(v) == set(c.tasks),
             lambda c: f"must give a weight for exactly the tasks {list(c.tasks)} (missing "
                       f"{[t for t in c.tasks if t not in c.mtl.weights]}, extra "
                       f"{[t for t in c.mtl.weights if t not in c.tasks]})"),))
_key("mtl.gradient", "none",
     "combination of the per-task gradients of the shared trunk: none (sum), pcgrad (Yu et "
     "al. 2020), mgda (Sener & Koltun 2018), cagrad (Liu et al. 2021)",
     choices=("none", "pcgrad", "mgda", "cagrad"),
     rules=(_mixed_only("it needs per-task gradients of the trunk in one step"),))
_key("mtl.lr", 0.025, "Adam learning rate of learned task weights (uncertainty's log-variances, "
     "GradNorm's weights, FAMO's logits; FAMO's default)", check=gt(0))
_key("mtl.dwa_temperature", 2.0, "weighting=dwa: softmax temperature T", check=gt(0))
_key("mtl.dwa_period", 100, "weighting=dwa: steps per DWA 'epoch' (loss averaging period)",
     check=ge(1))
_key("mtl.gradnorm_alpha", 1.5, "weighting=gradnorm: asymmetry alpha", check=ge(0))
_key("mtl.famo_gamma", 0.01, "weighting=famo: L2 decay of the logits (FAMO's gamma)",
     check=ge(0))
_key("mtl.cagrad_c", 0.5, "gradient=cagrad: c (radius of the ball around the mean gradient, "
     "in units of its norm)", check=ge(0))

# ------------------------------------------------------------------ evaluation
_key("eval.batch_size", 64, "evaluation rows per batch (global)", check=ge(1))
_key("eval.beam_size", 1, "beam search width; 1 = greedy", check=ge(1))
_key("eval.length_penalty", 0.6, "beam length penalty alpha (GNMT)", check=ge(0))
_key("eval.max_decode_len", 32, "generated tokens at most", check=ge(1))
_key("eval.no_repeat_ngram", 0, "block repeated n-grams of this size; 0 = off", check=ge(0))
_key("eval.n_best", 20, "SQuAD span candidates per feature", check=ge(1))
_key("eval.max_answer_len", 30, "SQuAD answer length limit in tokens", check=ge(1))

# ------------------------------------------------------------------ federated (`jmtl federated`)
def _site_field(site: Any, field: str) -> Any:
  """One field of a raw `fed.sites` entry (a dict or ConfigDict; None when absent)."""
  return (site.to_dict() if hasattr(site, "to_dict") else dict(site)).get(field)


# Sites are slices of the device mesh's outermost `site` axis; each entry of `fed.sites` is a
# dict whose fields (name, cloud, region, devices, speed, up_mbps, down_mbps, latency_ms,
# price_device_hour, price_egress_gb, share | examples, tasks, data_dir) are declared and
# checked, entry by entry, in `jmtl.federated.sites.FIELDS`.
_key("fed.sites", (), "the sites: a tuple of dicts, fields in jmtl.federated.sites.FIELDS",
     check=(lambda v: all(isinstance(s, (dict, ml_collections.ConfigDict)) for s in v),
            "a tuple of dicts (one per site)"))
_key("fed.rounds", 20, "federated rounds (one round = broadcast, local steps, aggregate)",
     check=ge(1))
_key("fed.local_steps", 10, "client optimizer steps per site per round (H; DiLoCo's inner steps)",
     check=ge(1))
_key("fed.participation", 1.0,
     "fraction of sites sampled per round (at least one; seeded by (seed, round)); sampling "
     "changes aggregation weights, not shapes", check=between(0, 1, open_lo=True))
_key("fed.backend", "shard_map",
     "how the per-site function is mapped over `site`: shard_map (jax.shard_map; a site may "
     "span several devices) or pmap (jax.pmap with the same named collectives; one device per "
     "site), or flower: every site is its own process, a Flower SuperNode, and the server a "
     "Flower ServerApp (`jmtl federated` submits the run to the SuperLink of "
     "fed.flower.superlink; jmtl.federated.flower)", choices=("shard_map", "pmap", "flower"),
     rules=((lambda v, c: v != "flower" or (
         not c.fed.faults.dropout and not c.fed.faults.byzantine
         and not c.fed.faults.byzantine_fraction and not c.fed.faults.stragglers
         and not c.fed.deadline_s),
             "needs no fed.faults.* or fed.deadline_s (simulated faults; on Flower the sites "
             "are real processes)"),
            (lambda v, c: v != "flower" or c.fed.mode == "sync" or (
                not c.fed.secure_aggregation and not c.fed.dp.clip_norm > 0),
             "with fed.mode = 'async' needs fed.secure_aggregation = false and "
             "fed.dp.clip_norm = 0 (asynchronous FedBuff on Flower applies plain, unmasked "
             "updates: jmtl.federated.flower_async)"),
            (lambda v, c: v != "flower" or c.fed.mode == "sync" or not c.fed.holdout > 0,
             "with fed.mode = 'async' needs fed.holdout = 0 (the sites' held-out evaluation "
             "runs between synchronous Flower rounds; asynchronous sites always have a job in "
             "flight)"),
            (lambda v, c: v != "flower" or not c.fed.secure_aggregation
             or c.fed.participation == 1.0,
             "with fed.secure_aggregation needs fed.participation = 1 (Flower's SecAgg+ "
             "workflow asks every connected site)"),
            (lambda v, c: v != "flower" or not c.fed.secure_aggregation
             or c.fed.aggregator == "fedavg",
             lambda c: f"with fed.secure_aggregation needs fed.aggregator = 'fedavg', got "
                       f"{c.fed.aggregator!r} (Flower's SecAgg+ sums updates scaled by weights "
                       f"each site knows alone; {c.fed.aggregator!r} weights need every site's "
                       f"loss or update first)"),))
_key("fed.flower.superlink", "",
     "fed.backend=flower: the SuperLink connection `flwr run` uses (a name in the Flower "
     "configuration file $FLWR_HOME/config.toml, default ~/.flwr; \"\" = its default)",
     check=(lambda v: isinstance(v, str), "a string"))
_key("fed.flower.round_timeout", 600.0,
     "fed.backend=flower: seconds the server waits for the sites' replies in a round; a site "
     "that has not replied by then is dropped from the round (weights renormalise)", check=gt(0))
_key("fed.flower.wait_sites", 600.0,
     "fed.backend=flower: seconds the server waits before round 1 for every site's SuperNode to "
     "connect (it then starts with those connected)", check=ge(0))
_key("fed.flower.max_empty_rounds", 3,
     "fed.backend=flower: the server stops the run (its checkpoint kept, one line naming the "
     "rounds without a reply, the Flower run failed: `jmtl federated` exits 1) after this many "
     "consecutive rounds in which no site's reply was applied (every site gone); 0 = never stop",
     check=ge(0))
_key("fed.flower.secagg_max_weight", 1000.0,
     "fed.backend=flower with fed.secure_aggregation: the max_weight of Flower's SecAgg+ "
     "(SecAggPlusWorkflow; its default): site k's delta goes out scaled by q_k / Q, q_k = "
     "round(n_k / max_weight x Q) (n_k its examples), and a site whose scaled delta would be "
     "clipped or whose q_k rounds to 0 refuses (jmtl.federated.flower.secagg_check)",
     check=finite_gt(0))
_key("fed.flower.wait_s", 0.0,
     "fed.backend=flower: seconds `jmtl federated` follows this run's rounds.jsonl lines until "
     "round fed.rounds (when the workdir is visible here); a run that ends first (`flwr ls` "
     "status finished) or a wait that runs out is one `jmtl: error:` line and exit 1; "
     "0 = return once the run is submitted (then follow it with `flwr log RUN_ID` or the "
     "workdir's rounds.jsonl on the SuperLink's machine)",
     check=ge(0))
_key("fed.client_optimizer", "sgd",
     "client optimizer from the registry (sgd = FedAvg; adamw = DiLoCo's inner step); its other "
     "settings come from optim.*", rules=((lambda v, c: _optim_name_ok(v),
                                           lambda c: f"is not an optimizer name ({_optim_names()})"),))
_key("fed.client_lr", 0.1, "client peak learning rate (optim.schedule over rounds x local_steps)",
     check=gt(0))
_key("fed.prox_mu", 0.0, "FedProx proximal term mu/2 ||x - x_server||^2 in each local step; 0 = "
     "off (Li et al. 2020)", check=ge(0))
_key("fed.client_state", "keep",
     "client optimizer state across rounds: keep (each site's own, DiLoCo) or reset each round",
     choices=("keep", "reset"))
_key("fed.server_optimizer", "sgd",
     "server optimizer applied to the pseudo-gradient (sgd + server_lr 1 = FedAvg; nesterov = "
     "DiLoCo's outer step; momentum = FedAvgM; adam = FedAdam; jmtl_adaptive); constant lr, no "
     "clipping, no weight decay",
     rules=((lambda v, c: _optim_name_ok(v),
             lambda c: f"is not an optimizer name ({_optim_names()})"),))
_key("fed.server_lr", 1.0, "server learning rate (1.0 with sgd = FedAvg; DiLoCo: 0.7)",
     check=gt(0))
_key("fed.server_momentum", 0.9, "server momentum / nesterov coefficient (DiLoCo: 0.9)",
     check=_UNIT)
_key("fed.aggregator", "fedavg",
     "how the site deltas are combined: fedavg (examples) or dynamic (examples x exp(loss and "
     "improvement / T) / sqrt(1 + staleness)) or gradient (examples x exp(cos(update, mean "
     "update) / T)) (rules in jmtl.federated.aggregation); Byzantine-robust, every participant "
     "counting once: median (coordinate-wise), trimmed_mean (coordinate-wise, fed.trim), krum "
     "(Multi-Krum, fed.byzantine_f, fed.krum_m) (rules in jmtl.federated.robust)",
     choices=("fedavg", "dynamic", "gradient", "median", "trimmed_mean", "krum"))
_key("fed.temperature", 1.0, "aggregator=dynamic/gradient: temperature T (large T -> FedAvg)",
     check=gt(0))
_key("fed.trim", 0.1, "aggregator=trimmed_mean: beta, the fraction of participants dropped at "
     "each end of every coordinate (floor(beta x participants) values each side)",
     check=between(0, 0.5, open_hi=True))
_key("fed.byzantine_f", 1, "aggregator=krum: f, the Byzantine sites tolerated; a site's score sums "
     "its squared distances to its n - f - 2 nearest participants (n > 2f + 2 for Krum's "
     "guarantee)", check=ge(0),
     rules=((lambda v, c: c.fed.aggregator != "krum" or not c.fed.sites or v < len(c.fed.sites),
             lambda c: f"must be < the number of sites ({len(c.fed.sites)}) with "
                       f"aggregator=krum"),))
_key("fed.krum_m", 0, "aggregator=krum: participants with the lowest scores averaged (1 = Krum); "
     "0 = n - f", check=ge(0),
     rules=((lambda v, c: c.fed.aggregator != "krum" or not c.fed.sites or v <= len(c.fed.sites),
             lambda c: f"must be <= the number of sites ({len(c.fed.sites)}) with "
                       f"aggregator=krum"),))
_key("fed.faults.dropout", 0.0, "simulated fault: probability that each sampled site drops out of "
     "a round after sampling (seeded by (seed, round)); weights renormalise over the survivors, "
     "a round with none is skipped", check=between(0, 1, open_hi=True))
_key("fed.faults.byzantine", (), "simulated fault: names of Byzantine sites (from fed.sites), "
     "whose sent delta is corrupted by fed.faults.attack every round", check=_strs())
_key("fed.faults.byzantine_fraction", 0.0, "simulated fault: round(fraction x sites) Byzantine "
     "sites drawn once by seed (instead of naming them)", check=between(0, 1, open_hi=True),
     rules=((lambda v, c: not (v and c.fed.faults.byzantine),
             "cannot be set together with fed.faults.byzantine (name the sites or give a "
             "fraction)"),
            (lambda v, c: not v or not c.fed.sites or round(v * len(c.fed.sites)) >= 1,
             lambda c: f"gives round(fraction x {len(c.fed.sites)} sites) = 0 Byzantine sites; "
                       f"use at least {0.5 / len(c.fed.sites):.3g}")))
_key("fed.faults.attack", "sign_flip", "what a Byzantine site sends: sign_flip (-delta), scale "
     "(fed.faults.scale x delta) or noise (Gaussian with the delta's root-mean-square per value)",
     choices=("sign_flip", "scale", "noise"))
_key("fed.faults.scale", 10.0, "attack=scale: the factor a Byzantine site multiplies its delta by",
     check=finite_gt(0))
_key("fed.partition", "iid",
     "how each task's training rows are split over its sites: iid (by the sites' shares), "
     "dirichlet (label skew: per class, site proportions ~ Dir(alpha * S * share)), quantity "
     "(power-law shares k^-fed.power unless the sites give share / examples), or own: nothing "
     "is split, each site trains on the whole training split of each task it holds under its "
     "own data root (Flower: the SuperNode's node config data-dir, else the site's data_dir "
     "field, else data.dir / $JMTL_DATA_DIR; jmtl.federated.loop.own_records)",
     choices=("iid", "dirichlet", "quantity", "own"),
     rules=((lambda v, c: v != "own" or bool(c.data.tokenizer),
             "needs data.tokenizer set to a tokenizer file (every process must use the same "
             "vocabulary, and none may train one on pooled training text)"),
            (lambda v, c: v != "own" or not any(
                _site_field(s, "share") or _site_field(s, "examples") for s in c.fed.sites),
             "trains each site on all of its own rows: the fed.sites fields 'share' and "
             "'examples' split pooled rows and are refused with it")))
_key("fed.alpha", 0.5, "partition=dirichlet: concentration alpha (small = skewed)", check=gt(0))
_key("fed.power", 1.0, "partition=quantity: site k (from 1) gets a share ~ k^-power", check=ge(0))
_key("fed.min_per_site", 1, "training rows per task each holding site keeps at least (moved "
     "from the largest site)", check=ge(0))
_key("fed.holdout", 0.1, "fraction of each site's rows per task held out for its own evaluation",
     check=between(0, 1, open_hi=True))
_key("fed.deadline_s", 0.0, "simulated seconds after which a synchronous round drops a site; 0 = "
     "wait for the slowest", check=ge(0))
_key("fed.step_time_s", 0.0, "simulated seconds of one local step at speed 1; 0 = measured on "
     "this host (the median compiled round time / local_steps)", check=ge(0))
# Secure aggregation (jmtl.federated.secagg; Bonawitz et al. 2017; Flower SecAgg+'s names).
SECURE_AGGREGATORS = ("fedavg", "dynamic", "gradient")  # rules that only need weighted sums
_key("fed.secure_aggregation", False,
     "sum the sites' deltas by pairwise additive masks in Z_2^32 (X25519 + HKDF pair seeds, "
     "threefry masks): the aggregation sees only masked uint32 payloads; weights are public",
     rules=((lambda v, c: not v or c.fed.aggregator in SECURE_AGGREGATORS,
             lambda c: f"needs fed.aggregator in {SECURE_AGGREGATORS} (a secure sum reveals "
                       f"only the weighted sum; {c.fed.aggregator!r} must see each site's "
                       f"update)"),
            (lambda v, c: not v or (not c.fed.compress and not c.fed.dp.clip_norm > 0),
             "is not combined with fed.compress or fed.dp.* yet (the secure sum sends its own "
             "fixed-point payloads, and DP-FedAvg's clipped sum is not masked)"),
            (lambda v, c: not v or c.fed.backend != "flower" or len(c.fed.sites) >= 3,
             lambda c: f"with fed.backend = 'flower' needs at least 3 sites (Flower's SecAgg+ "
                       f"workflow), got {len(c.fed.sites)}")))
_key("fed.secagg.clipping_range", 1.0,
     "secure_aggregation: each coordinate of a site's delta is clipped to [-c, c] before its "
     "public weight is applied (units of the parameters); fed.backend=flower: Flower SecAgg+'s "
     "clipping_range, over the scaled delta n_k / fed.flower.secagg_max_weight x delta_k, which "
     "a site refuses to send rather than clip", check=finite_gt(0))
_key("fed.secagg.quantization_range", 2**22,
     "secure_aggregation: fixed-point levels Q over [-c, c] (step 2c / (Q - 1)); sites x Q/2 "
     "must stay <= 2^31 - 1 so the sum over sites cannot wrap modulo 2^32",
     check=between(2, 2**32),
     rules=((lambda v, c: not c.fed.secure_aggregation
             or len(c.fed.sites) * (v // 2) <= 2**31 - 1,
             lambda c: f"is too large for {len(c.fed.sites)} sites: the sum of their encoded "
                       f"updates could wrap modulo 2^32 (at most "
                       f"{2 * ((2**31 - 1) // max(len(c.fed.sites), 1)) + 1})"),))
_key("fed.eval_every", 0, "rounds between evaluations; 0 = only at the end", check=ge(0))
_key("fed.checkpoint_every", 5, "rounds between checkpoints", check=ge(1))
_key("fed.log_every", 1, "rounds between train lines of metrics.jsonl", check=ge(1))
_key("fed.compress", "",
     "uplink compression of each site's update: '' (float32), bf16, fp16, int8, q<b> / "
     "stochastic:<b> (b = 1..8), topk:<fraction> (with error feedback), or topk:<f>+<codec>; "
     "grammar and byte layout in jmtl.federated.compression",
     check=(lambda v: _compress_ok(v),
            "a compression spec: '', bf16, fp16, int8, q<b> (b = 1..8), stochastic:<b>, "
            "topk:<fraction in (0, 1]>, optionally topk:<f>+<one of the others>"))
_key("fed.compress_block", 256, "fed.compress=int8 / q<b>: values per scale block (one float32 "
     "scale, or lo and hi, per block)", check=ge(1))
_key("fed.dp.clip_norm", 0.0, "DP-FedAvg (McMahan et al. 2018): clip each site's update to this "
     "L2 norm C; 0 = differential privacy off", check=finite_ge(0),
     rules=((lambda v, c: not v > 0 or c.fed.aggregator == "fedavg",
             "needs fed.aggregator = fedavg (DP-FedAvg weights every participant 1 / (q S))"),))
_key("fed.dp.noise_multiplier", 0.0, "DP-FedAvg: Gaussian noise std on the sum of clipped "
     "updates, in units of fed.dp.clip_norm (z); 0 = clipping only (epsilon infinite)",
     check=finite_ge(0), rules=((lambda v, c: not v > 0 or c.fed.dp.clip_norm > 0,
                          "needs fed.dp.clip_norm > 0"),))
_key("fed.dp.delta", 1e-5, "DP-FedAvg: the delta at which epsilon is reported (rounds.jsonl "
     "dp_epsilon_rdp / dp_epsilon_pld)", check=between(0, 1, open_lo=True, open_hi=True))

# Asynchronous FedBuff rounds and stragglers (rules in jmtl.federated.asynchronous).
_key("fed.mode", "sync",
     "sync: every round waits for its participants; async: FedBuff (Nguyen et al. 2022), every "
     "site trains concurrently and the server steps when fed.buffer_size updates have arrived, "
     "each weighted by examples / sqrt(1 + staleness); a rounds.jsonl line per server step",
     choices=("sync", "async"),
     rules=((lambda v, c: v == "sync" or c.fed.aggregator == "fedavg",
             "needs fed.aggregator = 'fedavg' (its weights are FedBuff's, times the staleness "
             "factor)"),
            (lambda v, c: v == "sync" or c.fed.participation == 1.0,
             "needs fed.participation = 1 (every site trains concurrently)"),
            (lambda v, c: v == "sync" or c.fed.deadline_s == 0,
             "needs fed.deadline_s = 0 (a late site delivers later, it is not dropped)"),
            (lambda v, c: v == "sync" or c.fed.faults.dropout == 0,
             "needs fed.faults.dropout = 0 (random dropout is simulated in synchronous rounds "
             "only)")))
_key("fed.buffer_size", 1,
     "fed.mode=async: updates K the server buffers before it steps (FedBuff's K; K = number of "
     "sites is synchronous FedAvg)", check=ge(1),
     rules=((lambda v, c: not c.fed.sites or v <= len(c.fed.sites),
             lambda c: f"must be <= the number of sites ({len(c.fed.sites)})"),
            (lambda v, c: v == 1 or c.fed.mode == "async",
             "is used by fed.mode=async only (set fed.mode=async, or leave it at 1)")))
_key("fed.faults.stragglers", 0.0,
     "fraction of sites that straggle, drawn per round (seeded by seed, round): their compute "
     "time is multiplied by fed.faults.straggler_slowdown", check=between(0, 1))
_key("fed.faults.straggler_slowdown", 5.0,
     "compute-time factor of a straggler (sync: the round waits, or fed.deadline_s drops it; "
     "async: it delivers later)", check=ge(1))

# ------------------------------------------------------------------ optimizer study (`jmtl sweep`)
_key("sweep.optimizers", ("sgd", "momentum", "adagrad", "rmsprop", "adam", "adamw",
                          "paper_adaptive", "jmtl_adaptive"),
     "optimizers compared (registry names)", check=_strs(at_least=1))
_key("sweep.lr_centres", (
    ("sgd", 0.1), ("momentum", 0.01), ("nesterov", 0.01), ("adagrad", 0.01),
    ("rmsprop", 3e-4), ("adam", 1e-3), ("adamw", 1e-3), ("lion", 1e-4), ("lamb", 3e-3),
    ("adafactor", 1e-2), ("schedule_free_adamw", 1e-3), ("paper_adaptive", 1e-3),
    ("jmtl_adaptive", 1e-3),
), "(optimizer, centre lr) pairs; grid = centre * lr_ratio ** (k - (lr_points - 1) // 2)",
     check=(lambda v: all(isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
                          and isinstance(p[1], (int, float)) and p[1] > 0 for p in v),
            "(optimizer, lr > 0) pairs"))
_key("sweep.lr_points", 4, "learning rates per optimizer", check=ge(4))
_key("sweep.lr_ratio", 3.0, "ratio of neighbouring grid points", check=gt(1))
_key("sweep.seeds", (0, 1, 2), "values of `seed` run at each grid point",
     check=_ints(0, at_least=3, distinct=True))
_key("sweep.select_metric", "", "'<task>/<metric>' ranking runs; '' = mean over tasks of each "
     "first metric", check=(lambda v: not v or "/" in v, "'' or '<task>/<metric>'"))
_key("sweep.overrides", (),
     "(optimizer, 'section.key', value) triples applied to that optimizer's runs only",
     check=(lambda v: all(isinstance(t, (tuple, list)) and len(t) == 3 for t in v),
            "(optimizer, 'section.key', value) triples"))
_key("sweep.ablation", ("belief", "cautious", "block_nu", "metric_schedule"),
     "jmtl_adaptive switches turned off one at a time at its best lr; () = no ablation",
     check=_strs())
_key("sweep.confirm_seeds", (),
     "fresh seeds (not in sweep.seeds) run again at each optimizer's best lr; () = none",
     check=(lambda v: not v or _ints(0, at_least=2, distinct=True)[0](v),
            "() or a tuple of >= 2 distinct ints >= 0"),
     rules=((lambda v, c: not set(v) & set(c.sweep.seeds),
             "must share no seed with sweep.seeds = {c.sweep.seeds} (confirmation seeds must "
             "be fresh)"),))
_key("sweep.target_fraction", 0.95, "steps-to-target: fraction of the best mean final score",
     check=between(0, 1, open_lo=True))
_key("sweep.reference", "adamw", "steps-to-target ratios are relative to this optimizer",
     rules=((lambda v, c: v in c.sweep.optimizers,
             lambda c: f"is not in sweep.optimizers {list(c.sweep.optimizers)}"),))


# ------------------------------------------------------------------ multi-task study
# (`jmtl study mtl`, `jmtl report mtl`; jmtl.study.mtl). An arm config (configs/mtl_*.py) names
# its arm; the study config lists the arm configs and the seeds.
_key("study.arm", "",
     "name of the study arm this config trains; `jmtl report mtl` groups runs by it (read from "
     "each run's config.json); '' = not an arm",
     check=(lambda v: not v or all(ch.isalnum() or ch in "_-." for ch in v),
            "'' or a name of letters, digits, '_', '-', '.'"))
_key("study.single_task", False,
     "the arm trains one single-task model per task of `tasks`, each for train.steps steps of "
     "the rows that task has in a batch of the multi-task setting (data.batch_size / "
     "len(tasks)): the same per-task steps and examples as the multi-task arm",
     rules=((lambda v, c: not v or (c.data.mixing == "mixed" and c.data.mixture == "uniform"),
             "needs data.mixing = 'mixed' and data.mixture = 'uniform' (a task's rows per "
             "step of the multi-task setting)"),))
_key("study.reference", "",
     "arm whose runs this arm is paired with, seed by seed, in `jmtl report mtl` (its "
     "single-task counterpart); '' = none")
_key("study.arms", (),
     "jmtl study mtl / federated: the arms' config files, relative to the study config's folder",
     check=_strs())
_key("study.seeds", (0, 1, 2),
     "jmtl study mtl / federated: values of `seed` each arm is trained with",
     check=_ints(0, at_least=2, distinct=True))
# Federated study (`jmtl study federated`, `jmtl report federated`; jmtl.study.fed_report).
_key("study.centralized", False,
     "federated study: the arm is the centralized baseline of its federated config at equal "
     "total compute: one plain training run of fed.rounds x fed.local_steps steps of the summed "
     "batch (number of fed.sites x data.batch_size rows), optimizer fed.client_optimizer at "
     "fed.client_lr (jmtl.study.mtl.run_config; the arm config keeps fed.sites, the run's "
     "config.json has none)")
_key("study.parts", (),
     "federated study: the parts of `jmtl report federated` the arm is shown in (central, "
     "noniid, aggregation, compression, dp, clouds: issue 15's (a)-(f))",
     check=(lambda v: isinstance(v, (tuple, list)) and all(
         p in ("central", "noniid", "aggregation", "compression", "dp", "clouds") for p in v),
            "a tuple of: central, noniid, aggregation, compression, dp, clouds"))
_key("study.target", 0.0,
     "federated study: the dev score (percent, mean over tasks of each task's first metric) "
     "whose first reaching `jmtl report federated` counts in rounds and simulated seconds; set "
     "in the study config before any result is seen, copied into every run's config; 0 = none",
     check=ge(0))
_key("study.target_metric", "",
     "federated study: the dev metric ('task/metric', e.g. 'sst2/accuracy', percent) that "
     "`jmtl report federated` scores runs by (final score and rounds to study.target); '' = the "
     "mean over tasks of each task's first metric; set with study.target, copied into every run",
     check=(lambda v: isinstance(v, str) and (v == "" or (v.count("/") == 1 and all(
         v.split("/")))), "'' or 'task/metric', e.g. 'sst2/accuracy'"))


# ------------------------------------------------------------------ benchmarks
# (`jmtl bench scaling`; jmtl.bench.scaling)
BENCH_SIZES = ("tiny", "small", "base")
BENCH_LAYOUTS = ("data", "fsdp", "tensor", "mixed")
_key("bench.sizes", BENCH_SIZES,
     "jmtl bench scaling: model sizes to run, in this order (base is the ~125M-parameter "
     "GPT-2 small shape; jmtl.bench.scaling.SIZES)",
     check=(lambda v: len(v) >= 1 and len(set(v)) == len(v) and set(v) <= set(BENCH_SIZES),
            f"a non-empty tuple of distinct names from {', '.join(BENCH_SIZES)}"))
_key("bench.layouts", (),
     "jmtl bench scaling: mesh layouts to run for each size, in this order; () = every layout "
     "the device count allows (mixed needs >= 8 devices, a multiple of 4)",
     check=(lambda v: len(set(v)) == len(v) and set(v) <= set(BENCH_LAYOUTS),
            f"() or a tuple of distinct names from {', '.join(BENCH_LAYOUTS)}"))

# (`jmtl bench federated`; jmtl.bench.federated)
_key("bench.federated.mode", "round",
     "jmtl bench federated: round (a round's seconds against H centralised steps) or "
     "bytes_to_target (uplink bytes each DiLoCo arm needs to reach synchronous data-parallel "
     "training's best dev score; jmtl.bench.federated.bytes_to_target)",
     choices=("round", "bytes_to_target"))
_key("bench.federated.steps", 600,
     "bytes_to_target: total optimizer steps T of every arm (sync: T steps of the global batch "
     "sites x data.batch_size; DiLoCo at H: T / H rounds of H local steps per site)",
     check=ge(1))
_key("bench.federated.local_steps", (10, 50),
     "bytes_to_target: the DiLoCo arms' local steps H, each dividing bench.federated.steps and "
     "bench.federated.eval_every",
     check=_ints(1, at_least=1, distinct=True),
     rules=((lambda v, c: all(c.bench.federated.steps % h == 0
                              and c.bench.federated.eval_every % h == 0 for h in v),
             "must divide bench.federated.steps = {c.bench.federated.steps} and "
             "bench.federated.eval_every = {c.bench.federated.eval_every}"),))
_key("bench.federated.compress", ("", "int8", "topk:0.01+int8"),
     "bytes_to_target: the fed.compress specs run at each H ('' = float32)",
     check=(lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(_compress_ok(x) for x in v),
            "a non-empty tuple of distinct fed.compress specs (grammar in "
            "jmtl.federated.compression)"))
_key("bench.federated.eval_every", 50,
     "bytes_to_target: steps between dev evaluations of every arm (same steps for all arms)",
     check=ge(1), rules=((lambda v, c: c.bench.federated.steps % v == 0,
                          "must divide bench.federated.steps = {c.bench.federated.steps}"),))
_key("bench.federated.tolerance", 1.0,
     "bytes_to_target: points (percent) of dev score an arm may stay below the synchronous "
     "reference and still count as reaching it", check=ge(0))


def _fresh(value: Any) -> Any:
  """A new copy of a mutable default (dicts), so configs never share one."""
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    return ml_collections.ConfigDict(dict(value))
  return value


def base_config() -> ml_collections.ConfigDict:
  """Returns the default ConfigDict built from `KEYS`; every key of every config lives here."""
  c = ml_collections.ConfigDict()
  for name, key in KEYS.items():
    *parents, leaf = name.split(".")
    node = c
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = _fresh(key.default)
  return c
