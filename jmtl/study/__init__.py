"""Optimizer study: the learning-rate x seed sweep with ablation, and its report."""

from jmtl.study.report import report_optim
from jmtl.study.sweep import run_sweep

__all__ = ["report_optim", "run_sweep"]
