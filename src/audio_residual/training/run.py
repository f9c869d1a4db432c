"""ResiDual on every fold: train, record test metrics in the shared results store, draw λ."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from audio_residual.evaluation.compare import ResultsStore
from audio_residual.experiment import Experiment
from audio_residual.io import write_csv
from audio_residual.residual.units import ResiDual
from audio_residual.training.trainer import TrainConfig, run_directory, train_residual_fold

if TYPE_CHECKING:
    from audio_residual.training.tracking import RunTracker


def save_lambda_figures(lambda_path: Path, out_dir: Path, title: str) -> pd.DataFrame:
    """λ table (CSV) and pictures of a trained ResiDual file; returns the table."""
    from audio_residual.analysis.plots import save
    from audio_residual.residual.plots import lambda_heatmap, lambda_profile

    table = pd.DataFrame(ResiDual.load(lambda_path).lambda_table())
    write_csv(out_dir / "lambdas.csv", table)
    save(lambda_heatmap(table, title=f"{title}: λ per component"), out_dir / "lambda_heatmap.png")
    save(lambda_profile(table, title=f"{title}: λ by component rank"), out_dir / "lambda_profile.png")
    return table


def train_all_folds(
    exp: Experiment,
    config: TrainConfig,
    out_dir: str | Path,
    store: ResultsStore,
    method: str | None = None,
    folds: list[int] | None = None,
    force: bool = False,
    tracker: RunTracker | None = None,
) -> pd.DataFrame:
    """Train `config` on each fold not yet in `store` (unless `force`); rows land in `store` as they finish.

    Rows are labelled `method`, by default the procedure's name `config.variant`.

    Checkpoints, λ and figures go to `run_directory(out_dir, config)`; a sweep into the same `out_dir`
    has already trained (and timed) the configuration, so its folds are resumed, not retrained.
    """
    method = method or config.variant
    out_dir = Path(out_dir)
    run_dir = run_directory(out_dir, config)
    splits = [s for s in exp.splits(config.val_fraction, config.seed) if folds is None or s.fold in folds]
    n_classes = len(exp.table.class_names)
    for split in tqdm(splits, desc=f"{method} folds"):
        if store.has(method, split.fold) and not force:
            continue
        result = train_residual_fold(exp, split, config, out_dir=run_dir, logger=tracker, stats_dir=out_dir / "stats")
        store.add_evaluation(
            method, split.fold, result.test_logits, result.test_labels, n_classes, result.trainable_params,
            result.seconds, val_accuracy=result.val_accuracy, best_epoch=result.best_epoch, config=config.digest(),
        )
        save_lambda_figures(run_dir / f"fold{split.fold}" / "lambda.safetensors", run_dir / f"fold{split.fold}", method)
    return store.frame[store.frame["method"] == method]
