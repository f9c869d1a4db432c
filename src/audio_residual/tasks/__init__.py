"""Tasks as data: what a target is, the text side, the loss, the forwards, the metrics, the selection metric and
the result columns. A new task is one module (a `Task` subclass) and one `register_task` line below."""

from audio_residual.tasks.base import TASKS, Task, TrainBatch, get_task, register_task
from audio_residual.tasks.classification import CLASSIFICATION, Classification
from audio_residual.tasks.retrieval import RETRIEVAL, Retrieval

register_task(CLASSIFICATION)
register_task(RETRIEVAL)

__all__ = ["CLASSIFICATION", "RETRIEVAL", "TASKS", "Classification", "Retrieval", "Task", "TrainBatch", "get_task",
           "register_task"]
