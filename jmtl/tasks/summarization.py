"""Abstractive summarization tasks (seq2seq, ROUGE) read from JSON Lines."""

from __future__ import annotations

from jmtl.tasks.base import JsonlSource, Task, register

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
