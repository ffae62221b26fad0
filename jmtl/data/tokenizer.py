"""Tokenizer: a thin wrapper over Hugging Face `tokenizers` with BERT-style specials.

Specials: [PAD]=0, [UNK], [CLS], [SEP], [MASK] (ids looked up by name, so a BERT `vocab.txt`
keeps its own ids); BOS = [CLS], EOS = [SEP]. Trained tokenizers use the BERT normalizer
(lowercasing per `data.lowercase`) and pre-tokenizer; WordPiece or BPE with "##" continuation.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from etils import epath
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILE = "tokenizer.json"


def _bert_pipeline(tok: tokenizers.Tokenizer, lowercase: bool) -> tokenizers.Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=lowercase)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  return tok


class Tokenizer:
  """`encode(text)` -> ids without specials; `decode(ids)` drops specials and joins "##"."""

  def __init__(self, tok: tokenizers.Tokenizer):
    self._tok = tok
    ids = {}
    for name in SPECIALS:
      i = tok.token_to_id(name)
      if i is None:
        raise ValueError(f"tokenizer has no {name} token; jmtl needs {', '.join(SPECIALS)}")
      ids[name] = i
    self.pad_id, self.unk_id, self.cls_id = ids["[PAD]"], ids["[UNK]"], ids["[CLS]"]
    self.sep_id, self.mask_id = ids["[SEP]"], ids["[MASK]"]
    self.bos_id, self.eos_id = self.cls_id, self.sep_id
    self.special_ids = frozenset(ids.values())

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def backend(self) -> tokenizers.Tokenizer:
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and (start_char, end_char) spans of each token in `text`."""
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    keep = [int(i) for i in ids if int(i) not in self.special_ids]
    return self._tok.decode(keep, skip_special_tokens=True)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def save(self, path: str | os.PathLike) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(path))

  @classmethod
  def load(cls, path: str | os.PathLike, lowercase: bool | None = None) -> "Tokenizer":
    """Loads `tokenizer.json`, or a BERT `vocab.txt` (lowercase=None: lowercase when the vocab
    has no upper-case entries, i.e. an uncased vocab). Raises FileNotFoundError when `path` is
    not a file, ValueError naming `path` when it is not a tokenizers JSON file or not UTF-8.
    `path` may be a bucket URI (`gs://...`, read through `etils.epath`)."""
    path = epath.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    if path.suffix == ".json":
      try:
        tok = tokenizers.Tokenizer.from_str(path.read_bytes().decode("utf-8"))
      except Exception as e:  # tokenizers raises plain Exception on a bad file
        raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from None
      # Files exported with a model (e.g. sentence-transformers) often enable padding to a fixed
      # length and truncation; jmtl's featurizers truncate and pad themselves, and pad ids
      # counted as tokens would corrupt masks, pooling and answer offsets.
      tok.no_padding()
      tok.no_truncation()
      return cls(tok)
    try:
      text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not a UTF-8 vocabulary file (byte {e.start}: {e.reason})"
                       ) from None
    vocab = [line.rstrip("\n") for line in text.splitlines()]
    if lowercase is None:
      lowercase = not any(t != t.lower() for t in vocab if not (t.startswith("[") and
                                                               t.endswith("]")))
    model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    tok = _bert_pipeline(tokenizers.Tokenizer(model), lowercase)
    tok.add_special_tokens([t for t in SPECIALS if t in vocab])
    return cls(_with_post_processor(tok))


def _with_post_processor(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  if cls_id is not None and sep_id is not None:  # for other libraries; jmtl adds specials itself
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
  return tok


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "wordpiece",
                    lowercase: bool = True) -> Tokenizer:
  """Trains a WordPiece or BPE vocabulary of `vocab_size` (specials first, [PAD]=0).

  Deterministic: the trainer gives "##c" continuation tokens ids in hash-map order (and breaks
  merge ties by id), so every "##c" of the text's alphabet is registered up front, in sorted
  order, then turned back into ordinary vocabulary entries.
  """
  if kind not in ("wordpiece", "bpe"):
    raise ValueError(f"data.tokenizer_kind must be 'wordpiece' or 'bpe', got {kind!r}")
  texts = list(texts)
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                          strip_accents=None, lowercase=lowercase)
  # BertNormalizer works char by char, so normalizing each distinct char gives the alphabet.
  alphabet = set("".join(normalizer.normalize_str(c) for c in set("".join(texts))))
  continuation = [f"##{c}" for c in sorted(alphabet) if not c.isspace()]
  specials = list(SPECIALS) + continuation
  if kind == "wordpiece":
    model = models.WordPiece(unk_token="[UNK]")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        show_progress=False, continuing_subword_prefix="##")
  else:
    model = models.BPE(unk_token="[UNK]", continuing_subword_prefix="##")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False, continuing_subword_prefix="##")
  tok = _bert_pipeline(tokenizers.Tokenizer(model), lowercase)
  tok.train_from_iterator(texts, trainer=trainer)
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  return Tokenizer(_with_post_processor(tok))


def record_texts(kind: str, records: Iterable[dict]) -> Iterator[str]:
  """The text fields of records of a task kind (SQuAD contexts once each)."""
  seen: set[str] = set()
  for r in records:
    if kind in ("classification", "regression"):
      yield r["text_a"]
      if r.get("text_b"):
        yield r["text_b"]
    elif kind == "span_qa":
      yield r["question"]
      if r["context"] not in seen:
        seen.add(r["context"])
        yield r["context"]
    else:
      yield r["source"]
      yield from r["references"]


def build_tokenizer(config: Any, tasks: Sequence[Any], workdir: str | os.PathLike | None
                    ) -> Tokenizer:
  """The run's tokenizer: `data.tokenizer` when set, else `<workdir>/tokenizer.json` when it
  exists (resume), else one trained on the tasks' TRAIN split text and saved there."""
  from jmtl.data import sources  # noqa: PLC0415  (sources imports nothing from here)
  from jmtl.tasks import get_task

  data = config.data
  out = pathlib.Path(workdir) / TOKENIZER_FILE if workdir else None
  if data.tokenizer:
    tok = Tokenizer.load(data.tokenizer)
  elif out is not None and out.is_file():
    return Tokenizer.load(out)
  else:
    tasks = [get_task(t) for t in tasks]

    def texts() -> Iterator[str]:
      for task in tasks:
        if "train" not in task.splits and not (task.tfds and "train" in task.tfds):
          raise ValueError(f"task {task.name!r} has no train split to train a tokenizer on")
        yield from record_texts(task.kind, sources.load_records(task, "train", data))

    tok = train_tokenizer(texts(), vocab_size=int(data.vocab_size), kind=data.tokenizer_kind,
                          lowercase=bool(data.lowercase))
  if out is not None and not out.is_file():
    tok.save(out)
  return tok
