"""Retrieval methods: zero-shot, ResiDual, linear projection, TAP and LoRA (fine-tuning: `retrieval.finetune`).

Every trained method fits on the training split's (clip, caption) pairs with CLIP's symmetric InfoNCE
(one caption drawn per clip and epoch, text side frozen) through the one training loop, which keeps the
epoch of best validation mean R@1, the untrained start included. A fitted method is a `Fitted`: its
trainable-parameter count, seconds, kept epoch, and how it scores any clips against any texts (retrieval
captions, or class prompts for the retention check).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.batches import model_inputs
from audio_residual.clap.encode import audio_embeddings
from audio_residual.evaluation.retrieval import Scorer, dot_scorer, metrics_from_ranks, retrieval_ranks
from audio_residual.residual.units import ResidualConfig, build_residual
from audio_residual.retrieval.contrastive import pair_infonce, symmetric_infonce
from audio_residual.retrieval.data import AudioSource, CaptionSplit, RetrievalData
from audio_residual.retrieval.projection import LinearProjection
from audio_residual.retrieval.tap import TextAwarePooling
from audio_residual.retrieval.text_encoders import TextEncoder
from audio_residual.training.loop import Steps, train
from audio_residual.training.trainer import TrainConfig

# score(data, rows, texts) -> a Scorer of those clips (rows of `data`) against those texts.
ScoreFn = Callable[[AudioSource, np.ndarray, Sequence[str]], Scorer]


@dataclass
class Fitted:
    method: str
    trainable_params: int
    seconds: float
    score: ScoreFn
    best_epoch: int = 0
    start_score: float | None = None  # validation mean R@1 of the untrained start (epoch 0)
    history: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    module: nn.Module | None = None  # what trained (λ, the map, TAP, the tower), for saving and inspection


@dataclass(frozen=True)
class Fit:
    """Optimisation options shared by the trained methods."""

    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    patience: int | None = None
    seed: int = 0
    optimizer: str = "adamw"  # or "schedulefree" (schedule-free AdamW: the paper preset of ResiDual)
    logger: Any = field(default=None, compare=False, repr=False)  # a `RunTracker` (W&B); not an option


def split_metrics(fitted: Fitted, data: RetrievalData, split: CaptionSplit, block: int = 256) -> dict:
    ranks = retrieval_ranks(fitted.score(data, split.rows, split.texts), len(split.rows), split.caption_clip, block)
    return metrics_from_ranks(ranks)


def pair_batches(split: CaptionSplit, batch_size: int) -> Callable[[torch.Generator], list[tuple]]:
    """Per epoch: clips in a drawn order, one drawn caption each, in batches of ≥ 2 (a lone pair has no negative)."""
    captions = split.captions_of()

    def draw(generator: torch.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
        order = torch.randperm(len(split.rows), generator=generator).numpy()
        picks = torch.randint(0, 2**31 - 1, (len(order),), generator=generator).numpy()
        chosen = np.array([captions[i][p % len(captions[i])] for i, p in zip(order, picks, strict=True)])
        out = [(order[s : s + batch_size], chosen[s : s + batch_size]) for s in range(0, len(order), batch_size)]
        return [b for b in out if len(b[0]) > 1]

    return draw


def _run(name: str, params: dict, steps_for: Callable[[Steps], None] | None, data, train_split, val_split, fit: Fit,
         loss, score: ScoreFn, options: dict) -> Fitted:
    """Train `params` with `loss` on pair batches, selecting on validation mean R@1 by the one loop."""
    started = time.perf_counter()
    optimizer = _optimizer(fit, list(params.values()))
    fitted = Fitted(name, sum(p.numel() for p in params.values()), 0.0, score, options=options)

    def validate() -> float:
        return split_metrics(fitted, data, val_split)["mean_r1"]

    steps = Steps(params, pair_batches(train_split, fit.batch_size), loss, validate, optimizer)
    if steps_for is not None:
        steps_for(steps)
    if hasattr(optimizer, "eval"):  # schedule-free AdamW evaluates at its averaged weights
        module_mode = steps.mode

        def mode(training: bool) -> None:
            optimizer.train() if training else optimizer.eval()
            if module_mode is not None:
                module_mode(training)

        steps.mode = mode
    result = train(steps, fit.epochs, seed=fit.seed, patience=fit.patience, desc=f"retrieval/{name}",
                   metric="mean_r1", logger=fit.logger)
    fitted.best_epoch, fitted.start_score, fitted.history = result.best_epoch, result.start_score, result.history
    fitted.seconds = time.perf_counter() - started
    return fitted


def _optimizer(fit: Fit, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if fit.optimizer == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=fit.lr, weight_decay=fit.weight_decay)
    if fit.optimizer != "adamw":
        raise ValueError(f"optimizer must be 'adamw' or 'schedulefree', got {fit.optimizer!r}")
    return torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)


def residual_procedure(options: dict, fit: Fit) -> tuple[dict, Fit, str]:
    """A ResiDual configuration → (unit options, optimisation, label). `preset` names a procedure of
    `TrainConfig.PRESETS` ("paper": its unit variant and its schedule-free optimisation); other keys are
    `ResidualConfig` fields (granularity, stages, kinds, k, evr, coarse, ...)."""
    options = dict(options)
    preset = options.pop("preset", "default")
    if preset == "default":
        return options, fit, ResidualConfig(**options).label
    config = TrainConfig.preset(preset, **options)
    unit = {f.name: getattr(config, f.name) for f in dataclasses.fields(ResidualConfig)}
    fit = dataclasses.replace(fit, lr=config.lr, weight_decay=config.weight_decay, batch_size=config.batch_size,
                              epochs=config.epochs, patience=config.patience, optimizer=config.optimizer)
    return unit, fit, config.variant


def fit_residual_stats(data: RetrievalData, train_split: CaptionSplit) -> ResidualStatistics:
    """PCA moments of the training clips' units (the bases ResiDual's λ act on)."""
    bundle = data.bundle
    return ResidualStatistics.fit(bundle.model, data.features.input_features, train_split.rows,
                                  batch_size=data.batch_size, autocast=bundle.autocast, device=bundle.device,
                                  is_longer=data.features.is_longer)


def _inputs(data: RetrievalData, rows: np.ndarray):
    f = data.features
    return model_inputs(f.input_features, rows, data.bundle.device, f.is_longer)


def _audio_scale(data: RetrievalData) -> float:
    return float(data.bundle.model.logit_scale_a.exp())


class TextCache:
    """Frozen text embeddings, computed once per list of texts."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.cache = encoder, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        key = tuple(texts)
        if key not in self.cache:
            self.cache[key] = self.encoder.embed(list(texts))
        return self.cache[key]


def zero_shot(data: RetrievalData, text: TextCache | None = None) -> Fitted:
    text = text or TextCache(data.text_encoder())

    def score(source, rows, texts):
        return dot_scorer(source.audio_embeddings(rows), text(texts))

    return Fitted("zero-shot", 0, 0.0, score)


def fit_residual(data: RetrievalData, train_split: CaptionSplit, val_split: CaptionSplit, fit: Fit = Fit(),
                 stats: ResidualStatistics | None = None, text: TextCache | None = None, **residual_options) -> Fitted:
    """λ trained with the symmetric contrastive loss on audio-caption pairs, text tower frozen."""
    text = text or TextCache(data.text_encoder())
    bundle = data.bundle
    stats = stats or fit_residual_stats(data, train_split)
    unit, fit, label = residual_procedure(residual_options, fit)
    residual = build_residual(stats, **unit).to(bundle.device)
    train_text, scale = text(train_split.texts).to(bundle.device), _audio_scale(data)

    def loss(batch):
        positions, captions = batch
        x, longer = _inputs(data, train_split.rows[positions])
        with bundle.autocast(), residual.attached(bundle.model):
            audio = audio_embeddings(bundle.model, x, longer)
        return pair_infonce(audio.float(), train_text[captions], scale)

    def score(source, rows, texts):
        return dot_scorer(source.audio_embeddings(rows, residual=residual), text(texts))

    params = {f"lambda.{k}": p for k, p in residual.lambdas.items()}
    options = {**residual_options, "label": label}
    fitted = _run("residual", params, None, data, train_split, val_split, fit, loss, score, options)
    fitted.module = residual
    return fitted


def _features(data: RetrievalData, rows: np.ndarray, source: str) -> torch.Tensor:
    if source == "embedding":
        return data.audio_embeddings(rows)
    if source == "pooled":
        return data.pooled_outputs(rows)
    raise ValueError(f"projection source must be 'embedding' or 'pooled', got {source!r}")


def fit_projection(data: RetrievalData, train_split: CaptionSplit, val_split: CaptionSplit, fit: Fit = Fit(),
                   encoder: TextEncoder | None = None, source: str = "embedding",
                   learn_temperature: bool = False) -> Fitted:
    """A linear map from frozen audio features into a frozen text encoder's space (CLAP's own by default)."""
    own = encoder is None
    text = TextCache(encoder or data.text_encoder())
    train_audio = _features(data, train_split.rows, source)
    train_text = text(train_split.texts)
    identity = own and source == "embedding"
    torch.manual_seed(fit.seed)
    proj = LinearProjection(train_audio.shape[1], train_text.shape[1], logit_scale=_audio_scale(data),
                            learn_temperature=learn_temperature, identity=identity)

    def loss(batch):
        positions, captions = batch
        return pair_infonce(proj(train_audio[positions]), train_text[captions], proj.scale)

    def score(source_data, rows, texts):
        with torch.no_grad():
            return dot_scorer(proj(_features(source_data, rows, source)), text(texts))

    params = {n: p for n, p in proj.named_parameters() if p.requires_grad}
    options = {"source": source, "text_model": text.encoder.name if not own else "clap",
               "learn_temperature": learn_temperature}
    fitted = _run("projection", params, None, data, train_split, val_split, fit, loss, score, options)
    fitted.module = proj
    return fitted


def fit_tap(data: RetrievalData, train_split: CaptionSplit, val_split: CaptionSplit, fit: Fit = Fit(),
            attn_dim: int = 64, text: TextCache | None = None) -> Fitted:
    """TAP over the frozen encoder's frame tokens (in the joint space), trained contrastively."""
    text = text or TextCache(data.text_encoder())
    tokens, train_text = data.frame_tokens(train_split.rows), text(train_split.texts)
    torch.manual_seed(fit.seed)
    tap = TextAwarePooling(tokens.shape[-1], attn_dim=attn_dim, logit_scale=_audio_scale(data))
    token_cache: dict[bytes, torch.Tensor] = {}

    def loss(batch):
        positions, captions = batch
        index = torch.arange(len(positions))
        return symmetric_infonce(tap(tokens[positions], train_text[captions]), index, index)

    def score(source, rows, texts):
        key = np.asarray(rows).tobytes() + str(id(source)).encode()
        if key not in token_cache:
            token_cache[key] = source.frame_tokens(rows)
        return tap.scorer(token_cache[key], text(texts))

    params = {n: p for n, p in tap.named_parameters()}
    fitted = _run("tap", params, None, data, train_split, val_split, fit, loss, score, {"attn_dim": attn_dim})
    fitted.module = tap
    return fitted


class AudioTower(nn.Module):
    """An audio tower and projection (LoRA-wrapped or a trainable copy) that embeds like CLAP's."""

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module):
        super().__init__()
        self.audio_model, self.audio_projection = audio_model, audio_projection


def _fit_tower(name: str, tower: AudioTower, data: RetrievalData, train_split, val_split, fit: Fit,
               text: TextCache, options: dict) -> Fitted:
    bundle = data.bundle
    tower = tower.to(bundle.device)
    train_text, scale = text(train_split.texts).to(bundle.device), _audio_scale(data)

    def loss(batch):
        positions, captions = batch
        x, longer = _inputs(data, train_split.rows[positions])
        with bundle.autocast():
            audio = audio_embeddings(tower, x, longer)
        return pair_infonce(audio.float(), train_text[captions], scale)

    def score(source, rows, texts):
        return dot_scorer(source.audio_embeddings(rows, model=tower), text(texts))

    def mode(training: bool) -> None:
        """Train mode, but BatchNorm keeps its pretrained running statistics: they are buffers, which the
        loop's epoch selection does not restore, and small batches would corrupt them."""
        tower.train(training)
        for module in tower.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    params = {n: p for n, p in tower.named_parameters() if p.requires_grad}

    def with_mode(steps: Steps) -> None:
        steps.mode = mode

    fitted = _run(name, params, with_mode, data, train_split, val_split, fit, loss, score, options)
    tower.eval()
    fitted.module = tower
    return fitted


def fit_lora(data: RetrievalData, train_split, val_split, fit: Fit = Fit(), rank: int = 8,
             target_modules: Sequence[str] = ("query", "value"), alpha: float = 16.0,
             text: TextCache | None = None) -> Fitted:
    """LoRA (peft) on the audio tower's attention projections, B = 0 at the start (= zero-shot)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    torch.manual_seed(fit.seed)
    audio = get_peft_model(copy.deepcopy(data.bundle.model.audio_model), config)
    projection = copy.deepcopy(data.bundle.model.audio_projection).requires_grad_(False)
    options = {"rank": rank, "target_modules": list(target_modules), "alpha": alpha}
    return _fit_tower("lora", AudioTower(audio, projection), data, train_split, val_split, fit,
                      text or TextCache(data.text_encoder()), options)
