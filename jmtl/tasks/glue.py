"""GLUE tasks read from the standard GLUE TSV folders (`glue/<TASK>/{train,dev,test}.tsv`).

Label orders follow the GLUE / TFDS / Hugging Face conventions. Test files are unlabelled
(label -1, or NaN for STS-B).
"""

from __future__ import annotations

from jmtl.tasks.base import Task, TfdsSource, TsvSource, register

_NLI2 = ("entailment", "not_entailment")


def _splits(folder: str, text_a, text_b, label, label_values, test_a, test_b,
            files=(("train", "train.tsv"), ("validation", "dev.tsv")),
            test_files=(("test", "test.tsv"),)) -> dict:
  out = {}
  for split, fname in files:
    out[split] = TsvSource(f"glue/{folder}/{fname}", text_a, text_b, label,
                           label_values=label_values)
  for split, fname in test_files:
    out[split] = TsvSource(f"glue/{folder}/{fname}", test_a, test_b, None)
  return out


def _tfds(name: str, fields: dict, splits=("train", "validation", "test"), names=None) -> dict:
  names = names or {s: s for s in splits}
  return {s: TfdsSource(f"glue/{name}", names[s], fields, id="idx") for s in splits}


def _pair(a: str, b: str) -> dict:
  return {"text_a": a, "text_b": b, "label": "label"}


register(Task(
    name="sst2", kind="classification", num_labels=2, metrics=("accuracy",),
    label_names=("negative", "positive"),
    splits=_splits("SST-2", "sentence", None, "label", ("0", "1"), "sentence", None),
    tfds=_tfds("sst2", {"text_a": "sentence", "label": "label"}),
    description="Stanford Sentiment Treebank, binary sentence sentiment."))

# CoLA train/dev have no header: source, label, original mark, sentence.
_cola = {s: TsvSource(f"glue/CoLA/{f}", 3, None, 1, header=False, columns=4,
                      label_values=("0", "1"))
         for s, f in (("train", "train.tsv"), ("validation", "dev.tsv"))}
_cola["test"] = TsvSource("glue/CoLA/test.tsv", "sentence")
register(Task(
    name="cola", kind="classification", num_labels=2, metrics=("mcc",),
    label_names=("unacceptable", "acceptable"), splits=_cola,
    tfds=_tfds("cola", {"text_a": "sentence", "label": "label"}),
    description="Corpus of Linguistic Acceptability (Matthews correlation)."))

register(Task(
    name="mrpc", kind="classification", num_labels=2, metrics=("f1", "accuracy"),
    label_names=("not_equivalent", "equivalent"),
    splits=_splits("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"),
                   "#1 String", "#2 String"),
    tfds=_tfds("mrpc", _pair("sentence1", "sentence2")),
    description="Microsoft Research Paraphrase Corpus."))

register(Task(
    name="rte", kind="classification", num_labels=2, metrics=("accuracy",),
    label_names=_NLI2,
    splits=_splits("RTE", "sentence1", "sentence2", "label", _NLI2, "sentence1", "sentence2"),
    tfds=_tfds("rte", _pair("sentence1", "sentence2")),
    description="Recognizing Textual Entailment."))

register(Task(
    name="stsb", kind="regression", num_labels=1, metrics=("pearson", "spearman"),
    splits=_splits("STS-B", "sentence1", "sentence2", "score", None, "sentence1", "sentence2"),
    tfds=_tfds("stsb", _pair("sentence1", "sentence2")),
    description="Semantic Textual Similarity Benchmark, score 0-5."))

register(Task(
    name="qnli", kind="classification", num_labels=2, metrics=("accuracy",),
    label_names=_NLI2,
    splits=_splits("QNLI", "question", "sentence", "label", _NLI2, "question", "sentence"),
    tfds=_tfds("qnli", _pair("question", "sentence")),
    description="Question-answering NLI derived from SQuAD."))

register(Task(
    name="wnli", kind="classification", num_labels=2, metrics=("accuracy",),
    label_names=("not_entailment", "entailment"),
    splits=_splits("WNLI", "sentence1", "sentence2", "label", ("0", "1"), "sentence1",
                   "sentence2"),
    tfds=_tfds("wnli", _pair("sentence1", "sentence2")),
    description="Winograd NLI."))

_MNLI = ("entailment", "neutral", "contradiction")
register(Task(
    name="mnli", kind="classification", num_labels=3, metrics=("accuracy",),
    label_names=_MNLI,
    splits=_splits("MNLI", "sentence1", "sentence2", "gold_label", _MNLI, "sentence1",
                   "sentence2",
                   files=(("train", "train.tsv"), ("validation", "dev_matched.tsv"),
                          ("validation_matched", "dev_matched.tsv"),
                          ("validation_mismatched", "dev_mismatched.tsv")),
                   test_files=(("test", "test_matched.tsv"), ("test_matched", "test_matched.tsv"),
                               ("test_mismatched", "test_mismatched.tsv"))),
    tfds=_tfds("mnli", _pair("premise", "hypothesis"),
               splits=("train", "validation", "validation_matched", "validation_mismatched",
                       "test", "test_matched", "test_mismatched"),
               names={"train": "train", "validation": "validation_matched",
                      "validation_matched": "validation_matched",
                      "validation_mismatched": "validation_mismatched",
                      "test": "test_matched", "test_matched": "test_matched",
                      "test_mismatched": "test_mismatched"}),
    description="Multi-Genre NLI (validation = matched)."))

register(Task(
    name="qqp", kind="classification", num_labels=2, metrics=("f1", "accuracy"),
    label_names=("not_duplicate", "duplicate"),
    splits=_splits("QQP", "question1", "question2", "is_duplicate", ("0", "1"), "question1",
                   "question2"),
    tfds=_tfds("qqp", _pair("question1", "question2")),
    description="Quora Question Pairs."))
