"""jmtl.model: the shared trunk, task heads, multi-task model, losses and checkpoint import."""

from jmtl.model.multitask import HeadSpec, MultiTaskModel

__all__ = ["HeadSpec", "MultiTaskModel"]
