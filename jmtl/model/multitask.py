"""One shared trunk f(x) and a head g_t per task: outputs_t = g_t(f(x)).

`model(task_batch, task=name, deterministic=..., rngs=...)` returns the outputs of docs/architecture.md:
classification / regression -> {"logits"}; span_qa -> {"start_logits", "end_logits"};
seq2seq -> {"logits" [B, T, V]} (teacher forced). Dropout keys come only from the `rngs`
argument, so the model holds no RNG state and works functionally after nnx.split / nnx.merge.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
from typing import Any, NamedTuple

from flax import nnx
import jax

from jmtl.model import layers
from jmtl.model.bilstm import BiLSTMTrunk
from jmtl.model.heads import ClassificationHead, SpanHead
from jmtl.model.layers import cfg_choice, cfg_get
from jmtl.model.trunk import TransformerTrunk, require_rngs

HEAD_KINDS = ("classification", "regression", "span_qa", "seq2seq")
_COMMON_KEYS = ("input_ids", "segment_ids", "attention_mask")
_KIND_KEYS = {"classification": (), "regression": (), "span_qa": ("context_mask",),
              "seq2seq": ("decoder_input_ids",)}


class HeadSpec(NamedTuple):
  """A task's head: `kind` in HEAD_KINDS, `num_labels` (classes; 1 for regression, else unused)."""
  kind: str
  num_labels: int


def build_trunk(model_cfg: Any, vocab_size: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The trunk named by `model.trunk` ("transformer" or "bilstm")."""
  kind = cfg_choice(model_cfg, "trunk", ("transformer", "bilstm"))
  cls = TransformerTrunk if kind == "transformer" else BiLSTMTrunk
  return cls(model_cfg, vocab_size, rngs=rngs)


def build_head(model_cfg: Any, vocab_size: int, hidden_size: int, spec: HeadSpec, task: str,
               *, rngs: nnx.Rngs) -> nnx.Module:
  """The head for one task; bad kinds or label counts raise a ValueError naming the task."""
  kind, num_labels = spec
  dtype = layers.compute_dtype(model_cfg)
  if kind == "classification":
    if num_labels < 2:
      raise ValueError(f"task {task!r}: classification needs num_labels >= 2, got {num_labels}")
  elif kind == "regression":
    if num_labels != 1:
      raise ValueError(f"task {task!r}: regression needs num_labels == 1, got {num_labels}")
  elif kind not in HEAD_KINDS:
    raise ValueError(f"task {task!r}: unknown head kind {kind!r}; known: {HEAD_KINDS}")
  if kind in ("classification", "regression"):
    return ClassificationHead(
        hidden_size, num_labels, pooling=cfg_choice(model_cfg, "pooling", ("first", "mean")),
        dropout=cfg_get(model_cfg, "dropout"), dtype=dtype, rngs=rngs)
  if kind == "span_qa":
    return SpanHead(hidden_size, dtype=dtype, rngs=rngs)
  from jmtl.model.decoder import Seq2SeqHead  # pylint: disable=import-outside-toplevel
  return Seq2SeqHead(model_cfg, vocab_size, rngs=rngs)


class MultiTaskModel(nnx.Module):
  """A trunk (`self.trunk`) shared by task heads (`self.heads`, an nnx.Dict keyed by task)."""

  def __init__(self, model_cfg: Any, vocab_size: int, head_specs: Mapping[str, HeadSpec], *,
               rngs: nnx.Rngs):
    if not head_specs:
      raise ValueError("MultiTaskModel needs at least one task head")
    specs = {name: HeadSpec(*spec) for name, spec in sorted(head_specs.items())}
    self.kinds = tuple((name, spec.kind) for name, spec in specs.items())
    # Without a mesh and logical rules, parameters only record their logical names.
    eager = contextlib.nullcontext() if layers.sharding_active() else nnx.use_eager_sharding(False)
    with eager:
      self.trunk = build_trunk(model_cfg, vocab_size, rngs=rngs)
      self.heads = nnx.Dict({
          name: build_head(model_cfg, vocab_size, self.trunk.hidden_size, spec, name, rngs=rngs)
          for name, spec in specs.items()})

  def kind(self, task: str) -> str:
    """The head kind of `task` (KeyError listing the known tasks otherwise)."""
    kinds = dict(self.kinds)
    if task not in kinds:
      raise KeyError(f"model has no head for task {task!r}; tasks: {sorted(kinds)}")
    return kinds[task]

  def __call__(self, task_batch: Mapping[str, Any], *, task: str, deterministic: bool,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    kind = self.kind(task)
    require_rngs(deterministic, rngs)
    missing = [k for k in _COMMON_KEYS + _KIND_KEYS[kind] if k not in task_batch]
    if missing:
      raise KeyError(f"batch for task {task!r} ({kind}) lacks {missing}")
    mask = task_batch["attention_mask"]
    hidden = self.trunk(task_batch["input_ids"], task_batch["segment_ids"], mask,
                        deterministic=deterministic, rngs=rngs)
    head = self.heads[task]
    if kind in ("classification", "regression"):
      return {"logits": head(hidden, mask, deterministic=deterministic, rngs=rngs)}
    if kind == "span_qa":
      start, end = head(hidden, mask, task_batch["context_mask"])
      return {"start_logits": start, "end_logits": end}
    logits = head(hidden, mask, task_batch["decoder_input_ids"],
                  embedding=self.trunk.token_embedding, source_ids=task_batch["input_ids"],
                  deterministic=deterministic, rngs=rngs)
    return {"logits": logits}
