"""The task interface: everything the store, the report and the training loop need to know about a task."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch


class Task:
    """One kind of problem on a dataset: its targets, texts, loss and metrics.

    `metrics` are the result columns, the first one the headline (tested against the baseline, ranked in
    the report); `selection_metric` is the validation metric every method and the sweep select by;
    `report_columns` are the (header, metric) cells after the headline in the comparison table.
    """

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    selection_metric: ClassVar[str]
    report_columns: ClassVar[tuple[tuple[str, str], ...]] = ()

    @property
    def headline(self) -> str:
        return self.metrics[0]

    def targets(self, ws: Any, rows: np.ndarray) -> np.ndarray:
        """What each clip is scored against (a class index, a set of captions, …)."""
        raise NotImplementedError

    def texts(self, ws: Any) -> list[str]:
        """The text side: what the text encoder embeds for this task."""
        raise NotImplementedError

    def loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, scores, targets) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(the row's metrics, arrays stored beside the row) of test scores."""
        raise NotImplementedError

    def informative(self, metric: str, n_classes: int | None) -> bool:
        """Whether a metric's cell says anything on this data (else the report shows "—")."""
        return True
