"""ResiDual (Basile et al., arXiv 2411.00246) as a method of every task: one gain λ per principal component of the
audio encoder's residual units, trained with the task's loss (`training.trainer.train_residual_fold`).

Its configuration is chosen per fold, on that fold's own validation split (nested selection): `fit` trains (or
finds, already trained by a sweep into the same output folder) every grid point of its preset on the fold and
keeps the one with the best validation score; nothing of the test fold takes part. "residual" chooses among the
default unit's points, "residual-paper" among the paper preset's, and "residual_coarse" retrains the default
choice with one λ per unit. A grid without presets is all "default"; the paper preset is always available
(its own fields fixed, the grid's other options swept).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from audio_residual.io import save_figure, write_csv
from audio_residual.layout import FoldLayout
from audio_residual.methods.base import Context, Method, register
from audio_residual.residual.units import ResiDual
from audio_residual.training.grid import (
    DEFAULT_PRESET,
    PRESET_KEY,
    few_shot_grid,
    point_config,
    point_options,
    preset_points,
)
from audio_residual.training.trainer import (
    FoldResult,
    TrainConfig,
    residual_embeddings,
    run_key,
    train_residual_fold,
)


def save_lambda_figures(files: FoldLayout, residual: ResiDual, title: str) -> None:
    """The λ table (CSV) and pictures of a fold's chosen run, beside its λ file."""
    from audio_residual.residual.plots import lambda_heatmap, lambda_profile

    table = pd.DataFrame(residual.lambda_table())
    write_csv(files.lambda_table, table)
    save_figure(lambda_heatmap(table, title=f"{title}: λ per component"), files.root / "lambda_heatmap.png")
    save_figure(lambda_profile(table, title=f"{title}: λ by component rank"), files.root / "lambda_profile.png")


@dataclass
class ResidualChoice:
    """The configuration chosen on a fold (its grid options and full `TrainConfig`), its run, and its λ."""

    residual: ResiDual
    config: TrainConfig | None = None
    options: dict = field(default_factory=dict)
    result: FoldResult | None = None


def trained_point(ctx: Context, config: TrainConfig) -> FoldResult:
    """`config` trained on the context's fold: read from its run folder when a sweep (or an earlier run) finished
    it there under the same key, else trained now (resuming a checkpoint if one was left)."""
    if ctx.layout is not None:
        files = ctx.layout.fold(run_key(ctx.ws, config), ctx.split.fold)
        metric = ctx.task.selection_metric
        if files.result.is_file() and files.lambdas.is_file():
            row = json.loads(files.result.read_text(encoding="utf-8"))
            if f"val_{metric}" in row:
                return FoldResult.from_row(row, metric, ResiDual.load(files.lambdas).to(ctx.ws.bundle.device))
    return train_residual_fold(ctx.ws, ctx.split, config, out=ctx.layout, logger=ctx.logger, task=ctx.task)


def best_point(results: list[tuple[dict, TrainConfig, FoldResult]], fold: int) -> tuple[dict, TrainConfig, FoldResult]:
    """The point with the best validation score (ties: the earlier grid point; a missing score ranks last)."""
    if len(results) > 1 and all(math.isnan(r.val_score) for _, _, r in results):
        raise ValueError(
            f"fold {fold}: {len(results)} configurations but no validation score to choose between them; give a "
            "validation fraction > 0 (one that leaves validation clips in every class)"
        )
    return max(results, key=lambda item: -math.inf if math.isnan(item[2].val_score) else item[2].val_score)


@register
class Residual(Method):
    name = "residual"
    tasks = ("classification", "retrieval")
    by_default = ("classification", "retrieval")
    transferable = True
    defaults = {"grid": {}, "base": {}}  # grid: {option: [values]} of TrainConfig fields, fold, preset
    preset = DEFAULT_PRESET
    coarse = False

    def configs(self, options: dict, fold: int | None = None, shots: int | None = None) -> list[tuple[dict, TrainConfig]]:
        grid = dict(few_shot_grid(options["grid"]) if shots else options["grid"])
        if self.preset != DEFAULT_PRESET and self.preset not in grid.get(PRESET_KEY, []):  # always available
            grid[PRESET_KEY] = [*grid.get(PRESET_KEY, []), self.preset]
        points = preset_points(grid, self.preset, fold)
        return [(point, point_config(point, options["base"])) for point in points]

    def label(self, options) -> str:
        """The variant of its points ("residual", "residual-paper", "residual_coarse", ...), or
        "<name>-mixed" when the grid offers several."""
        configs = [dataclasses.replace(c, coarse=True) if self.coarse else c for _, c in self.configs(dict(options))]
        variants = {c.variant for c in configs}
        return variants.pop() if len(variants) == 1 else f"{self.name}-mixed"

    def runs_on(self, options, fold: int) -> bool:
        """Only the folds its grid names: a grid of some folds reports ResiDual on those (the others' rows would
        have no configuration to choose from)."""
        return bool(self.configs(dict(options), fold))

    def fit(self, ctx: Context) -> ResidualChoice:
        configs = self.configs(ctx.options, ctx.split.fold, ctx.shots)
        if not configs:
            raise ValueError(f"{self.name}: the grid has no {self.preset!r} point for fold {ctx.split.fold}")
        results = [(point, config, trained_point(ctx, config)) for point, config in configs]
        point, config, result = best_point(results, ctx.split.fold)
        if self.coarse:  # the default choice, one λ per unit
            config = dataclasses.replace(config, coarse=True)
            result = trained_point(ctx, config)
        if ctx.layout is not None:
            save_lambda_figures(ctx.layout.fold(run_key(ctx.ws, config), ctx.split.fold), result.residual,
                                self.label(ctx.options))
        return ResidualChoice(result.residual, config, point_options(point), result)

    def embed(self, model: ResidualChoice, ws, rows):
        return residual_embeddings(ws, model.residual, rows)

    def trainable_params(self, model: ResidualChoice) -> int:
        return model.residual.num_parameters()

    def details(self, model: ResidualChoice) -> dict:
        result = model.result
        return {"best_epoch": result.best_epoch, "val_score": result.val_score, "chosen": json.dumps(model.options),
                "config": model.config.digest(), "seconds": result.seconds}  # the chosen run's training time

    def save(self, model: ResidualChoice, path: Path) -> None:
        model.residual.save(path, metadata={"config": dataclasses.asdict(model.config), "chosen": model.options})

    def load(self, path: Path, ws) -> ResidualChoice:
        return ResidualChoice(ResiDual.load(path).to(ws.bundle.device))


@register
class ResidualPaper(Residual):
    """The paper's procedure (its unit variant and schedule-free optimisation), chosen per fold likewise."""

    name = "residual-paper"
    by_default = ("classification",)
    preset = "paper"

    def in_default(self, options) -> bool:
        """By default only when the grid lists the paper preset (a grid of other options sweeps the default unit)."""
        return self.preset in dict(options["grid"]).get(PRESET_KEY, [])


@register
class ResidualCoarse(Residual):
    """The default unit's choice retrained with one λ per unit: how much the per-component gains add."""

    name = "residual_coarse"
    by_default = ("classification",)
    coarse = True
