"""`jmtl federated --backend flower` with fed.secure_aggregation: the one Flower app runs Flower's
SecAgg+ workflow (ServerApp) and `secaggplus_mod` (ClientApp) when the run config's
`secure-aggregation` is on, with its parameters from fed.* keys. In process (seconds): the
config checks and what `submit` hands `flwr run`. The cluster run against the plain run is
tests/test_flower.py::test_secagg_plus_equals_the_plain_run_within_the_quantisation_step."""

import json
import shutil
import subprocess

import pytest

pytest.importorskip("flwr")  # the `flower` extra

from test_flower_parts import CONFIG  # noqa: E402

from jmtl import config as config_lib  # noqa: E402
from jmtl.config import ConfigError  # noqa: E402
from jmtl.federated import flower  # noqa: E402


def _config(sites=3, **fed):
  config = config_lib.complete(config_lib.load_config_file(CONFIG))
  config.fed.backend = "flower"
  config.fed.sites = tuple(dict(name=n, devices=1) for n in "abcd"[:sites])
  for k, v in fed.items():  # "secagg.clipping_range" -> config.fed.secagg.clipping_range
    *path, last = k.split(".")
    target = config.fed
    for p in path:
      target = target[p]
    target[last] = v
  return config_lib.validate(config)


def test_secure_aggregation_is_a_flower_option_with_three_sites_or_more():
  config = _config(3, secure_aggregation=True)
  assert config.fed.secure_aggregation and config.fed.flower.secagg_max_weight == 1000.0
  with pytest.raises(ConfigError,
                     match=r"fed.secure_aggregation.*at least 3 sites \(Flower.s SecAgg\+ "
                           r"workflow\), got 2"):
    _config(2, secure_aggregation=True)
  with pytest.raises(ConfigError, match="fed.flower.secagg_max_weight"):
    _config(3, secure_aggregation=True, **{"flower.secagg_max_weight": 0.0})


def test_submit_hands_flwr_run_the_secagg_keys_of_the_config(tmp_path, monkeypatch):
  """What `flwr run` gets: secure-aggregation true and SecAgg+'s max_weight, clipping range and
  levels from fed.flower.secagg_max_weight and fed.secagg.*; the run config text parses back
  (TOML values: JSON-quoted strings, true / false)."""
  config = _config(3, secure_aggregation=True, **{"flower.secagg_max_weight": 250.0,
                                                  "secagg.clipping_range": 2.0,
                                                  "secagg.quantization_range": 2**20})
  seen = {}

  def fake_run(args, **kw):
    seen["args"] = args
    return subprocess.CompletedProcess(args, 0, json.dumps({"success": True, "run-id": 7}), "")

  monkeypatch.setattr(subprocess, "run", fake_run)
  monkeypatch.setattr(shutil, "which", lambda *a, **k: "/bin/true")  # a `flwr` is there
  # A SuperLink connection (not Flower's local simulation runtime, which submit refuses).
  monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
  (tmp_path / "flwr").mkdir()
  (tmp_path / "flwr" / "config.toml").write_text(
      '[superlink]\ndefault = "prod"\n[superlink.prod]\naddress = "127.0.0.1:9093"\n')
  got = flower.submit(config, CONFIG, [], str(tmp_path / "wd"), echo=lambda s: None)
  assert got["run_id"] == 7
  text = seen["args"][seen["args"].index("--run-config") + 1]
  items = dict(kv.split("=", 1) for kv in text.split(" ") if "=" in kv and not kv.startswith("-"))
  assert json.loads(items["secure-aggregation"]) is True
  assert json.loads(items["secagg-max-weight"]) == 250.0
  assert json.loads(items["secagg-clipping-range"]) == 2.0
  assert json.loads(items["secagg-quantization-range"]) == 2**20
  rc = {k: json.loads(v) for k, v in items.items()
        if k.startswith("secagg") or k == "secure-aggregation"}
  assert flower.secure_aggregation(rc) and flower.secagg_ranges(rc) == (2.0, 2**20)
  assert flower.secagg_max_weight(rc) == 250.0


def test_the_app_declares_the_secagg_run_config_keys():
  """flwr refuses a run config key the app does not declare: the app's pyproject declares
  them, off by default (TOML `false`)."""
  assert "\nsecure-aggregation = false\n" in flower.APP_PYPROJECT
  for key in ("secagg-max-weight", "secagg-clipping-range", "secagg-quantization-range"):
    assert f"\n{key} = " in flower.APP_PYPROJECT
  assert not flower.secure_aggregation({}) and not flower.secure_aggregation(
      {"secure-aggregation": False})
  assert flower.secagg_ranges({}) == (flower.SECAGG_CLIPPING_RANGE,
                                      flower.SECAGG_QUANTIZATION_RANGE)
  with pytest.raises(ValueError, match="secagg-clipping-range"):
    flower.secagg_ranges({"secagg-clipping-range": -1.0})
