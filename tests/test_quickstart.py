"""The quickstart config end to end on the real BBC corpus (a few steps): both tasks, decoding,
ROUGE next to the lead baseline, and the documented output files."""

import json

import pytest

from jmtl import config as config_lib
from jmtl.cli import apply_overrides
from jmtl.train import loop

pytestmark = pytest.mark.slow


def test_quickstart_smoke(tmp_path):
  cfg = config_lib.load_config_file("configs/quickstart.py")
  apply_overrides(cfg, ["--config.train.steps=3", "--config.data.max_eval_examples=16",
                        "--config.train.progress=none", "--config.eval.beam_size=2",
                        "--config.data.vocab_size=2000"])
  cfg = config_lib.validate(cfg, device_count=8)
  result = loop.train(cfg, tmp_path)
  for key in ("bbc_topic/accuracy", "bbc_headline/rouge1", "bbc_headline/rouge2",
              "bbc_headline/rougeL", "bbc_headline/lead_rouge1"):
    assert key in result and 0.0 <= result[key] <= 100.0, key
  assert result["bbc_headline/lead_rouge1"] > 5.0  # the lead baseline really overlaps headlines
  rows = [json.loads(l) for l in (tmp_path / "predictions/bbc_headline.jsonl").read_text().splitlines()]
  assert len(rows) == 16 and all(isinstance(r["prediction"], str) for r in rows)
  assert all(isinstance(r["reference"], list) and r["reference"][0] for r in rows)
  topics = [json.loads(l) for l in (tmp_path / "predictions/bbc_topic.jsonl").read_text().splitlines()]
  assert {r["reference"] for r in topics} <= {"business", "entertainment", "politics", "sports", "tech"}
