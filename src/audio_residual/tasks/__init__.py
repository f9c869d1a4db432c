"""Tasks as data: what a target is, the text side, the loss, the metrics, the selection metric and the
result columns. Classification is the first; a new task is one module and one line in `TASKS`."""

from audio_residual.tasks.base import Task
from audio_residual.tasks.classification import CLASSIFICATION, Classification
from audio_residual.tasks.retrieval import RETRIEVAL, Retrieval

TASKS: dict[str, Task] = {CLASSIFICATION.name: CLASSIFICATION, RETRIEVAL.name: RETRIEVAL}

__all__ = ["CLASSIFICATION", "RETRIEVAL", "TASKS", "Classification", "Retrieval", "Task"]
