"""The score the metric-driven optimizers see after an evaluation (`train.val_metric`)."""

import math
import types

import pytest

from jmtl import config as config_lib
from jmtl import preflight
from jmtl.defaults import base_config
from jmtl.train import loop

TASKS = [types.SimpleNamespace(name="sst2"), types.SimpleNamespace(name="mrpc"),
         types.SimpleNamespace(name="dialogsum")]
METRICS = {"sst2/accuracy": 80.0, "mrpc/accuracy": 10.0, "mrpc/f1": 70.0,
           "dialogsum/lead_rouge1": 99.0, "dialogsum/rouge2": 5.0, "dialogsum/rouge1": 30.0}


def _score(name):
  c = base_config()
  c.train.val_metric = name
  return loop._val_metric(c, TASKS, METRICS)


def test_default_is_the_mean_of_each_tasks_first_metric():
  assert base_config().train.val_metric == "mean"
  assert _score("mean") == pytest.approx((80.0 + 70.0 + 30.0) / 3)  # lead_ baselines skipped


def test_named_metric_and_first_task():
  assert _score("mrpc/accuracy") == 10.0
  assert _score("") == 80.0


def test_unknown_metric_is_refused_before_any_work():
  """The preflight owns the name check (mrpc reports accuracy and f1, not mcc)."""
  with pytest.raises(config_lib.ConfigError, match="train.val_metric.*'mrpc/mcc'"):
    preflight.check_val_metric("mrpc/mcc", ["sst2", "mrpc"])


def test_missing_or_nonfinite_score_is_nan():
  """An unlabelled split reports no metric, a diverged model NaN: neither is a score to feed
  the optimizer (the loop then keeps the previous one)."""
  c = base_config()
  assert math.isnan(loop._val_metric(c, TASKS, {"sst2/accuracy": 80.0}))
  assert math.isnan(loop._val_metric(c, TASKS, {**METRICS, "mrpc/f1": float("nan")}))
