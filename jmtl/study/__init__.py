"""Studies: the optimizer study (`jmtl sweep`, `jmtl report optim`), the multi-task study
(`jmtl study mtl`, `jmtl report mtl`), the federated study (`jmtl study federated`, `jmtl
report federated`) and the run executor they share (`jmtl.study.runs`)."""

from jmtl.study.report import report_optim
from jmtl.study.sweep import run_sweep

__all__ = ["report_optim", "run_sweep"]
