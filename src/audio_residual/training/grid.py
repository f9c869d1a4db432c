"""ResiDual's configuration grid: presets, points, and the configuration of a point.

Presets: a grid key `preset` lists "default" (the identity-init in-network unit, every other grid option
swept) and named procedures (`TrainConfig.preset`, e.g. "paper"). A preset's own fields are not swept (the
paper's lr, epochs, optimizer, batch size... stay its own, over `base` too); the other options are. Each
preset gets its own nested choice per fold and its own results rows ("residual", "residual-paper").
"""

from __future__ import annotations

import itertools

from audio_residual.training.trainer import PRESETS, TrainConfig

PRESET_KEY = "preset"
DEFAULT_PRESET = "default"  # the identity-init in-network unit, every grid option swept
DEFAULT_GRID: dict[str, list] = {
    "preset": [DEFAULT_PRESET, "paper"],
    "lr": [0.01, 0.1],
    "epochs": [10, 30],
    "stages": [[0], [3], [0, 1, 2, 3]],
    "granularity": ["layer", "head"],
    "fold": [1, 2, 3, 4, 5],
}  # default: 2 × 2 × 3 × 2 × 5 folds = 120 runs; paper (stages × granularity × folds): 30 runs
FEW_SHOT_SWEPT = ("fold", PRESET_KEY, "lr")


def _swept(grid: dict[str, list], preset: str) -> list[str]:
    """The grid keys a preset's points vary: all but `preset` and the fields the preset fixes."""
    fixed = set(PRESETS.get(preset, {}))
    return [k for k in grid if k != PRESET_KEY and k not in fixed]


def check_presets(grid: dict[str, list]) -> None:
    unknown = [p for p in grid.get(PRESET_KEY, []) if p != DEFAULT_PRESET and p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset {unknown[0]!r} in the grid; known: {[DEFAULT_PRESET, *sorted(PRESETS)]}")


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product of the grid, in a stable order; per preset, over the keys it does not fix."""
    check_presets(grid)
    points = []
    for preset in grid.get(PRESET_KEY, [None]):
        keys = list(grid) if preset is None else _swept(grid, preset)
        head = {} if preset is None else {PRESET_KEY: preset}
        points += [head | dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    return points


def preset_points(grid: dict[str, list], preset: str, fold: int | None = None) -> list[dict]:
    """The points of `preset` (a grid without presets is all "default"), on `fold` when the grid names folds."""
    points = [p for p in grid_points(grid) if p.get(PRESET_KEY, DEFAULT_PRESET) == preset]
    return [p for p in points if fold is None or "fold" not in p or int(p["fold"]) == int(fold)]


def normalise_point(point: dict) -> dict:
    """A point as `grid_points` writes it: a preset's fixed fields dropped (W&B's grid still sets them)."""
    preset = point.get(PRESET_KEY)
    return point if preset is None else {k: v for k, v in point.items() if k not in PRESETS.get(preset, {})}


def point_config(point: dict, base: dict) -> TrainConfig:
    """The configuration of a grid point (or a chosen option set): `base`, then the point's options;
    under a named preset, the preset's fields win over `base`."""
    preset = point.get(PRESET_KEY, DEFAULT_PRESET)
    options = {k: v for k, v in point.items() if k not in ("fold", PRESET_KEY)}
    if preset == DEFAULT_PRESET:
        return TrainConfig.from_dict({**base, **options})
    fixed = PRESETS[preset] if preset in PRESETS else {}
    return TrainConfig.preset(preset, **{k: v for k, v in {**base, **options}.items() if k not in fixed})


def point_options(point: dict) -> dict:
    """A point's options without its fold and preset."""
    return {k: v for k, v in point.items() if k not in ("fold", PRESET_KEY)}


def with_folds(grid: dict[str, list], folds) -> dict[str, list]:
    """A grid without a `fold` key runs on every fold of the dataset (not on fold 1 alone, which would then
    be compared with baselines run on every fold)."""
    return grid if "fold" in grid else {**grid, "fold": [int(f) for f in folds]}


def few_shot_grid(grid: dict[str, list]) -> dict[str, list]:
    """The grid each k-shot draw sweeps, restricted for cost: folds, presets and learning rates as given
    (the learning rate is what a few clips per class are most sensitive to), every other option at its
    first listed value. With the default grid: 2 + 1 points per fold instead of 24 + 6."""
    return {k: list(v) if k in FEW_SHOT_SWEPT else list(v[:1]) for k, v in grid.items()}
