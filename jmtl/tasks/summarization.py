"""Abstractive summarization tasks (seq2seq, ROUGE) read from JSON Lines, and CNN/DailyMail from
the prepared TFDS dataset `cnn_dailymail` (`jmtl data prepare`; needs `data.tfds_dir`)."""

from __future__ import annotations

from jmtl.tasks.base import JsonlSource, Task, TfdsSource, register

ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_DS = "summarization/dialogsum/dialogsum"
register(Task(
    name="dialogsum", kind="seq2seq", num_labels=0, metrics=ROUGE,
    splits={
        "train": JsonlSource(f"{_DS}.train.jsonl", "dialogue", ("summary",), id="fname"),
        "validation": JsonlSource(f"{_DS}.dev.jsonl", "dialogue", ("summary",), id="fname"),
        # The test file has three reference summaries per dialogue.
        "test": JsonlSource(f"{_DS}.test.jsonl", "dialogue", ("summary1", "summary2", "summary3"),
                            id="fname"),
    },
    description="DialogSum: dialogue -> summary (test: 3 references)."))

_ST = "summarization/scitldr_a"
register(Task(
    name="scitldr", kind="seq2seq", num_labels=0, metrics=ROUGE,
    splits={s: JsonlSource(f"{_ST}/{f}.jsonl", "source", ("target",), id="paper_id")
            for s, f in (("train", "train"), ("validation", "dev"), ("test", "test"))},
    description="SciTLDR-A: abstract sentences -> one-sentence TLDR (several references)."))

register(Task(
    name="bbc_summary", kind="seq2seq", num_labels=0, metrics=ROUGE,
    splits={s: JsonlSource("summarization/bbc_news_summary/bbc_news_summary.jsonl", "article",
                           ("summary",), id="id", portion=s)
            for s in ("train", "validation", "test")},
    description="BBC News Summary (extractive references), seeded 80/10/10 split by id."))

# CNN/DailyMail 3.0.0 non-anonymized (See et al. 2017): article -> highlights (the bullet points
# joined by newlines), splits train 287,113 / validation 13,368 / test 11,490 (TFDS 3.4.0).
_CNNDM = {s: TfdsSource("cnn_dailymail", s, {"source": "article", "target": "highlights"}, id="id")
          for s in ("train", "validation", "test")}
register(Task(
    name="cnn_dailymail", kind="seq2seq", num_labels=0, metrics=ROUGE, splits=_CNNDM,
    tfds=_CNNDM, description="CNN/DailyMail news: article -> highlights (TFDS only)."))
