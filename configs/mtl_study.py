"""The multi-task study of arXiv 2412.06249 (issue 16): `jmtl study mtl` runs these arms x seeds.

Arms (each a config file beside this one; the shared setting and budgets are in
configs/mtl_scratch.py):
- mtl_scratch: one transformer trunk from scratch, seven task heads, trained on all tasks;
- single_scratch: the same trunk, one model per task, the same per-task steps and examples;
- single_bilstm: the Bi-LSTM + attention baseline, one model per task;
- mtl_minilm: the pretrained MiniLM-L6 trunk fine-tuned on all tasks at once;
- mtl_minilm_uncertainty: the same with uncertainty task weighting (Kendall et al. 2018);
- single_minilm: MiniLM-L6 fine-tuned per task (the BERT-family baseline).
3 seeds each (seed: head initialisation, dropout and data order): 3 x (3 multi-task runs +
3 x 7 single-task runs) = 72 runs. `jmtl report mtl --runs W --out DIR` makes the tables.
"""

from jmtl.defaults import base_config


def get_config():
  c = base_config()
  c.study.arms = ("mtl_scratch.py", "mtl_single_scratch.py", "mtl_single_bilstm.py",
                  "mtl_minilm.py", "mtl_minilm_uncertainty.py", "mtl_single_minilm.py")
  c.study.seeds = (0, 1, 2)
  return c
