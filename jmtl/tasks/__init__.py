"""Task registry: `Task`, `TASKS`, `get_task`, `register` and the built-in task definitions."""

from jmtl.tasks.base import KINDS
from jmtl.tasks.base import METRICS
from jmtl.tasks.base import SPLITS
from jmtl.tasks.base import JsonlSource
from jmtl.tasks.base import SquadSource
from jmtl.tasks.base import TASKS
from jmtl.tasks.base import Task
from jmtl.tasks.base import TextFolderSource
from jmtl.tasks.base import TfdsSource
from jmtl.tasks.base import TsvSource
from jmtl.tasks.base import get_task
from jmtl.tasks.base import register
from jmtl.tasks import bbc  # noqa: F401  (registers tasks)
from jmtl.tasks import glue  # noqa: F401
from jmtl.tasks import squad  # noqa: F401
from jmtl.tasks import summarization  # noqa: F401

__all__ = ["KINDS", "METRICS", "SPLITS", "JsonlSource", "SquadSource", "TASKS", "Task",
           "TextFolderSource", "TfdsSource", "TsvSource", "get_task", "register"]
