"""The method interface and its registry: a method is one module with one `Method` subclass, registered
by `@register`; the study, `--methods`, k-shot runs, transfer and the report iterate `REGISTRY`.

    @register
    class Mine(Method):
        name = "mine"
        def fit(self, ctx): ...                       # train on ctx.split.train, choose on ctx.split.val
        def scores(self, model, ctx, rows): ...       # (len(rows), C) test scores
        def trainable_params(self, model): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from audio_residual.data_processing import Split
from audio_residual.workspace import Workspace


@dataclass
class Context:
    """What a method gets for one split: the data, cached audio embeddings, its seed and options."""

    ws: Workspace
    split: Split
    embed: Callable[[np.ndarray], torch.Tensor] | None = None  # rows → cached audio embeddings
    seed: int = 0
    options: dict = field(default_factory=dict)  # keyword arguments of the method's training

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self.ws.table.labels[rows]


class Method:
    """One way to adapt (or not) CLAP: how it fits on a split, how it scores clips, what it trains."""

    name: ClassVar[str]
    task: ClassVar[str] = "classification"  # the task it solves: names are unique within a task's registry
    uses_embeddings: ClassVar[bool] = True  # trains on the cached audio embeddings (computed once for all)
    by_default: ClassVar[bool] = False  # in the default method list (`DEFAULT_METHODS`); else only when named
    transferable: ClassVar[bool] = False  # keeps CLAP's text side: its fitted model scores other label sets
    model_type: ClassVar[type | None] = None  # what `fit` returns, for transferable methods

    def fit(self, ctx: Context) -> Any:
        raise NotImplementedError

    def scores(self, model: Any, ctx: Context, rows: np.ndarray) -> torch.Tensor:
        return model.logits(ctx.embed(rows))

    def trainable_params(self, model: Any) -> int:
        return int(model.num_parameters)

    # Transferable methods only: the fitted model on disk, and its scores on another dataset's classes.
    def save(self, model: Any, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path) -> Any:
        raise NotImplementedError

    def transfer_scores(self, model: Any, target: Workspace, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


REGISTRIES: dict[str, dict[str, Method]] = {"classification": {}}  # task → its methods, in registration order
REGISTRY = REGISTRIES["classification"]


def register(cls: type[Method]) -> type[Method]:
    """Add a method to its task's registry under its name (a second method of the same name is an error)."""
    registry = REGISTRIES.setdefault(cls.task, {})
    if cls.name in registry and type(registry[cls.name]) is not cls:
        raise ValueError(f"a {cls.task} method named {cls.name!r} is already registered")
    registry[cls.name] = cls()
    return cls


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[name]


def release_memory(ws: Workspace) -> None:
    """Free a model copy's GPU memory before the next fold."""
    if ws.bundle.device.type == "cuda":
        torch.cuda.empty_cache()
