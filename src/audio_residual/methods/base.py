"""The method interface and its registry: a method is one module that owns its algorithm, its options (with their
defaults) and its registration; the study, `--methods`, k-shot runs, transfer and the report iterate the registry
of the task at hand (`REGISTRIES[task]`), so nothing outside this package dispatches on a method's name.

    @register
    class Mine(Method):
        name = "mine"
        tasks = ("classification",)            # the registries it joins
        defaults = {"lr": 1e-3, "epochs": 5}   # its options: what the command line and the key know of it
        def fit(self, ctx): ...                # train on ctx.split.train, choose on ctx.split.val
        def embed(self, model, ws, rows): ...  # adapted unit audio embeddings: the task scores them
        def trainable_params(self, model): ...

A method that keeps CLAP's text side gives `embed`; the task turns embeddings into scores (`Task.scores`), and
the fitted encoder can score another dataset's classes zero-shot (`transferable`). Others override `scores`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from audio_residual.data_processing import Split
from audio_residual.layout import RunLayout
from audio_residual.tasks import CLASSIFICATION, Task
from audio_residual.training.loop import LoopResult, Steps, train
from audio_residual.workspace import Workspace


@dataclass
class Context:
    """What a method gets for one split: the data, the task, its seed and resolved options, where it may keep
    runs (this protocol's output folder) and the W&B tracker."""

    ws: Workspace
    split: Split
    task: Task
    seed: int = 0
    options: dict = field(default_factory=dict)
    layout: RunLayout | None = None
    logger: Any = None
    shots: int | None = None  # a k-shot draw's k (None: full data)
    key: str = ""  # the key of the rows this fit produces: names what the method keeps on disk for them

    def embed(self, rows: np.ndarray) -> torch.Tensor:
        """Plain audio embeddings of the rows (every clip embedded once, reused by every fold and method)."""
        return self.ws.embeddings(rows)

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self.ws.table.labels[rows]


class Method:
    """One way to adapt (or not) CLAP: how it fits on a split, how it scores clips, what it trains."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # the task registries it joins
    by_default: ClassVar[tuple[str, ...]] = ()  # tasks whose default method list includes it
    defaults: ClassVar[dict[str, Any]] = {}  # its options and their defaults
    transferable: ClassVar[bool] = False  # its fitted encoder scores another dataset's classes zero-shot

    def options(self, given: Mapping[str, Any] | None = None) -> dict:
        """Its defaults overridden by `given`; an option it does not have is an error naming both."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; its options: {sorted(self.defaults)}")
        return {**self.defaults, **given}

    def label(self, options: Mapping[str, Any]) -> str:
        """The results label of this method under `options` (different procedures never share a label)."""
        return self.name

    def procedure(self, options: Mapping[str, Any]) -> dict:
        """What its rows depend on besides the data and the split: its label and options."""
        return {"method": self.label(options), "options": dict(options)}

    def check(self, options: Mapping[str, Any], ws: Workspace) -> None:
        """Refuse bad options before any method of the run trains (e.g. a text model that is not one)."""

    def in_default(self, options: Mapping[str, Any]) -> bool:
        """Whether a study that names no methods runs it (it is `by_default` for the task), under `options`."""
        return True

    def runs_on(self, options: Mapping[str, Any], fold: int) -> bool:
        """Whether it has anything to run on `fold` under `options` (the study skips folds it has not)."""
        return True

    def fit(self, ctx: Context) -> Any:
        raise NotImplementedError

    def embed(self, model: Any, ws: Workspace, rows: np.ndarray) -> torch.Tensor:
        """Unit audio embeddings of `rows` through the fitted encoder (methods that keep CLAP's text side)."""
        raise NotImplementedError(f"{self.name} does not embed audio for CLAP's text side")

    def scores(self, model: Any, ctx: Context, rows: np.ndarray):
        """Test scores of the clips `rows`, as the task evaluates them (default: the task's scores of `embed`)."""
        return ctx.task.scores(ctx.ws, self.embed(model, ctx.ws, rows), rows)

    def trainable_params(self, model: Any) -> int:
        return int(model.num_parameters)

    def details(self, model: Any) -> dict:
        """Extra columns of its rows (the kept epoch, the validation score, ...)."""
        return {}

    def transfer_scores(self, model: Any, target: Workspace, rows: np.ndarray) -> torch.Tensor:
        """Zero-shot logits of another labelled dataset's clips against its own class prompts."""
        return CLASSIFICATION.scores(target, self.embed(model, target, rows), rows)

    # Methods whose fitted model is kept on disk for transfer (a rerun reuses it instead of refitting).
    def save(self, model: Any, path: Path) -> None:
        raise NotImplementedError

    def load(self, path: Path, ws: Workspace) -> Any:
        raise NotImplementedError

    @property
    def saves(self) -> bool:
        return type(self).save is not Method.save


REGISTRIES: dict[str, dict[str, Method]] = {}  # task → its methods, in registration order


def register(cls: type[Method]) -> type[Method]:
    """Add a method to each of its tasks' registries under its name (another method of that name is an error)."""
    method = cls()
    for task in cls.tasks:
        registry = REGISTRIES.setdefault(task, {})
        if cls.name in registry and type(registry[cls.name]) is not cls:
            raise ValueError(f"a {task} method named {cls.name!r} is already registered")
        registry[cls.name] = method
    return cls


def registry(task: Task | str) -> dict[str, Method]:
    return REGISTRIES.setdefault(task if isinstance(task, str) else task.name, {})


def get(name: str, task: Task | str = CLASSIFICATION) -> Method:
    methods = registry(task)
    if name not in methods:
        task_name = task if isinstance(task, str) else task.name
        raise ValueError(f"unknown {task_name} method {name!r}; choose from {list(methods)}")
    return methods[name]


def default_methods(task: Task | str) -> tuple[str, ...]:
    task_name = task if isinstance(task, str) else task.name
    return tuple(name for name, method in registry(task).items() if task_name in method.by_default)


def option_defaults(options_type) -> dict[str, Any]:
    """A method's options and their defaults, read off its options dataclass (one home for each default)."""
    return {f.name: f.default for f in dataclasses.fields(options_type)}


def keyword_defaults(function, *exclude: str) -> dict[str, Any]:
    """The options of a training function, with their defaults: its parameters that have one, but `exclude`
    (what the method fills in itself, e.g. the seed). One home for each default: the function's signature."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty and name not in exclude
            and not (name.startswith("val_") and p.default is None)}


def row_lookup(rows: np.ndarray, values: torch.Tensor):
    """rows → `values` of those table rows, where `values[i]` belongs to `rows[i]` (features computed once)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]

    def lookup(wanted) -> torch.Tensor:
        return values[torch.from_numpy(order[np.searchsorted(sorted_rows, np.asarray(wanted, dtype=np.int64))])]

    return lookup


def train_scored(ctx: Context, params: dict[str, torch.Tensor], loss, scores, desc: str) -> LoopResult:
    """Train `params` with `loss(batch)` over the task's training batches (AdamW; the options `lr`,
    `weight_decay`, `batch_size`, `epochs`, `patience`), keeping the epoch of the best validation selection
    metric of `scores(rows)`, the untrained start included."""
    options, task, split = ctx.options, ctx.task, ctx.split
    optimizer = torch.optim.AdamW(list(params.values()), lr=options["lr"], weight_decay=options["weight_decay"])

    def validate() -> float:
        metrics, _ = task.evaluate(scores(split.val), task.targets(ctx.ws, split.val))
        return float(metrics[task.selection_metric])

    steps = Steps(params, task.batches(ctx.ws, split.train, options["batch_size"]), loss,
                  validate if len(split.val) else None, optimizer)
    return train(steps, options["epochs"], ctx.seed, options.get("patience"), desc=desc, logger=ctx.logger,
                 metric=task.selection_metric)


def release_memory(ws: Workspace) -> None:
    """Free a model copy's GPU memory before the next fold."""
    if ws.bundle.device.type == "cuda":
        torch.cuda.empty_cache()


def as_float(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()


def as_labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().cpu()


def validation_pair(val_emb, val_labels) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeddings, labels) of the validation split, None when there is none."""
    if val_emb is None or val_labels is None or len(val_labels) == 0:
        return None
    return as_float(val_emb), as_labels(val_labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Classification's selection metric: top-1 accuracy."""
    return float((logits.argmax(1) == labels).float().mean())
