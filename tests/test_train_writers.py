"""Train-line window means (`jmtl.train.writers.window_means`) on hand-computed examples."""

import math

from jmtl.train import writers


def test_window_means_per_key_over_the_steps_that_have_it():
  steps = [{"train/loss": 1.0, "train/a/loss": 1.0, "grad_norm": 2.0},
           {"train/loss": 3.0, "train/b/loss": 3.0, "grad_norm": 4.0},
           {"train/loss": 5.0, "train/a/loss": 5.0, "grad_norm": 6.0}]
  assert writers.window_means(steps) == {"train/loss": 3.0, "train/a/loss": 3.0,
                                         "train/b/loss": 3.0, "grad_norm": 4.0}


def test_window_means_leave_out_non_finite_steps():
  steps = [{"train/loss": 2.0}, {"train/loss": math.inf}, {"train/loss": 4.0}]
  assert writers.window_means(steps) == {"train/loss": 3.0}
  bad = writers.window_means([{"train/loss": 1.0, "train/a/loss": math.nan},
                              {"train/loss": math.inf}])
  assert bad["train/loss"] == 1.0 and math.isnan(bad["train/a/loss"])
  assert math.isnan(writers.window_means([{"x": math.inf}, {"x": math.nan}])["x"])  # the last
