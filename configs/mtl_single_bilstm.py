"""Multi-task study, arm `single_bilstm`: the paper's Bi-LSTM + attention baseline.

One single-task model per task with the Bi-LSTM + additive-attention trunk (`model.trunk =
"bilstm"`: one bidirectional layer of 128 units per direction, projected to d_model 256; see
jmtl/model/bilstm.py) and the heads of configs/mtl_scratch.py, from scratch, with the same
training setting and per-task budget as `single_scratch` (240 steps of 8 rows). Paired in
`jmtl report mtl` with `single_scratch` (the transformer trained alike).
"""

import pathlib

from jmtl import config as config_lib


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("mtl_scratch.py"))
  c.model.trunk = "bilstm"
  c.model.lstm_hidden = 128
  c.model.lstm_layers = 1
  c.study.arm = "single_bilstm"
  c.study.reference = "single_scratch"
  c.study.single_task = True
  return c
