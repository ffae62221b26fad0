"""Step-dependent and budgeted task samplers: annealed temperature (Stickland & Murray 2019) and
UniMax (Chung et al. 2023, Algorithm 1) -- rates worked by hand, the draws of task_per_batch
mixing against the step's rates, exact resume, and the refusal of annealing with mixed batches."""

import pathlib

import numpy as np
import pytest

from jmtl import cli
from jmtl import config as config_lib
from jmtl.data import pipeline
from jmtl.data.tokenizer import Tokenizer
from jmtl.defaults import base_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny_sst2.py"
TOK = Tokenizer.load(REPO / "tests" / "fixtures" / "data" / "vocab.txt")
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "big", "red"]


def _records(n: int, salt: int = 0) -> list[dict]:
  return [{"id": str(i), "text_a": " ".join(WORDS[(i * 7 + j + salt) % 10]
                                           for j in range(1 + (i * 5 + salt) % 9)),
           "text_b": None, "label": i % 2} for i in range(n)]


# sst2 is 16x the size of cola: proportional 16/17 vs 1/17, at alpha = 0.2 about 0.64 vs 0.36.
RECORDS = {"sst2": _records(400), "cola": _records(25, salt=3)}


def _config(**data) -> object:
  c = base_config()
  c.data.max_len = 16
  c.data.length_buckets = (8, 16)
  c.data.batch_size = 4
  c.data.update(data)
  return c


def _it(c, tasks=("sst2", "cola")) -> pipeline.TrainIterator:
  return pipeline.train_iterator(c, list(tasks), TOK, records=RECORDS)


# ------------------------------------------------------------------ UniMax
def test_unimax_allocation_by_hand():
  sizes = {"c": 1000, "a": 10, "b": 100}  # not in size order: the algorithm sorts them
  # cap 1 epoch, budget 600: a gets min(600/3, 10) = 10; b min(590/2, 100) = 100; c 490.
  assert pipeline.unimax_allocation(sizes, 600, 1.0) == pytest.approx(
      {"c": 490.0, "a": 10.0, "b": 100.0})
  # cap 2 epochs: a min(200, 20) = 20; b min(580/2, 200) = 200; c min(380, 2000) = 380.
  assert pipeline.unimax_allocation(sizes, 600, 2.0) == pytest.approx(
      {"c": 380.0, "a": 20.0, "b": 200.0})
  # nothing capped: a uniform split.
  assert pipeline.unimax_allocation({"a": 300, "b": 400, "c": 500}, 600, 1.0) == pytest.approx(
      {"a": 200.0, "b": 200.0, "c": 200.0})
  # half an epoch caps every task: a min(200, 5); b min(595/2, 50); c min(545, 500). 45 unused.
  assert pipeline.unimax_allocation(sizes, 600, 0.5) == pytest.approx(
      {"c": 500.0, "a": 5.0, "b": 50.0})


def test_unimax_matches_the_unimax_sampling_package_example():
  """The worked example published with the `unimax_sampling` package (kgnlp/unimax): 5
  languages, budget 250e9 characters, at most 4 epochs."""
  counts = {"swe": 179955884499, "fas": 184595788282, "ekk": 42541080893, "isl": 10027573389,
            "fao": 549707867}
  alloc = pipeline.unimax_allocation(counts, 250_000_000_000, 4)
  assert alloc == pytest.approx({"fao": 2198831468, "isl": 40110293556, "ekk": 69230291658.667,
                                 "swe": 69230291658.667, "fas": 69230291658.667}, rel=1e-12)


def test_unimax_rates_from_the_config():
  sizes = {"a": 10, "b": 100, "c": 1000}
  c = _config(mixture="unimax", batch_size=8)
  c.train.steps = 75  # budget B = 75 * 8 = 600 examples
  rates = pipeline.mixture_rates(c.data, sizes, total_steps=c.train.steps)
  assert rates == pytest.approx({"a": 10 / 600, "b": 100 / 600, "c": 490 / 600})
  c.data.unimax_epochs = 2.0
  rates = pipeline.mixture_rates(c.data, sizes, total_steps=c.train.steps)
  assert rates == pytest.approx({"a": 20 / 600, "b": 200 / 600, "c": 380 / 600})
  # Every task capped (budget > N * sum n_t): Algorithm 1's normalize(U) is proportional.
  rates = pipeline.mixture_rates(c.data, {"a": 10, "b": 30}, total_steps=c.train.steps)
  assert rates == pytest.approx({"a": 0.25, "b": 0.75})
  # The step does not matter; the budget does and must be given.
  assert pipeline.mixture_rates(c.data, sizes, step=70, total_steps=75) == pytest.approx(
      pipeline.mixture_rates(c.data, sizes, step=0, total_steps=75))
  with pytest.raises(ValueError, match="total_steps"):
    pipeline.mixture_rates(c.data, sizes)


def test_unimax_with_mixed_batches_gives_fixed_rows():
  c = _config(mixture="unimax", mixing="mixed", batch_size=8)
  c.train.steps = 10  # budget 80: cola min(40, 25) = 25, sst2 55 -> rows 2.5 / 5.5 of 8
  config_lib.validate(c, check_files=False)
  it = _it(c)
  assert it.rates == pytest.approx({"sst2": 55 / 80, "cola": 25 / 80})
  assert sum(it.rows.values()) == 8
  batch = next(it)
  assert set(batch) == {"sst2", "cola"}


# ------------------------------------------------------------------ annealed temperature
def _by_hand(sizes: dict[str, int], alpha: float) -> dict[str, float]:
  n = np.array(list(sizes.values()), dtype=np.float64)
  p = n ** alpha / np.sum(n ** alpha)
  return dict(zip(sizes, p))


def test_annealed_temperature_rates_by_hand():
  sizes = {"a": 100, "b": 400, "c": 1600}
  c = _config(mixture="annealed_temperature", temperature_start=1.0, temperature_end=5.0)
  steps = 101
  rates = lambda s: pipeline.mixture_rates(c.data, sizes, step=s, total_steps=steps)  # noqa: E731
  assert rates(0) == pytest.approx({"a": 100 / 2100, "b": 400 / 2100, "c": 1600 / 2100})
  assert rates(50) == pytest.approx(_by_hand(sizes, 0.6))  # 1 + (0.2 - 1) * 50/100
  assert rates(100) == pytest.approx(_by_hand(sizes, 0.2))  # the last step: 1/T1
  assert rates(5000) == rates(100)  # clamped after train.steps
  # Stickland & Murray's schedule alpha = 1 - 0.8 (e-1)/(E-1), with steps for epochs.
  for s in (0, 13, 37, 100):
    assert rates(s) == pytest.approx(_by_hand(sizes, 1 - 0.8 * s / (steps - 1)))
  # 1/T, not T, is linear: T0 = 2, T1 = 4 gives alpha 0.5 -> 0.25, mid 0.375 (T = 2.67, not 3).
  c.data.temperature_start, c.data.temperature_end = 2.0, 4.0
  assert rates(50) == pytest.approx(_by_hand(sizes, 0.375))
  assert pipeline.annealed_exponent(2.0, 4.0, 50, 101) == pytest.approx(0.375)
  assert pipeline.annealed_exponent(2.0, 4.0, 0, 1) == pytest.approx(0.25)  # one step: the end
  # T0 == T1 is the fixed temperature mixture.
  c.data.temperature_start = c.data.temperature_end = c.data.temperature = 2.0
  fixed = base_config().data
  fixed.mixture, fixed.temperature = "temperature", 2.0
  assert rates(17) == pytest.approx(pipeline.mixture_rates(fixed, sizes))
  with pytest.raises(ValueError, match="total_steps"):
    pipeline.mixture_rates(c.data, sizes, step=3)


def test_task_per_batch_draws_follow_the_step_rates():
  """Over 4000 steps in windows of 1000, each task's share of the draws is within 0.05
  (about 3 standard deviations) of the mean of that window's rates, and the shares move from
  near proportional (0.94 sst2) to near alpha = 0.2 (0.64 sst2)."""
  c = _config(mixture="annealed_temperature", temperature_start=1.0, temperature_end=5.0)
  c.train.steps = 4000
  it = _it(c)
  draws = np.array([it.task_for_step(s) == "sst2" for s in range(4000)])
  expected = np.array([it.rates_at(s)["sst2"] for s in range(4000)])
  assert expected[0] == pytest.approx(400 / 425)
  assert expected[-1] == pytest.approx(400 ** 0.2 / (400 ** 0.2 + 25 ** 0.2))
  shares = []
  for w in range(4):
    window = slice(1000 * w, 1000 * (w + 1))
    share, want = draws[window].mean(), expected[window].mean()
    assert abs(share - want) < 0.05, (w, share, want)
    shares.append(share)
  assert shares[0] > shares[-1] + 0.15
  # The iterator itself yields the drawn task at each step.
  for s in range(40):
    assert list(next(it)) == [it.task_for_step(s)]


def test_annealed_resume_continues_identically():
  c = _config(mixture="annealed_temperature", temperature_start=1.0, temperature_end=5.0)
  c.train.steps = 60
  full = _it(c)
  batches = [next(full) for _ in range(40)]
  first = _it(c)
  for _ in range(23):
    next(first)
  state = first.get_state()
  resumed = _it(c)
  resumed.set_state(state)
  for k in range(23, 40):
    got = next(resumed)
    assert got.keys() == batches[k].keys(), k
    for t in got:
      for key in got[t]:
        np.testing.assert_array_equal(got[t][key], batches[k][t][key], err_msg=f"{k} {t}/{key}")
  assert resumed.get_state() == full.get_state()
  # Rates are a pure function of the step: a fresh iterator agrees at any step.
  assert [resumed.task_for_step(s) for s in range(60, 200)] == \
         [full.task_for_step(s) for s in range(60, 200)]


def test_annealed_temperature_refused_with_mixed_batches(capsys, tmp_path):
  c = _config(mixture="annealed_temperature", mixing="mixed")
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c, check_files=False)
  msg = str(err.value)
  assert msg.startswith("config key 'data.mixture' = 'annealed_temperature' needs data.mixing = "
                        "'task_per_batch'"), msg
  assert "\n" not in msg
  with pytest.raises(ValueError, match="task_per_batch"):
    _it(c)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["jmtl", "train", "--config", str(TINY), "--workdir", str(tmp_path),
              "--config.data.mixture=annealed_temperature", "--config.data.mixing=mixed"])
  assert exit_info.value.code == 2
  err_lines = capsys.readouterr().err.strip().splitlines()
  assert len(err_lines) == 1, err_lines
  assert err_lines[0].startswith("jmtl: error: config key 'data.mixture'"), err_lines[0]
  # With task_per_batch, and for unimax with either mixing, the config is accepted.
  config_lib.validate(_config(mixture="annealed_temperature"), check_files=False)
  config_lib.validate(_config(mixture="unimax", mixing="mixed"), check_files=False)


@pytest.mark.parametrize("key", ["temperature_start", "temperature_end", "unimax_epochs"])
def test_new_keys_must_be_positive(key):
  c = _config(**{key: 0.0})
  with pytest.raises(config_lib.ConfigError, match=rf"'data.{key}' = 0.0 must be > 0"):
    config_lib.validate(c, check_files=False)
