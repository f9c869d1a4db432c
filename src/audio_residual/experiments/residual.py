"""ResiDual on every fold: train, record test metrics in the shared results store, draw λ."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from audio_residual.evaluation.store import ResultsStore
from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.experiments.sweep import (
    DEFAULT_PRESET,
    PRESET_KEY,
    choose_per_fold,
    point_config,
    presets,
)
from audio_residual.io import save_figure, write_csv
from audio_residual.layout import FoldLayout, RunLayout
from audio_residual.residual.units import ResiDual
from audio_residual.tasks import CLASSIFICATION
from audio_residual.training.trainer import TrainConfig, run_key, train_residual_fold
from audio_residual.workspace import Workspace

if TYPE_CHECKING:
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.training.tracking import RunTracker


# How the per-fold configurations were chosen, as part of the rows' key: an identifier, never prose.
NESTED_SELECTION = {"per_fold": True, "split": "val", "metric": CLASSIFICATION.selection_metric}


def save_lambda_figures(files: FoldLayout, title: str) -> pd.DataFrame:
    """λ table (CSV) and pictures of a trained fold's ResiDual file; returns the table."""
    from audio_residual.residual.plots import lambda_heatmap, lambda_profile

    table = pd.DataFrame(ResiDual.load(files.lambdas).lambda_table())
    write_csv(files.lambda_table, table)
    save_figure(lambda_heatmap(table, title=f"{title}: λ per component"), files.root / "lambda_heatmap.png")
    save_figure(lambda_profile(table, title=f"{title}: λ by component rank"), files.root / "lambda_profile.png")
    return table


def method_name(configs) -> str:
    """The results label of configurations used together: their variant, "residual-mixed" when they differ."""
    variants = {c.variant for c in configs}
    return variants.pop() if len(variants) == 1 else "residual-mixed"


def train_all_folds(
    ws: Workspace,
    config: TrainConfig | Mapping[int, TrainConfig],
    out: str | Path | RunLayout,
    store: ResultsStore,
    method: str | None = None,
    folds: list[int] | None = None,
    force: bool = False,
    tracker: RunTracker | None = None,
    procedure: dict | None = None,
    protocol: Protocol = FULL_DATA,
) -> pd.DataFrame:
    """Train on each fold whose row `store` lacks under this procedure's key (unless `force`).

    `config` is one configuration for every fold, or one per fold (a nested choice: fold k's configuration
    chosen without fold k). `procedure` describes how the configurations were obtained and keys the rows;
    by default it is the configuration itself. Checkpoints, λ and figures go to `out`'s run folder of each
    configuration (`RunLayout.fold`); a sweep into the same `out` has already trained (and timed) a
    configuration, so its folds are resumed, not retrained. Rows are labelled `method`, by default the variant's name (`config.variant`:
    "residual", "residual-paper", …; "residual-mixed" when the folds' chosen variants differ).
    """
    layout = RunLayout.of(out)
    per_fold = config if isinstance(config, Mapping) else None
    method = method or method_name((per_fold or {0: config}).values())
    if per_fold is None:
        procedure = procedure or {"method": method, "config": asdict(config)}
        per_fold = {s.fold: config for s in protocol.splits(ws, config.val_fraction, config.seed)}
    elif procedure is None:
        raise ValueError("per-fold configurations need the procedure that chose them (it keys the results)")
    key = ws.key(procedure | protocol.procedure())
    todo = [fold for fold in sorted(per_fold) if folds is None or fold in folds]
    for fold in tqdm(todo, desc=f"{method} folds"):
        fold_config = per_fold[fold]
        if store.reuse(method, fold, key, protocol.shots, protocol.seed) and not force:
            continue
        split = protocol.split(ws, fold, fold_config.val_fraction, fold_config.seed)
        result = train_residual_fold(ws, split, fold_config, out=layout, logger=tracker)
        store.add_evaluation(
            method, fold, key, result.test_logits, result.test_labels, result.trainable_params,
            result.seconds, val_accuracy=result.val_accuracy, best_epoch=result.best_epoch, config=fold_config.digest(),
            **protocol.columns(),
        )
        save_lambda_figures(layout.fold(run_key(ws, fold_config), fold), method)
    frame = protocol.rows(store.all_regimes)
    return frame[frame["method"] == method]


def chosen_configs(sweep: pd.DataFrame, config: StudyConfig, coarse: bool = True) -> dict[str, dict[int, TrainConfig]]:
    """Preset → {fold: configuration chosen on that fold's own validation split}, for every preset of the
    sweep (under `config.base`), plus "coarse": the default preset's choice with one λ per unit (when `coarse`)."""
    configs = {
        preset: {fold: point_config({**options, PRESET_KEY: preset}, config.base) for fold, options in choose_per_fold(sweep, preset).items()}
        for preset in presets(sweep)
    }
    if coarse and DEFAULT_PRESET in configs:
        configs["coarse"] = {fold: dataclasses.replace(c, coarse=True) for fold, c in configs[DEFAULT_PRESET].items()}
    return configs


def train_chosen_per_fold(
    ws: Workspace,
    sweep: pd.DataFrame,
    config: StudyConfig,
    out: str | Path | RunLayout,
    store: ResultsStore,
    coarse: bool = True,
    protocol: Protocol = FULL_DATA,
) -> dict[int, dict]:
    """ResiDual with each fold's configuration chosen on that fold's validation split (nested), into `store`.

    One method per preset of the sweep, rows labelled by the chosen variant ("residual" for the default
    unit, "residual-paper" for the paper's procedure), and the default's coarse twin, one λ per unit
    ("residual_coarse"); rows are keyed by `config`'s grid and base options and the preset. `protocol` and `out` as in
    `train_all_folds`. Returns the default preset's {fold: chosen options}.
    """
    procedure = {"selection": NESTED_SELECTION, "grid": config.grid, "base": config.base}
    for preset, configs in chosen_configs(sweep, config, coarse).items():
        variant = {"coarse": True} if preset == "coarse" else {} if preset == DEFAULT_PRESET else {"preset": preset}
        train_all_folds(ws, configs, out, store, procedure=procedure | variant, protocol=protocol)
    return choose_per_fold(sweep, DEFAULT_PRESET if DEFAULT_PRESET in presets(sweep) else presets(sweep)[0])


def fold_lambdas(ws: Workspace, configs: Mapping[int, TrainConfig], out: str | Path | RunLayout) -> list[ResiDual]:
    """The trained ResiDual of each fold (best epoch), as `train_all_folds` saved it under `out`."""
    layout = RunLayout.of(out)
    return [ResiDual.load(layout.fold(run_key(ws, config), fold).lambdas) for fold, config in sorted(configs.items())]
