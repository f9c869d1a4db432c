"""What a study runs, typed and checked once: the sweep grid, the training options every point shares, the
methods beside ResiDual, the k-shot protocols. Every step of the study takes one `StudyConfig`.

    config = StudyConfig(grid=DEFAULT_GRID, base={"val_fraction": 0.1}, shots=(1, 2, 4), seeds=3)
    run_study(ws, "runs/esc50", config)

`grid` and `base` stay plain JSON-able mappings, because result keys hash them as they are: a key
computed from a `StudyConfig` is the key the same dicts gave before, so earlier runs resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from audio_residual.experiments.baselines import ALL_METHODS
from audio_residual.experiments.protocol import Protocol, few_shot_protocols
from audio_residual.experiments.sweep import DEFAULT_GRID, PRESET_KEY, check_presets, few_shot_grid
from audio_residual.training.trainer import TrainConfig


def check_grid(grid: Any) -> dict[str, list]:
    """The grid as a dict of non-empty lists over known options (TrainConfig fields, 'fold', 'preset')."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"expected a JSON object {{option: [values]}}, got {json.dumps(grid)[:60]}")
    known = {f.name for f in fields(TrainConfig)} | {"fold", PRESET_KEY}
    for key, values in grid.items():
        if key not in known:
            raise ValueError(f"unknown option {key!r}; known: {sorted(known)}")
        if not isinstance(values, list | tuple) or not values:
            raise ValueError(f"{key!r} must map to a non-empty list of values, got {values!r}")
    check_presets(grid)
    return {k: list(v) for k, v in grid.items()}


@dataclass(frozen=True)
class StudyConfig:
    """One study's options. `grid`: the sweep, 'fold' included; `base`: training options every grid point
    shares (`TrainConfig` fields); `methods`: the baselines (fine-tuning joins with `finetune_epochs > 0`);
    `shots`/`seeds`: the k-shot protocols; `saliency_clips`: saliency maps and their faithfulness on that many
    test clips of the analysis fold (0: none). Checked on construction."""

    grid: dict[str, list] = field(default_factory=lambda: dict(DEFAULT_GRID))
    base: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ALL_METHODS
    finetune_epochs: int = 0
    analysis_fold: int = 1
    shots: tuple[int, ...] = ()
    seeds: int = 1
    saliency_clips: int = 0  # > 0: saliency of that many analysis-fold test clips, a report section

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", check_grid(self.grid))
        TrainConfig.from_dict(dict(self.base))  # unknown or invalid options fail here, not mid-study
        object.__setattr__(self, "base", dict(self.base))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))

    @classmethod
    def from_cli(cls, args) -> StudyConfig:
        """From `audio-residual sweep/experiment` arguments; a bad --grid is a one-line error naming it."""
        path = args.grid
        try:
            grid = DEFAULT_GRID if path is None else json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--grid {path}: not valid JSON ({err})") from err
        try:
            grid = check_grid(grid)
        except ValueError as err:
            raise ValueError(f"--grid {path}: {err}") from None
        return cls(
            grid=grid,
            base={"batch_size": args.batch_size, "val_fraction": args.val_fraction},
            methods=getattr(args, "methods", None) or ALL_METHODS,
            finetune_epochs=getattr(args, "finetune_epochs", 0),
            analysis_fold=getattr(args, "analysis_fold", 1),
            shots=getattr(args, "shots", None) or (),
            seeds=getattr(args, "seeds", 1),
            saliency_clips=getattr(args, "saliency_clips", 0),
        )

    @property
    def folds(self) -> list:
        """The folds the grid sweeps (empty when the grid names none)."""
        return list(self.grid.get("fold", []))

    @property
    def val_fraction(self) -> float:
        return self.base.get("val_fraction", 0.1)

    def few_shot(self) -> StudyConfig:
        """The configuration each k-shot draw sweeps: `few_shot_grid` of this grid, the same base."""
        return replace(self, grid=few_shot_grid(self.grid))

    def protocols(self) -> list[Protocol]:
        """The k-shot protocols: `seeds` draws per k of `shots` (none without shots)."""
        return few_shot_protocols(self.shots, self.seeds) if self.shots else []
