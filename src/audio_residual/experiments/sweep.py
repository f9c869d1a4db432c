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
the draw's own layout (`RunLayout.few_shot`) and its key names the draw. The grid and its presets are
`training.grid`'s; what a sweep trains, ResiDual's `fit` reads back (`methods.residual`) instead of training it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.io import update_csv
from audio_residual.layout import RunLayout
from audio_residual.tasks import Task
from audio_residual.training.grid import (
    DEFAULT_PRESET,
    PRESET_KEY,
    grid_points,
    normalise_point,
    point_config,
    point_options,
    with_folds,
)
from audio_residual.training.tracking import RunTracker, resolve_mode
from audio_residual.training.trainer import default_task, train_residual_fold
from audio_residual.workspace import Workspace

if TYPE_CHECKING:
    from audio_residual.experiments.config import StudyConfig


def wandb_sweep_config(grid: dict[str, list], name: str = "audio-residual", metric: str = "accuracy") -> dict:
    """The same grid as a W&B sweep; W&B maximises the validation selection metric (never a test figure)."""
    return {
        "name": name,
        "method": "grid",
        "metric": {"name": f"val_{metric}", "goal": "maximize"},
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
    return SweepTable(layout.sweep, ws.key({"sweep_base": config.base, "seed": config.seed, **protocol.procedure()}))


class SweepNotRun(FileNotFoundError):
    """A step that reads a sweep found it unfinished: it never trains the grid by surprise."""


def finished_sweep(
    ws: Workspace, out: str | Path | RunLayout, config: StudyConfig, protocol: Protocol = FULL_DATA
) -> pd.DataFrame:
    """The rows of a sweep that `run_sweep` finished (notebook 2, `audio-residual sweep`); reads, never trains."""
    layout = RunLayout.of(out)
    table = _table(ws, layout, config, protocol)
    points = grid_points(with_folds(config.grid, [s.fold for s in ws.splits()]))  # the points `run_sweep` trains
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
    config: StudyConfig,
    out: RunLayout,
    tracker: RunTracker | None = None,
    protocol: Protocol = FULL_DATA,
    task: Task | None = None,
) -> dict:
    """Train one grid point on its fold, on the study's split; returns the row (validation and test figures,
    params, time). The split is the one every method of the study uses (`config.val_fraction`, `config.seed`)."""
    task = task or default_task(ws)
    train_config = point_config(point, config.base)
    folds = {s.fold: s for s in protocol.splits(ws, config.val_fraction, config.seed)}
    fold = int(point.get("fold", next(iter(folds))))
    if fold not in folds:
        raise ValueError(f"no fold {fold} in {ws.table.name!r}: folds are {sorted(folds)}")
    result = train_residual_fold(ws, folds[fold], train_config, out=out, logger=tracker, task=task)
    row = result.row()
    if tracker is not None:
        metric = task.selection_metric
        tracker.log({f"val_{metric}": row[f"val_{metric}"], f"test_{task.headline}": row[f"test_{task.headline}"]})
        tracker.summary(row)
    return row


def run_sweep(
    ws: Workspace,
    out: str | Path | RunLayout,
    config: StudyConfig,
    use_wandb: str | bool = "auto",  # a `tracking.MODES` word (True/False: online/disabled)
    project: str = "audio-residual",
    protocol: Protocol = FULL_DATA,
    task: Task | None = None,
) -> pd.DataFrame:
    """Run every point of `config.grid` (W&B agent when online, else a local loop) on `protocol`'s splits,
    each under `config.base`.

    Returns the sweep table. Offline, each point of the local loop is logged to its own offline W&B run
    (`wandb sync` later).
    """
    layout = RunLayout.of(out)
    task = task or default_task(ws)
    grid = with_folds(config.grid, [s.fold for s in ws.splits()])
    table = _table(ws, layout, config, protocol)
    mode = resolve_mode(use_wandb)
    if mode == "online":
        import wandb

        sweep_id = wandb.sweep(wandb_sweep_config(grid, metric=task.selection_metric), project=project)

        def agent_step() -> None:
            tracker = RunTracker("online", project=project, wandb_dir=layout.root)
            point = normalise_point({k: tracker.run.config[k] for k in grid})
            if not table.done(point):
                table.add(point, train_point(ws, point, config, layout, tracker, protocol, task))
            tracker.finish()

        wandb.agent(sweep_id, function=agent_step, project=project)
    else:
        from tqdm.auto import tqdm

        for point in tqdm(grid_points(grid), desc=f"sweep (local grid, {protocol.label})"):
            if table.done(point):
                continue
            tracker = RunTracker("offline", project=project, config=point, wandb_dir=layout.root) if mode == "offline" else None
            table.add(point, train_point(ws, point, config, layout, tracker, protocol, task))
            if tracker is not None:
                tracker.finish()
    return table.frame


def _options(frame: pd.DataFrame) -> list[str]:
    """The grid options of the sweep's rows (the keys of their points, fold and preset aside)."""
    keys = dict.fromkeys(k for point in frame["point"] for k in point_options(json.loads(point)))
    return [k for k in keys if k in frame.columns]


def row_options(point: str) -> dict:
    """A row's grid options, decoded from its JSON `point` (without its fold and preset)."""
    return point_options(json.loads(point))


def presets(frame: pd.DataFrame) -> list[str]:
    """The presets of the sweep's rows, in grid order ("default" for rows of a grid without presets)."""
    if frame.empty:
        return []
    return list(dict.fromkeys(frame.get(PRESET_KEY, pd.Series(DEFAULT_PRESET, index=frame.index)).fillna(DEFAULT_PRESET)))


def choose_per_fold(frame: pd.DataFrame, preset: str = DEFAULT_PRESET, metric: str = "accuracy") -> dict[int, dict]:
    """For each fold, the grid options (of `preset`'s points) with the best validation `metric` on that fold's own
    split; the options come without the preset (`point_config` takes it separately). What ResiDual's `fit` does
    per fold (`methods.residual`), read off the sweep table, for display.

    Fold k's validation clips come from the other folds, so nothing of fold k takes part in choosing the
    configuration reported on it; test figures play no part at all. Ties keep the earlier grid point.
    """
    if frame.empty:
        raise ValueError("the sweep has no finished grid points to choose from")
    if PRESET_KEY in frame:
        frame = frame[frame[PRESET_KEY].fillna(DEFAULT_PRESET) == preset]
        if frame.empty:
            raise ValueError(f"the sweep has no finished points of preset {preset!r}")
    elif preset != DEFAULT_PRESET:
        raise ValueError(f"the sweep has no preset column, so no points of preset {preset!r}")
    column = f"val_{metric}"
    chosen = {}
    for fold, rows in frame.groupby("fold", sort=True):
        if len(rows) > 1 and rows[column].isna().all():
            raise ValueError(
                f"fold {fold}: {len(rows)} configurations but no validation {metric} to choose between them;"
                " give the sweep a validation fraction > 0 (one that leaves validation clips in every class)"
            )
        best = rows.sort_values(column, ascending=False, kind="stable", na_position="last").iloc[0]
        chosen[int(fold)] = row_options(best["point"])
    return chosen


def mean_ranking(frame: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Option sets ranked by validation `metric` averaged over folds: a summary to read, never to choose by."""
    options = ([PRESET_KEY] if PRESET_KEY in frame else []) + _options(frame)
    val, test = f"val_{metric}", f"test_{metric}"
    if not options:  # a grid of one point per fold
        frame, options = frame.assign(point_options="{}"), ["point_options"]
    grouped = frame.groupby(options, dropna=False).agg(**{val: (val, "mean"), test: (test, "mean"),
                                                          "folds": ("fold", "nunique")})
    return grouped.sort_values(val, ascending=False, kind="stable").reset_index()
