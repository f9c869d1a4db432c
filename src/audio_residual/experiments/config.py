"""What a study runs, typed and checked once, for any task: the methods and their options, ResiDual's grid and
the training options its points share, the split, the k-shot protocols. Every step of the study takes one
`StudyConfig`.

    config = StudyConfig(grid=DEFAULT_GRID, base={"val_fraction": 0.1}, shots=(1, 2, 4), seeds=3)
    run_study(ws, "runs/esc50", config)
    StudyConfig(task="retrieval", shared={"epochs": 5})   # every method with an `epochs` option trains 5

Options reach a method in this order, each overriding the last: its own defaults (`Method.defaults`), `shared`
(options every method that has them takes: epochs, batch size, ...), ResiDual's `grid` and `base` (for the
methods that have them), and `options[method]`. `grid` and `base` stay plain JSON-able mappings, because result
keys hash them as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from audio_residual.experiments.protocol import Protocol, few_shot_protocols
from audio_residual.methods import default_methods, registry
from audio_residual.methods.base import Method
from audio_residual.tasks import TASKS, get_task
from audio_residual.training.grid import DEFAULT_GRID, PRESET_KEY, check_presets, few_shot_grid
from audio_residual.training.trainer import TrainConfig

STUDY_GRIDS = {"classification": DEFAULT_GRID}  # a task's default sweep; others: ResiDual's one default point


def check_grid(grid: Any) -> dict[str, list]:
    """The grid as a dict of lists over known options (TrainConfig fields, 'fold', 'preset')."""
    if not isinstance(grid, dict):
        raise ValueError(f"expected a JSON object {{option: [values]}}, got {json.dumps(grid)[:60]}")
    known = {f.name for f in fields(TrainConfig)} | {"fold", PRESET_KEY}
    for key, values in grid.items():
        if key not in known:
            raise ValueError(f"unknown option {key!r}; known: {sorted(known)}")
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"{key!r} must map to a non-empty list of values, got {values!r}")
    check_presets(grid)
    return {k: list(v) for k, v in grid.items()}


def read_grid(path: str | Path | None) -> dict[str, list] | None:
    """A `--grid` JSON file, checked; a bad one is a one-line error naming it. None without a file."""
    if path is None:
        return None
    try:
        grid = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--grid {path}: not valid JSON ({err})") from err
    try:
        return check_grid(grid)
    except ValueError as err:
        raise ValueError(f"--grid {path}: {err}") from None


@dataclass(frozen=True)
class StudyConfig:
    """One study's options, checked on construction. `methods`: names in the task's registry (None: its defaults);
    `grid`: ResiDual's sweep, 'fold' included (None: the task's default, `STUDY_GRIDS`); `base`: training options
    every grid point shares (`TrainConfig` fields); `shots`/`seeds`: the k-shot protocols; `saliency_clips`:
    saliency maps and their faithfulness on that many test clips of the analysis fold (0: none); `examples`: test
    clips whose best-scored texts the report lists (retrieval). The task's baseline (zero-shot) always runs: every
    other method is compared with it."""

    task: str = "classification"
    methods: tuple[str, ...] | None = None
    grid: dict[str, list] | None = None
    base: dict[str, Any] = field(default_factory=dict)
    options: dict[str, dict] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    analysis_fold: int = 1
    shots: tuple[int, ...] = ()
    seeds: int = 1
    saliency_clips: int = 0
    examples: int = 3

    def __post_init__(self) -> None:
        get_task(self.task)
        grid = STUDY_GRIDS.get(self.task, {}) if self.grid is None else self.grid
        object.__setattr__(self, "grid", check_grid(dict(grid)))
        TrainConfig.from_dict(dict(self.base))  # unknown or invalid options fail here, not mid-study
        object.__setattr__(self, "base", dict(self.base))
        known, baseline = registry(self.task), get_task(self.task).baseline
        names = tuple(dict.fromkeys(self.methods or ()))
        unknown = [name for name in (*names, *self.options) if name not in known]
        if unknown:
            raise ValueError(f"unknown {self.task} method {unknown[0]!r}; choose from {list(known)}")
        object.__setattr__(self, "methods", names)
        if not names:
            object.__setattr__(self, "methods", tuple(
                n for n in default_methods(self.task) if known[n].in_default(self.method_options(n))))
        if baseline in known and baseline not in self.methods:  # every other method is compared with it
            object.__setattr__(self, "methods", (baseline, *self.methods))
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))
        if self.shots and TASKS[self.task].captioned:
            raise ValueError(f"k-shot protocols draw clips per class: {self.task} has no classes")
        for name in self.methods:
            self.method_options(name)  # an option a method does not have fails now

    @property
    def folds(self) -> list:
        """The folds the grid sweeps (empty when the grid names none)."""
        return list(self.grid.get("fold", []))

    @property
    def val_fraction(self) -> float:
        return self.base.get("val_fraction", 0.1)

    def method(self, name: str) -> Method:
        return registry(self.task)[name]

    def method_options(self, name: str) -> dict:
        """`name`'s options: its defaults, then `shared`, ResiDual's grid and base, then `options[name]`."""
        method = self.method(name)
        given = {**self.shared, "grid": self.grid, "base": self.base}
        given = {k: v for k, v in given.items() if k in method.defaults} | dict(self.options.get(name, {}))
        return method.options(given)

    def few_shot(self) -> StudyConfig:
        """The configuration each k-shot draw sweeps: `few_shot_grid` of this grid, the same base."""
        return replace(self, grid=few_shot_grid(self.grid))

    def protocols(self) -> list[Protocol]:
        """The k-shot protocols: `seeds` draws per k of `shots` (none without shots)."""
        return few_shot_protocols(self.shots, self.seeds) if self.shots else []
