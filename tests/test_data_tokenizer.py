"""Tokenizer: specials, vocab.txt loading, training determinism, round trip and workdir reuse."""

import pathlib

import pytest

from jmtl.data import tokenizer as tok_lib
from jmtl.defaults import base_config

VOCAB = pathlib.Path(__file__).parent / "fixtures" / "data" / "vocab.txt"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A lazy cat sleeps all day long!",
         "Dogs and cats are friends, sometimes.", "Quickly, the fox ran into the forest."] * 20


def test_vocab_txt_specials_and_lowercase(tmp_path):
  tok = tok_lib.Tokenizer.load(VOCAB)
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (2, 3, 20)
  # Uncased vocab (no upper-case entries) -> lowercasing; "##s" continues a word.
  assert tok.encode("The CATS sat.") == [5, 6, 12, 7, 13]
  assert tok.encode("zebra") == [1]
  assert tok.decode([2, 5, 6, 12, 7, 13, 3, 0, 0]) == "the cats sat."
  cased = tmp_path / "vocab.txt"
  cased.write_text(VOCAB.read_text() + "The\n")
  tok = tok_lib.Tokenizer.load(cased)
  assert tok.encode("The the") == [20, 5]


def test_missing_special_is_an_error(tmp_path):
  bad = tmp_path / "vocab.txt"
  bad.write_text("[PAD]\n[UNK]\n[CLS]\nthe\n")
  with pytest.raises(ValueError, match=r"no \[SEP\] token"):
    tok_lib.Tokenizer.load(bad)
  with pytest.raises(FileNotFoundError, match="nothere.json"):
    tok_lib.Tokenizer.load(tmp_path / "nothere.json")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_deterministic_and_round_trip(kind, tmp_path):
  a = tok_lib.train_tokenizer(TEXTS, vocab_size=120, kind=kind)
  b = tok_lib.train_tokenizer(TEXTS, vocab_size=120, kind=kind)
  assert a.backend.to_str() == b.backend.to_str()
  assert [a.id_to_token(i) for i in range(5)] == list(tok_lib.SPECIALS)
  assert a.vocab_size <= 120
  text = "the quick brown fox jumps over the lazy dog."
  ids = a.encode(text)
  assert a.unk_id not in ids and not set(ids) & a.special_ids
  assert a.decode([a.cls_id, *ids, a.sep_id, a.pad_id]) == text
  a.save(tmp_path / "t.json")
  c = tok_lib.Tokenizer.load(tmp_path / "t.json")
  assert c.encode(text) == ids and c.decode(ids) == text
  # "##" continuation pieces are ordinary tokens, not specials dropped by decode.
  pieces = [a.id_to_token(i) for i in a.encode("sometimes quickly")]
  assert any(p.startswith("##") for p in pieces)


def test_offsets_point_into_original_text():
  tok = tok_lib.Tokenizer.load(VOCAB)
  text = "Where is THE  cat?"
  ids, offsets = tok.encode_with_offsets(text)
  assert ids == [15, 16, 5, 6, 14]
  assert [text[s:e] for s, e in offsets] == ["Where", "is", "THE", "cat", "?"]


def test_build_tokenizer_trains_on_train_split_and_reuses(data_dir, tmp_path):
  cfg = base_config()
  cfg.data.dir = str(data_dir)
  cfg.data.vocab_size = 300
  cfg.data.max_train_examples = 300
  tok = tok_lib.build_tokenizer(cfg, ["rte"], tmp_path)
  saved = tmp_path / "tokenizer.json"
  assert saved.is_file() and tok.vocab_size == 300
  # The saved file is reused, whatever the config would train now.
  cfg.data.vocab_size = 500
  again = tok_lib.build_tokenizer(cfg, ["rte", "sst2"], tmp_path)
  assert again.backend.to_str() == tok.backend.to_str()
  # An explicit data.tokenizer wins.
  cfg.data.tokenizer = str(VOCAB)
  assert tok_lib.build_tokenizer(cfg, ["rte"], None).vocab_size == 20


def test_build_tokenizer_needs_a_train_split(data_dir):
  cfg = base_config()
  cfg.data.dir = str(data_dir)
  with pytest.raises(ValueError, match="'squad_dev' has no train split"):
    tok_lib.build_tokenizer(cfg, ["squad_dev"], None)


def test_tokenizer_json_with_padding_and_truncation_is_not_padded(tmp_path):
  """A tokenizer.json exported with fixed-length padding and truncation (as sentence-transformers
  ships MiniLM's) must still encode to the bare token ids: the featurizers pad and truncate."""
  tok = tok_lib.Tokenizer.load(VOCAB)
  backend = tok.backend
  backend.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
  backend.enable_truncation(max_length=3)
  path = tmp_path / "tokenizer.json"
  backend.save(str(path))
  loaded = tok_lib.Tokenizer.load(path)
  assert loaded.encode("The CATS sat.") == [5, 6, 12, 7, 13]
  ids, offsets = loaded.encode_with_offsets("the cats")
  assert ids == [5, 6, 12] and offsets == [(0, 3), (4, 7), (7, 8)]
