"""Grid sweeps over λ-training options: through W&B when logged in, locally otherwise, same results table.

Every grid point (including its fold) runs the same `train_point` function. With W&B, `wandb.agent`
calls it once per point; several agents on several machines (`wandb agent ENTITY/PROJECT/SWEEP_ID`)
share one sweep, which is the scale-out path. Without an account the grid runs in this process. Either
way the rows land in `OUT/sweep.csv`, written atomically after each point, and a rerun skips done points.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from audio_residual.experiment import Experiment
from audio_residual.io import write_csv
from audio_residual.training.tracking import RunTracker, wandb_available
from audio_residual.training.trainer import TrainConfig, run_directory, train_residual_fold

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
    """`OUT/sweep.csv`: one row per finished grid point (options as JSON + metrics)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.frame = pd.read_csv(self.path) if self.path.exists() else pd.DataFrame()

    def done(self, point: dict) -> bool:
        return not self.frame.empty and _point_key(point) in set(self.frame["point"])

    def add(self, point: dict, row: dict) -> None:
        record = {"point": _point_key(point), **{k: json.dumps(v) if isinstance(v, list) else v for k, v in point.items()}, **row}
        self.frame = pd.concat([self.frame, pd.DataFrame([record])], ignore_index=True)
        write_csv(self.path, self.frame)


def train_point(exp: Experiment, point: dict, base: dict, out_dir: Path, tracker: RunTracker | None = None) -> dict:
    """Train one grid point on its fold; returns the row (validation and test accuracy, params, time)."""
    options = {**base, **{k: v for k, v in point.items() if k != "fold"}}
    config = TrainConfig.from_dict(options)
    fold = int(point.get("fold", 1))
    split = exp.split(fold, config.val_fraction, config.seed)
    result = train_residual_fold(
        exp, split, config, out_dir=run_directory(out_dir, config), logger=tracker, stats_dir=out_dir / "stats"
    )
    row = result.row()
    if tracker is not None:
        tracker.log({"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"]})
        tracker.summary(row)
    return row


def run_sweep(
    exp: Experiment,
    out_dir: str | Path,
    grid: dict[str, list] | None = None,
    base: dict | None = None,
    use_wandb: str | bool = "auto",
    project: str = "audio-residual",
) -> pd.DataFrame:
    """Run every grid point (W&B agent or local loop) and return the sweep table."""
    out_dir = Path(out_dir)
    grid = grid or DEFAULT_GRID
    base = base or {}
    table = SweepTable(out_dir / "sweep.csv")
    if use_wandb == "auto":
        use_wandb = wandb_available()
    if use_wandb:
        import wandb

        sweep_id = wandb.sweep(wandb_sweep_config(grid), project=project)

        def agent_step() -> None:
            tracker = RunTracker("online", project=project, wandb_dir=out_dir)
            point = {k: tracker.run.config[k] for k in grid}
            if not table.done(point):
                table.add(point, train_point(exp, point, base, out_dir, tracker))
            tracker.finish()

        wandb.agent(sweep_id, function=agent_step, project=project)
    else:
        from tqdm.auto import tqdm

        for point in tqdm(grid_points(grid), desc="sweep (local grid)"):
            if not table.done(point):
                table.add(point, train_point(exp, point, base, out_dir))
    return table.frame


def best_configuration(frame: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """The option set with the highest mean validation accuracy over folds (test accuracy plays no part)."""
    options = [c for c in frame.columns if c not in ("point", "fold", *RESULT_COLUMNS)]
    grouped = frame.groupby(options, dropna=False).agg(
        val_accuracy=("val_accuracy", "mean"), test_accuracy=("test_accuracy", "mean"), folds=("fold", "nunique")
    )
    grouped = grouped.sort_values("val_accuracy", ascending=False, kind="stable").reset_index()
    best = grouped.iloc[0][options].to_dict()
    best = {k: (json.loads(v) if isinstance(v, str) and v.startswith("[") else v) for k, v in best.items()}
    best = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in best.items()}
    return best, grouped

