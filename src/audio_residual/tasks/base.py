"""The task interface: everything the store, the report, the study and every trainer need to know about a task.

A task owns its data side (what a target is, which texts the text tower embeds, how a training epoch is
batched), its loss and its forwards from audio embeddings to scores, its metrics and its selection metric
(open_clip's shape: one file per task). A method that produces audio embeddings (zero-shot, ResiDual, LoRA,
a fine-tuned tower) therefore trains and scores on any task through the same few calls.

A new task is one module with a `Task` subclass and one `register_task` call (see `tasks/__init__.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

TRAIN_SCORE_CLIPS = 2000  # a training-split score is measured on at most this many clips (the first, in row order)


@dataclass(frozen=True)
class TrainBatch:
    """One optimisation step's examples: the table rows whose audio it embeds, and each one's target
    (a class index; the index of a caption among the split's texts)."""

    rows: np.ndarray
    targets: np.ndarray


class Task:
    """One kind of problem on a dataset: its targets, texts, loss, scores and metrics.

    `metrics` are the result columns, the first one the headline (tested against the baseline, ranked in the
    report); `selection_metric` is the validation metric every method and the sweep select by (larger is
    better); `report_columns` are the (header, metric) cells after the headline in the comparison table;
    `captioned` says which data the task reads (captioned audio, or a labelled dataset).
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    selection_metric: ClassVar[str]
    report_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    captioned: ClassVar[bool] = False
    baseline: ClassVar[str] = "zeroshot"  # the method every other is compared with
    has_examples: ClassVar[bool] = False  # `examples` lists test queries for the report
    figure_metrics: ClassVar[dict[str, str | None]] = {}  # metrics drawn against parameters (→ random baseline)

    @property
    def headline(self) -> str:
        return self.metrics[0]

    def targets(self, ws: Any, rows: np.ndarray) -> np.ndarray:
        """What each clip of `rows` is scored against (a class index; each caption's clip position)."""
        raise NotImplementedError

    def texts(self, ws: Any, rows: np.ndarray) -> list[str]:
        """The text side of `rows`: what the text encoder embeds to score them (class prompts, captions)."""
        raise NotImplementedError

    def batches(self, ws: Any, rows: np.ndarray, batch_size: int) -> Callable[[torch.Generator], list[TrainBatch]]:
        """One epoch's training batches of `rows`, in an order drawn from the epoch's generator."""
        raise NotImplementedError

    def text_side(self, ws: Any, rows: np.ndarray) -> torch.Tensor:
        """Frozen unit text embeddings that training on `rows` compares audio against (`TrainBatch.targets`
        index them for retrieval; classes for classification)."""
        raise NotImplementedError

    def loss(self, audio: torch.Tensor, batch: TrainBatch, text: torch.Tensor, scale: torch.Tensor | float
             ) -> torch.Tensor:
        """The loss of one batch's (differentiable, unit) audio embeddings against the frozen `text` side."""
        raise NotImplementedError

    def scores(self, ws: Any, audio: torch.Tensor, rows: np.ndarray, texts: torch.Tensor | None = None):
        """Scores of the clips `rows` (embedded as `audio`) against their text side (`texts`: its unit
        embeddings, by default CLAP's): what `evaluate` reads."""
        raise NotImplementedError

    def evaluate(self, scores, targets) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(the row's metrics, arrays stored beside the row) of test scores."""
        raise NotImplementedError

    def score(self, ws: Any, audio: torch.Tensor, rows: np.ndarray) -> float:
        """The selection metric of the clips `rows` embedded as `audio`."""
        metrics, _ = self.evaluate(self.scores(ws, audio, rows), self.targets(ws, rows))
        return float(metrics[self.selection_metric])

    def informative(self, metric: str, n_classes: int | None) -> bool:
        """Whether a metric's cell says anything on this data (else the report shows "—")."""
        return True

    def examples(self, ws: Any, scores, rows: np.ndarray, n: int) -> list[dict]:
        """A few test queries a reader can check by eye (the report lists them); none by default."""
        return []

    def examples_markdown(self, examples: list[dict]) -> str:
        return ""


TASKS: dict[str, Task] = {}  # name → task, in registration order


def register_task(task: Task) -> Task:
    """Make `task` known by name to the study, the store and the command line."""
    if task.name in TASKS and type(TASKS[task.name]) is not type(task):
        raise ValueError(f"a task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {list(TASKS)}")
    return TASKS[name]


def first_rows(rows: Sequence[int] | np.ndarray, n: int = TRAIN_SCORE_CLIPS) -> np.ndarray:
    """At most `n` of `rows`, the first in row order: a bounded, deterministic sample of a large split."""
    return np.sort(np.asarray(rows))[:n]
