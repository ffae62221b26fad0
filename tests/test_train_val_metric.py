"""The score the metric-driven optimizers see after an evaluation (`train.val_metric`)."""

import types

import pytest

from jmtl import config as config_lib
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


def test_unknown_metric_names_the_key():
  with pytest.raises(config_lib.ConfigError, match="train.val_metric.*'mrpc/mcc'.*mean"):
    _score("mrpc/mcc")
