"""Train ResiDual's λ on one fold: frozen CLAP, frozen class text embeddings, cross-entropy on scaled logits.

The PCA statistics come from the fold's training clips only; the validation split (carved from the
training folds) chooses the epoch; the test fold is touched once, at the end, for the reported numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.stage_cache import StagePrefix, first_stage
from audio_residual.data_processing import Split
from audio_residual.io import digest, write_csv, write_json
from audio_residual.layout import RunLayout
from audio_residual.residual.units import ResiDual, ResidualConfig
from audio_residual.tasks import CLASSIFICATION, RETRIEVAL, Task
from audio_residual.tasks.base import first_rows
from audio_residual.training.encoder import OPTIMIZERS, encoder_steps, make_optimizer, optimizer_mode
from audio_residual.training.loop import LoopResult, Steps, train
from audio_residual.workspace import Workspace

SCHEDULES = ("constant", "cosine")
# The paper's procedure (Basile et al.; Flegyas/ResiDual configs): unit variant and training recipe.
PRESETS: dict[str, dict] = {
    "paper": {
        "init": "randn",
        "evr": 0.9,
        "center": "drop",
        "tail": "zero",
        "optimizer": "schedulefree",
        "schedule": "constant",  # schedule-free AdamW has no schedule
        "lr": 0.8,
        "batch_size": 64,
        "epochs": 30,
        "patience": 5,
    }
}


@dataclass
class TrainConfig:
    """Everything a ResiDual run depends on; flat, so a W&B sweep can set any field."""

    granularity: str = "head"
    kinds: tuple[str, ...] = ("attn",)
    stages: tuple[int, ...] | None = None
    k: int | None = None
    evr: float | None = None
    init: str = "ones"
    coarse: bool = False
    center: str = "keep"  # ResiDual variant options: see `audio_residual.residual.units`
    tail: str = "keep"
    coarse_center: str = "mean"
    optimizer: str = "adamw"
    lr: float = 1e-2
    weight_decay: float = 0.0  # pulls λ towards 0 (suppression), not towards 1: off by default
    epochs: int = 10
    batch_size: int = 32
    schedule: str = "cosine"
    val_fraction: float = 0.1
    patience: int | None = None  # early stopping on validation accuracy
    tokens_per_clip: int | None = None  # token subsampling for the PCA statistics
    seed: int = 0

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        self.stages = None if self.stages is None else tuple(int(s) for s in self.stages)
        self.residual_config()  # validates the ResiDual part
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not (self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1):
            raise ValueError(f"need lr > 0, epochs ≥ 1, batch_size ≥ 1; got {self.lr}, {self.epochs}, {self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From a JSON/W&B dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """A named procedure (`PRESETS`), with any field overridden: `TrainConfig.preset("paper", stages=(3,))`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @property
    def variant(self) -> str:
        """The procedure's name in results: "residual-paper" when every field of the paper preset has its
        value, else the unit variant's label ("residual", "residual-center-drop-tail-zero-init-randn", …).

        Different variants never share a name; which units carry λ and the hyperparameters outside the
        preset (granularity, stages, k, weight decay, …) are configuration, told apart by `digest`.
        """
        paper = PRESETS["paper"]
        if not self.coarse and all(getattr(self, key) == value for key, value in paper.items()):
            return "residual-paper"
        return self.residual_config().label

    def residual_config(self) -> ResidualConfig:
        return ResidualConfig(**{f.name: getattr(self, f.name) for f in fields(ResidualConfig)})

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class FoldResult:
    """One configuration trained on one fold: the kept epoch, the selection metric of the task at the start
    (λ = 1, i.e. zero-shot) and at the kept epoch on training clips (at most `TRAIN_SCORE_CLIPS`) and on
    validation, the test metrics (read once, at the end), cost, and the kept λ."""

    fold: int
    metric: str  # the task's selection metric, e.g. accuracy or mean_r1
    best_epoch: int
    start_train_score: float
    train_score: float
    val_score: float
    test: dict[str, float]
    trainable_params: int
    seconds: float
    history: list[dict] = field(repr=False, default_factory=list)
    residual: ResiDual | None = field(repr=False, default=None)

    def row(self) -> dict:
        """The sweep table's row: `val_<metric>`, `test_<metric>` for every test metric, ..."""
        m = self.metric
        return {"fold": self.fold, "best_epoch": self.best_epoch, f"start_train_{m}": self.start_train_score,
                f"train_{m}": self.train_score, f"val_{m}": self.val_score,
                **{f"test_{k}": v for k, v in self.test.items()}, "trainable_params": self.trainable_params,
                "seconds": self.seconds}

    @classmethod
    def from_row(cls, row: dict, metric: str, residual: ResiDual | None = None) -> FoldResult:
        test = {k.removeprefix("test_"): v for k, v in row.items() if k.startswith("test_")}
        return cls(int(row["fold"]), metric, int(row["best_epoch"]), row[f"start_train_{metric}"],
                   row[f"train_{metric}"], row[f"val_{metric}"], test, int(row["trainable_params"]),
                   float(row["seconds"]), residual=residual)


def run_key(ws: Workspace, config: TrainConfig) -> str:
    """A configuration trained on this workspace's data and model: names its run folder and checkpoints."""
    return ws.key({"train_config": asdict(config)})


def fold_statistics(
    ws: Workspace, split: Split, out: RunLayout | None, config: TrainConfig, prefix: StagePrefix | None = None
) -> ResidualStatistics:
    """PCA moments of the fold's training clips, loaded from `out`'s statistics when already fitted for them.

    The file name hashes what the moments depend on (model, the training clips' audio and preprocessing,
    token subsampling, and the first stage when they are fitted from a cached `prefix`, which covers only the
    stages from there on), so every configuration of a sweep that shares the folder and first λ stage fits
    each fold's statistics once, and changed audio or options never reuse old moments.
    """
    train = np.sort(split.train)
    identity = [ws.bundle.provenance, ws.features.digest(train), train.tolist(), config.tokens_per_clip, config.seed if config.tokens_per_clip else 0]
    if prefix is not None:
        identity.append(f"from stage {prefix.stage}")
    key = digest(identity)
    path = None if out is None else out.stats_file(split.fold, key)
    if path is not None and path.exists():
        return ResidualStatistics.load(path)
    # From a prefix, the batches are its cached stage inputs, which no longer need the fusion flags.
    features, is_longer = (ws.features.input_features, ws.features.is_longer) if prefix is None else (prefix.hidden, None)
    stats = ResidualStatistics.fit(
        ws.bundle.model,
        features,
        train,
        batch_size=config.batch_size,
        tokens_per_clip=config.tokens_per_clip,
        seed=config.seed,
        autocast=ws.bundle.autocast,
        device=ws.bundle.device,
        is_longer=is_longer,
        forward=None if prefix is None else prefix.forward,
        metadata={"model": ws.bundle.model_id, "dataset": ws.table.name, "fold": split.fold, "train_clips": key,
                  "provenance": ws.provenance()},
    )
    if path is not None:
        stats.save(path)
    return stats


@torch.no_grad()
def residual_embeddings(
    ws: Workspace, residual: ResiDual | None, rows: np.ndarray, prefix: StagePrefix | None = None
) -> torch.Tensor:
    """Unit audio embeddings (CPU) of the given clips with ResiDual attached (None: the plain model); from the
    cached stage input when there is a prefix, else from the log-mels."""
    if prefix is None:
        return ws.embed(rows, adapter=residual)
    out = []
    for _, x, longer in prefix.batches(rows, ws.batch_size):
        with ws.bundle.autocast(), residual.attached(ws.bundle.model) if residual is not None else contextlib.nullcontext():
            out.append(prefix.forward(x, longer).float().cpu())
    return torch.cat(out) if out else torch.empty(0, ws.bundle.model.config.projection_dim)


def _optimizer(config: TrainConfig, params, total_steps: int):
    optimizer = make_optimizer(config.optimizer, params, config.lr, config.weight_decay)
    if config.schedule == "cosine" and config.optimizer != "schedulefree":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return optimizer, None


def _steps(ws: Workspace, task: Task, split: Split, config: TrainConfig, residual: ResiDual,
           prefix: StagePrefix | None) -> Steps:
    """ResiDual's side of the training loop: the task's loss of the audio embeddings with λ attached (from the
    cached stage input when there is a prefix), the task's selection metric on validation."""
    source = ws if prefix is None else prefix
    steps_per_epoch = max(1, len(task.batches(ws, split.train, config.batch_size)(torch.Generator().manual_seed(0))))
    optimizer, scheduler = _optimizer(config, list(residual.lambdas.values()), steps_per_epoch * config.epochs)

    def forward(x, longer) -> torch.Tensor:
        with residual.attached(ws.bundle.model):
            return source.forward(x, longer)

    return encoder_steps(ws, task, split, forward, lambda rows: residual_embeddings(ws, residual, rows, prefix),
                         dict(residual.lambdas.items()), optimizer, config.batch_size, source=source,
                         scheduler=scheduler, mode=optimizer_mode(optimizer))


def train_residual_fold(
    ws: Workspace,
    split: Split,
    config: TrainConfig,
    out: str | Path | RunLayout | None = None,
    logger=None,
    task: Task | None = None,
) -> FoldResult:
    """Fit statistics on the fold's training clips, train λ for `task` (by default the data's: classification
    of a labelled dataset, retrieval of captioned audio), pick the epoch on validation, test once.

    With an output folder `out`, statistics are cached under it, a checkpoint is written after every epoch
    and an interrupted run resumes from it (`seconds` then sums the wall time of every session of the run);
    the files of the run are `RunLayout.fold(run_key(ws, config), fold)`. When every λ stage is ≥ 1, the input
    of the first λ stage is cached once per clip (`StagePrefix`, shared by every run on the same features) and
    every forward starts there.
    """
    started = time.perf_counter()
    task = task or default_task(ws)
    layout = None if out is None else RunLayout.of(out)
    key = run_key(ws, config)
    files = None if layout is None else layout.fold(key, split.fold)
    stage = first_stage(config.stages)
    prefix = StagePrefix(ws, stage, config.batch_size) if stage >= 1 else None
    stats = fold_statistics(ws, split, layout, config, prefix)
    residual = ResiDual.from_statistics(stats, config.residual_config()).to(ws.bundle.device)
    sample = first_rows(split.train)
    start_train = task.score(ws, residual_embeddings(ws, None, sample, prefix), sample)
    steps = _steps(ws, task, split, config, residual, prefix)
    loop = train(steps, config.epochs, config.seed, config.patience, None if files is None else files.checkpoint, key,
                 logger, f"fold{split.fold}", metric=task.selection_metric)
    if logger is not None:
        logger.log_lambdas(residual, prefix=f"fold{split.fold}")
    seconds = loop.earlier_seconds + time.perf_counter() - started
    result = _finish(ws, task, split, residual, prefix, loop, start_train, seconds)
    if files is not None:
        residual.save(files.lambdas, metadata={"fold": split.fold, "config": asdict(config), "provenance": ws.provenance(),
                                               "task": task.name})
        write_csv(files.history, pd.DataFrame(loop.history))
        write_json(files.result, result.row())
    return result


def _finish(ws, task, split, residual, prefix, loop: LoopResult, start_train: float, seconds: float) -> FoldResult:
    """The kept λ scored on (at most `TRAIN_SCORE_CLIPS`) training clips and then, once, on the test fold."""
    sample = first_rows(split.train)
    train_score = task.score(ws, residual_embeddings(ws, residual, sample, prefix), sample)
    test_scores = task.scores(ws, residual_embeddings(ws, residual, split.test, prefix), split.test)
    test, _ = task.evaluate(test_scores, task.targets(ws, split.test))
    return FoldResult(
        fold=split.fold,
        metric=task.selection_metric,
        best_epoch=loop.best_epoch,
        start_train_score=start_train,
        train_score=train_score,
        val_score=float("nan") if loop.best_score is None else loop.best_score,
        test=test,
        trainable_params=residual.num_parameters(),
        seconds=seconds,
        history=loop.history,
        residual=residual,
    )


def default_task(ws: Workspace) -> Task:
    """The task a dataset's data answers by default: retrieval of captioned audio, else classification."""
    return RETRIEVAL if ws.captioned else CLASSIFICATION
