"""Multi-task study, arm `mtl_minilm_uncertainty`: `mtl_minilm` with task balancing.

The same model, data and training setting as configs/mtl_minilm.py, with the task weights
learned by uncertainty weighting (Kendall et al. 2018, `mtl.weighting = "uncertainty"`,
`mtl.lr` 0.025) instead of equal weights. Paired with `single_minilm`.

Why uncertainty, chosen before any run of this study and without dev scores: (1) its premise
fits these seven tasks, whose losses are of different kinds and scales (mean squared error for
STS-B, softmax cross-entropy for the classifiers and SQuAD spans, per-token cross-entropy for
DialogSum), and it weighs each by a learned homoscedastic noise scale; (2) it adds no pass over
the data (README "Task balancing": FAMO adds a forward pass, GradNorm one backward pass per
task), which matters on a 2-core CPU; (3) it is the longest-standing of the learned weightings
in jmtl.mtl. No other weighting is run in this study.
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("mtl_minilm.py"))
  c.mtl.weighting = "uncertainty"
  c.study.arm = "mtl_minilm_uncertainty"
  c.study.reference = "single_minilm"
  return c
