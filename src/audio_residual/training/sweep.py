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
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from audio_residual.io import write_csv
from audio_residual.layout import RunLayout
from audio_residual.training.tracking import RunTracker, resolve_mode
from audio_residual.training.trainer import TrainConfig, train_residual_fold
from audio_residual.workspace import Workspace

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
DEFAULT_GRID: dict[str, list] = {
    "lr": [0.01, 0.1],
    "epochs": [10, 30],
    "stages": [[0], [3], [0, 1, 2, 3]],
    "granularity": ["layer", "head"],
    "fold": [1, 2, 3, 4, 5],
}


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product of the grid, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


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
        self.all_rows = pd.read_csv(self.path, dtype={"key": str}) if self.path.exists() else pd.DataFrame()

    @property
    def frame(self) -> pd.DataFrame:
        if self.all_rows.empty or "key" not in self.all_rows:
            return pd.DataFrame()
        return self.all_rows[self.all_rows["key"] == self.key].reset_index(drop=True)

    def done(self, point: dict) -> bool:
        frame = self.frame
        return not frame.empty and _point_key(point) in set(frame["point"])

    def add(self, point: dict, row: dict) -> None:
        options = {k: json.dumps(v) if isinstance(v, list) else v for k, v in point.items()}
        record = {"point": _point_key(point), "key": self.key, **options, **row}
        self.all_rows = pd.concat([self.all_rows, pd.DataFrame([record])], ignore_index=True)
        write_csv(self.path, self.all_rows)


def train_point(ws: Workspace, point: dict, base: dict, out: RunLayout, tracker: RunTracker | None = None) -> dict:
    """Train one grid point on its fold; returns the row (validation and test accuracy, params, time)."""
    options = {**base, **{k: v for k, v in point.items() if k != "fold"}}
    config = TrainConfig.from_dict(options)
    fold = int(point.get("fold", 1))
    split = ws.split(fold, config.val_fraction, config.seed)
    result = train_residual_fold(
        ws, split, config, out=out, logger=tracker
    )
    row = result.row()
    if tracker is not None:
        tracker.log({"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"]})
        tracker.summary(row)
    return row


def run_sweep(
    ws: Workspace,
    out: str | Path | RunLayout,
    grid: dict[str, list] | None = None,
    base: dict | None = None,
    use_wandb: str | bool = "auto",  # a `tracking.MODES` word (True/False: online/disabled)
    project: str = "audio-residual",
) -> pd.DataFrame:
    """Run every grid point (W&B agent when online, else a local loop) and return the sweep table.

    Offline, each point of the local loop is logged to its own offline W&B run (`wandb sync` later).
    """
    layout = RunLayout.of(out)
    grid = grid or DEFAULT_GRID
    base = base or {}
    table = SweepTable(layout.sweep, ws.key({"sweep_base": base}))
    mode = resolve_mode(use_wandb)
    if mode == "online":
        import wandb

        sweep_id = wandb.sweep(wandb_sweep_config(grid), project=project)

        def agent_step() -> None:
            tracker = RunTracker("online", project=project, wandb_dir=layout.root)
            point = {k: tracker.run.config[k] for k in grid}
            if not table.done(point):
                table.add(point, train_point(ws, point, base, layout, tracker))
            tracker.finish()

        wandb.agent(sweep_id, function=agent_step, project=project)
    else:
        from tqdm.auto import tqdm

        for point in tqdm(grid_points(grid), desc="sweep (local grid)"):
            if table.done(point):
                continue
            tracker = RunTracker("offline", project=project, config=point, wandb_dir=layout.root) if mode == "offline" else None
            table.add(point, train_point(ws, point, base, layout, tracker))
            if tracker is not None:
                tracker.finish()
    return table.frame


def _options(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("point", "key", "fold", *RESULT_COLUMNS)]


def _decode(options: dict) -> dict:
    """Grid values as they were given (lists come back from the CSV as JSON text)."""
    options = {k: (json.loads(v) if isinstance(v, str) and v.startswith("[") else v) for k, v in options.items()}
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in options.items()}


def choose_per_fold(frame: pd.DataFrame) -> dict[int, dict]:
    """For each fold, the grid options with the best validation accuracy on that fold's own split.

    Fold k's validation clips come from the other folds, so nothing of fold k takes part in choosing the
    configuration reported on it; test accuracy plays no part at all. Ties keep the earlier grid point.
    """
    if frame.empty:
        raise ValueError("the sweep has no finished grid points to choose from")
    options = _options(frame)
    chosen = {}
    for fold, rows in frame.groupby("fold", sort=True):
        if len(rows) > 1 and rows["val_accuracy"].isna().all():
            raise ValueError(
                f"fold {fold}: {len(rows)} configurations but no validation accuracy to choose between them;"
                " give the sweep a validation fraction > 0 (one that leaves validation clips in every class)"
            )
        best = rows.sort_values("val_accuracy", ascending=False, kind="stable", na_position="last").iloc[0]
        chosen[int(fold)] = _decode(best[options].to_dict())
    return chosen


def mean_ranking(frame: pd.DataFrame) -> pd.DataFrame:
    """Option sets ranked by validation accuracy averaged over folds: a summary to read, never to choose by."""
    options = _options(frame)
    grouped = frame.groupby(options, dropna=False).agg(
        val_accuracy=("val_accuracy", "mean"), test_accuracy=("test_accuracy", "mean"), folds=("fold", "nunique")
    )
    return grouped.sort_values("val_accuracy", ascending=False, kind="stable").reset_index()
