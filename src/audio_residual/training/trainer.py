"""Train ResiDual's λ on one fold: frozen CLAP, frozen class text embeddings, cross-entropy on scaled logits.

The PCA statistics come from the fold's training clips only; the validation split (carved from the
training folds) chooses the epoch; the test fold is touched once, at the end, for the reported numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.stage_cache import StagePrefix, first_stage
from audio_residual.data_processing import Split
from audio_residual.evaluation.metrics import topk_accuracy
from audio_residual.io import digest, write_csv, write_json
from audio_residual.layout import RunLayout
from audio_residual.residual.units import ResiDual, ResidualConfig
from audio_residual.tasks import CLASSIFICATION
from audio_residual.training.loop import LoopResult, Steps, train
from audio_residual.workspace import Workspace

OPTIMIZERS = ("adam", "adamw", "schedulefree")
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
    fold: int
    best_epoch: int
    start_train_accuracy: float  # λ = 1, i.e. zero-shot, on the training clips
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    test_top5: float
    trainable_params: int
    seconds: float
    test_logits: np.ndarray = field(repr=False)
    test_labels: np.ndarray = field(repr=False)
    history: list[dict] = field(repr=False, default_factory=list)

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("test_logits", "test_labels", "history")}


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
def residual_logits(
    ws: Workspace, residual: ResiDual | None, indices: np.ndarray, batch_size: int = 32, prefix: StagePrefix | None = None
) -> torch.Tensor:
    """Zero-shot logits of the given clips with ResiDual attached (None: the plain model); from the cached
    stage input when there is a prefix, else from the log-mels."""
    source = ws if prefix is None else prefix
    out = []
    for _, x, longer in source.batches(indices, batch_size):
        with ws.bundle.autocast(), residual.attached(ws.bundle.model) if residual is not None else contextlib.nullcontext():
            emb = source.forward(x, longer)
        out.append(ws.classifier.logits(emb).float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(ws.table.class_names))


def _optimizer(config: TrainConfig, params, total_steps: int):
    if config.optimizer == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=config.lr, weight_decay=config.weight_decay), None
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = cls(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "cosine":
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return optimizer, None


def _set_mode(optimizer, training: bool) -> None:
    """Schedule-free AdamW evaluates at averaged weights: it must be told when training stops."""
    if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
        optimizer.train() if training else optimizer.eval()


def _steps(ws: Workspace, split: Split, config: TrainConfig, residual: ResiDual, prefix: StagePrefix | None) -> Steps:
    """ResiDual's side of the training loop: cross-entropy of the class logits with λ attached."""
    source = ws if prefix is None else prefix  # the cached stage inputs when there is a prefix, else the log-mels
    labels = torch.as_tensor(np.array(ws.table.labels))
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    optimizer, scheduler = _optimizer(config, list(residual.lambdas.values()), steps_per_epoch * config.epochs)
    correct = [0]

    def loss(batch) -> torch.Tensor:
        rows, x, longer = batch
        y = labels[rows].to(ws.bundle.device)
        with ws.bundle.autocast(), residual.attached(ws.bundle.model):
            emb = source.forward(x, longer)
        logits = ws.classifier.logits(emb)
        correct[0] += int((logits.argmax(1) == y).sum())
        return CLASSIFICATION.loss(logits, y)

    def record() -> dict:
        accuracy, correct[0] = correct[0] / len(split.train), 0
        return {"train_accuracy": accuracy}

    def validate() -> float:
        logits = residual_logits(ws, residual, split.val, config.batch_size, prefix)
        return topk_accuracy(logits, ws.table.labels[split.val])

    return Steps(
        params=dict(residual.lambdas.items()),
        batches=lambda generator: source.batches(split.train, config.batch_size, generator),
        loss=loss,
        validate=validate if len(split.val) else None,
        optimizer=optimizer,
        scheduler=scheduler,
        mode=lambda training: _set_mode(optimizer, training),
        record=record,
    )


def train_residual_fold(
    ws: Workspace,
    split: Split,
    config: TrainConfig,
    out: str | Path | RunLayout | None = None,
    logger=None,
) -> FoldResult:
    """Fit statistics on the fold's training clips, train λ, pick the epoch on validation, test once.

    With an output folder `out`, statistics are cached under it, a checkpoint is written after every epoch
    and an interrupted run resumes from it (`seconds` then sums the wall time of every session of the run);
    the files of the run are `RunLayout.fold(run_key(ws, config), fold)`. When every λ stage is ≥ 1, the input
    of the first λ stage is cached once per clip (`StagePrefix`, shared by every run on the same features) and
    every forward starts there.
    """
    started = time.perf_counter()
    layout = None if out is None else RunLayout.of(out)
    key = run_key(ws, config)
    files = None if layout is None else layout.fold(key, split.fold)
    stage = first_stage(config.stages)
    prefix = StagePrefix(ws, stage, config.batch_size) if stage >= 1 else None
    stats = fold_statistics(ws, split, layout, config, prefix)
    residual = ResiDual.from_statistics(stats, config.residual_config()).to(ws.bundle.device)
    start_logits = residual_logits(ws, None, split.train, config.batch_size, prefix)
    start_train_accuracy = topk_accuracy(start_logits, ws.table.labels[split.train])
    steps = _steps(ws, split, config, residual, prefix)
    loop = train(steps, config.epochs, config.seed, config.patience, None if files is None else files.checkpoint, key,
                 logger, f"fold{split.fold}", metric=CLASSIFICATION.selection_metric)
    if logger is not None:
        logger.log_lambdas(residual, prefix=f"fold{split.fold}")
    seconds = loop.earlier_seconds + time.perf_counter() - started
    result = _finish(ws, split, config, residual, prefix, loop, start_train_accuracy, seconds)
    if files is not None:
        residual.save(files.lambdas, metadata={"fold": split.fold, "config": asdict(config), "provenance": ws.provenance()})
        write_csv(files.history, pd.DataFrame(loop.history))
        write_json(files.result, result.row())
    return result


def _finish(ws, split, config, residual, prefix, loop: LoopResult, start_train_accuracy: float, seconds: float) -> FoldResult:
    """The kept λ evaluated on the training clips and then, once, on the test fold."""
    train_logits = residual_logits(ws, residual, split.train, config.batch_size, prefix)
    test_logits = residual_logits(ws, residual, split.test, config.batch_size, prefix)
    test_labels = ws.table.labels[split.test]
    return FoldResult(
        fold=split.fold,
        best_epoch=loop.best_epoch,
        start_train_accuracy=start_train_accuracy,
        train_accuracy=topk_accuracy(train_logits, ws.table.labels[split.train]),
        val_accuracy=float("nan") if loop.best_score is None else loop.best_score,
        test_accuracy=topk_accuracy(test_logits, test_labels),
        test_top5=topk_accuracy(test_logits, test_labels, 5),
        trainable_params=residual.num_parameters(),
        seconds=seconds,
        test_logits=test_logits.numpy(),
        test_labels=test_labels,
        history=loop.history,
    )
