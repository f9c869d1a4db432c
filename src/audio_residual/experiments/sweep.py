"""Grid sweeps over λ-training options: through W&B when logged in, locally otherwise, same results table.

Every grid point (including its fold) runs the same `train_point` function. With W&B, `wandb.agent`
calls it once per point; several agents on several machines (`wandb agent ENTITY/PROJECT/SWEEP_ID`)
share one sweep, which is the scale-out path. Without an account the grid runs in this process. Either
way the rows land in `OUT/sweep.csv`, written atomically after each point, and a rerun skips done points
(a point is done only under the same data, model and base options: each row carries that key).

Selection is nested: the configuration reported on test fold k is the one with the best validation
accuracy on fold k's own split, whose validation clips come from the other folds (`choose_per_fold`).
Averaging validation accuracy over folds would let fold k's clips, which sit in the other folds'
validation sets, vote on the configuration reported on fold k.

Presets: a grid key `preset` lists "default" (the identity-init in-network unit, every other grid option
swept) and named procedures (`TrainConfig.preset`, e.g. "paper"). A preset's own fields are not swept
(the paper's lr, epochs, optimizer, batch size... stay its own, over `base` too); the other options are.
Each preset gets its own nested choice per fold and its own results rows ("residual", "residual-paper").

A k-shot protocol (`audio_residual.experiments.protocol`) runs the same grid on its draw's splits; its table lives in
the draw's own layout (`RunLayout.few_shot`) and its key names the draw.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.io import update_csv
from audio_residual.layout import RunLayout
from audio_residual.training.tracking import RunTracker, resolve_mode
from audio_residual.training.trainer import PRESETS, TrainConfig, train_residual_fold
from audio_residual.workspace import Workspace

if TYPE_CHECKING:
    from audio_residual.experiments.config import StudyConfig

RESULT_COLUMNS = (
    "best_epoch",
    "start_train_accuracy",
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "test_top5",
    "trainable_params",
    "seconds",
)
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


def wandb_sweep_config(grid: dict[str, list], name: str = "audio-residual") -> dict:
    """The same grid as a W&B sweep; W&B maximises validation accuracy (never test)."""
    return {
        "name": name,
        "method": "grid",
        "metric": {"name": "val_accuracy", "goal": "maximize"},
        "parameters": {key: {"values": values} for key, values in grid.items()},
    }


def _point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


class SweepTable:
    """`OUT/sweep.csv`: one row per finished grid point (options as JSON + metrics), keyed by `key`.

    `key` digests the data, model and base options the points were trained under; `frame` holds only the
    rows of that key (other runs' rows stay on disk but are never read as this run's).
    """

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key
        self._reload()

    def _reload(self) -> None:
        """Read the table again: points other agents finished into the same file since are not retrained."""
        self.all_rows = pd.read_csv(self.path, dtype={"key": str}) if self.path.exists() else pd.DataFrame()

    @property
    def frame(self) -> pd.DataFrame:
        if self.all_rows.empty or "key" not in self.all_rows:
            return pd.DataFrame()
        return self.all_rows[self.all_rows["key"] == self.key].reset_index(drop=True)

    def done(self, point: dict) -> bool:
        self._reload()
        frame = self.frame
        return not frame.empty and _point_key(point) in set(frame["point"])

    def add(self, point: dict, row: dict) -> None:
        options = {k: json.dumps(v) if isinstance(v, list) else v for k, v in point.items()}
        record = {"point": _point_key(point), "key": self.key, **options, **row}
        # re-read and merged under a lock: other agents' rows written into this file meanwhile are kept
        self.all_rows = update_csv(self.path, pd.DataFrame([record]), ("key", "point"), dtype={"key": str})


def _table(ws: Workspace, layout: RunLayout, config: StudyConfig, protocol: Protocol) -> SweepTable:
    """The sweep table of these data, model, base options and protocol."""
    return SweepTable(layout.sweep, ws.key({"sweep_base": config.base, **protocol.procedure()}))


class SweepNotRun(FileNotFoundError):
    """A step that reads a sweep found it unfinished: it never trains the grid by surprise."""


def finished_sweep(
    ws: Workspace, out: str | Path | RunLayout, config: StudyConfig, protocol: Protocol = FULL_DATA
) -> pd.DataFrame:
    """The rows of a sweep that `run_sweep` finished (notebook 2, `audio-residual sweep`); reads, never trains."""
    layout = RunLayout.of(out)
    table = _table(ws, layout, config, protocol)
    points = grid_points(with_all_folds(config.grid, ws))  # the points `run_sweep` trains
    missing = [point for point in points if not table.done(point)]
    if missing:
        raise SweepNotRun(
            f"{len(missing)} of {len(points)} grid points are not in {layout.sweep}: run notebook 2's"
            f" cell 'Sweep over λ-training options' (or `audio-residual sweep --out {layout.root}`) first"
        )
    return table.frame


def train_point(
    ws: Workspace,
    point: dict,
    base: dict,
    out: RunLayout,
    tracker: RunTracker | None = None,
    protocol: Protocol = FULL_DATA,
) -> dict:
    """Train one grid point on its fold; returns the row (validation and test accuracy, params, time)."""
    config = point_config(point, base)
    fold = int(point.get("fold", 1))
    split = protocol.split(ws, fold, config.val_fraction, config.seed)
    result = train_residual_fold(
        ws, split, config, out=out, logger=tracker
    )
    row = result.row()
    if tracker is not None:
        tracker.log({"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"]})
        tracker.summary(row)
    return row


def with_all_folds(grid: dict[str, list], ws: Workspace) -> dict[str, list]:
    """A grid without a `fold` key runs on every fold of the dataset (not on fold 1 alone, which would then
    be compared with baselines run on every fold)."""
    return grid if "fold" in grid else {**grid, "fold": list(ws.table.fold_ids)}


def run_sweep(
    ws: Workspace,
    out: str | Path | RunLayout,
    config: StudyConfig,
    use_wandb: str | bool = "auto",  # a `tracking.MODES` word (True/False: online/disabled)
    project: str = "audio-residual",
    protocol: Protocol = FULL_DATA,
) -> pd.DataFrame:
    """Run every point of `config.grid` (W&B agent when online, else a local loop) on `protocol`'s splits,
    each under `config.base`.

    Returns the sweep table. Offline, each point of the local loop is logged to its own offline W&B run
    (`wandb sync` later).
    """
    layout = RunLayout.of(out)
    grid, base = with_all_folds(config.grid, ws), config.base
    table = _table(ws, layout, config, protocol)
    mode = resolve_mode(use_wandb)
    if mode == "online":
        import wandb

        sweep_id = wandb.sweep(wandb_sweep_config(grid), project=project)

        def agent_step() -> None:
            tracker = RunTracker("online", project=project, wandb_dir=layout.root)
            point = normalise_point({k: tracker.run.config[k] for k in grid})
            if not table.done(point):
                table.add(point, train_point(ws, point, base, layout, tracker, protocol))
            tracker.finish()

        wandb.agent(sweep_id, function=agent_step, project=project)
    else:
        from tqdm.auto import tqdm

        for point in tqdm(grid_points(grid), desc=f"sweep (local grid, {protocol.label})"):
            if table.done(point):
                continue
            tracker = RunTracker("offline", project=project, config=point, wandb_dir=layout.root) if mode == "offline" else None
            table.add(point, train_point(ws, point, base, layout, tracker, protocol))
            if tracker is not None:
                tracker.finish()
    return table.frame


def _options(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("point", "key", "fold", PRESET_KEY, *RESULT_COLUMNS)]


def point_options(point: str) -> dict:
    """A row's grid options, decoded from its JSON `point` (without its fold and preset)."""
    return {k: v for k, v in json.loads(point).items() if k not in ("fold", PRESET_KEY)}


def presets(frame: pd.DataFrame) -> list[str]:
    """The presets of the sweep's rows, in grid order ("default" for rows of a grid without presets)."""
    if frame.empty:
        return []
    return list(dict.fromkeys(frame.get(PRESET_KEY, pd.Series(DEFAULT_PRESET, index=frame.index)).fillna(DEFAULT_PRESET)))


def choose_per_fold(frame: pd.DataFrame, preset: str = DEFAULT_PRESET) -> dict[int, dict]:
    """For each fold, the grid options (of `preset`'s points) with the best validation accuracy on that
    fold's own split; the options come without the preset (`point_config` takes it separately).

    Fold k's validation clips come from the other folds, so nothing of fold k takes part in choosing the
    configuration reported on it; test accuracy plays no part at all. Ties keep the earlier grid point.
    """
    if frame.empty:
        raise ValueError("the sweep has no finished grid points to choose from")
    if PRESET_KEY in frame:
        frame = frame[frame[PRESET_KEY].fillna(DEFAULT_PRESET) == preset]
        if frame.empty:
            raise ValueError(f"the sweep has no finished points of preset {preset!r}")
    elif preset != DEFAULT_PRESET:
        raise ValueError(f"the sweep has no preset column, so no points of preset {preset!r}")
    chosen = {}
    for fold, rows in frame.groupby("fold", sort=True):
        if len(rows) > 1 and rows["val_accuracy"].isna().all():
            raise ValueError(
                f"fold {fold}: {len(rows)} configurations but no validation accuracy to choose between them;"
                " give the sweep a validation fraction > 0 (one that leaves validation clips in every class)"
            )
        best = rows.sort_values("val_accuracy", ascending=False, kind="stable", na_position="last").iloc[0]
        chosen[int(fold)] = point_options(best["point"])
    return chosen


def mean_ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Option sets ranked by validation accuracy averaged over folds: a summary to read, never to choose by."""
    options = ([PRESET_KEY] if PRESET_KEY in frame else []) + _options(frame)
    grouped = frame.groupby(options, dropna=False).agg(
        val_accuracy=("val_accuracy", "mean"), test_accuracy=("test_accuracy", "mean"), folds=("fold", "nunique")
    )
    return grouped.sort_values("val_accuracy", ascending=False, kind="stable").reset_index()


FEW_SHOT_SWEPT = ("fold", PRESET_KEY, "lr")


def few_shot_grid(grid: dict[str, list]) -> dict[str, list]:
    """The grid each k-shot draw sweeps, restricted for cost: folds, presets and learning rates as given
    (the learning rate is what a few clips per class are most sensitive to), every other option at its
    first listed value. With the default grid: 2 + 1 points per fold instead of 24 + 6."""
    return {k: list(v) if k in FEW_SHOT_SWEPT else list(v[:1]) for k, v in grid.items()}
