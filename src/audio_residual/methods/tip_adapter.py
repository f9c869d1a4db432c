"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022) on frozen CLAP audio embeddings.

A key-value cache of the training set adds a few-shot term to CLAP's zero-shot logits:

    logits(f) = s · f Wᵀ  +  α · exp(-β (1 - f Kᵀ)) L

with f the L2-normalised audio embedding, W the class text embeddings, s CLAP's logit scale, K the
training embeddings (keys) and L their one-hot labels (values). α weighs the cache against zero-shot and
β sharpens the affinities. Tip-Adapter is training-free (K fixed, 0 trainable parameters); Tip-Adapter-F
trains K (N·D parameters) with cross-entropy. α and β are chosen on the validation split by grid search,
as the paper does; α = 0 is in the grid, so the chosen model is never below zero-shot on validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audio_residual.methods.base import (
    Method,
    accuracy,
    as_float,
    as_labels,
    keyword_defaults,
    option_defaults,
    register,
    validation_pair,
)
from audio_residual.training.loop import Steps, row_batches, train

DEFAULT_ALPHAS = (0.0, *(float(a) for a in np.geomspace(0.01, 100, 25)))
DEFAULT_BETAS = tuple(float(b) for b in np.geomspace(0.1, 50, 19))
PAPER_ALPHA, PAPER_BETA = 1.0, 5.5  # the paper's defaults, used when there is no validation split


class TipAdapter(nn.Module):
    """The cache model; `keys` is a parameter that only Tip-Adapter-F trains."""

    def __init__(
        self,
        keys: torch.Tensor,
        labels: torch.Tensor,
        class_embeddings: torch.Tensor,
        logit_scale: float,
        alpha: float,
        beta: float,
        train_keys: bool = False,
    ):
        super().__init__()
        n_classes = class_embeddings.shape[0]
        self.keys = nn.Parameter(F.normalize(as_float(keys), dim=-1), requires_grad=train_keys)
        self.register_buffer("values", F.one_hot(as_labels(labels), n_classes).float())
        self.register_buffer("class_embeddings", class_embeddings.detach().float().cpu())
        self.logit_scale = float(logit_scale)
        self.alpha, self.beta = float(alpha), float(beta)
        self.best_epoch = 0
        self.val_accuracy: float | None = None

    def zero_shot_logits(self, emb: torch.Tensor) -> torch.Tensor:
        """The same expression as `ZeroShotClassifier.logits`, so α = 0 reproduces it bit for bit."""
        return self.logit_scale * emb @ self.class_embeddings.T

    def cache_affinity(self, emb: torch.Tensor, beta: float) -> torch.Tensor:
        """exp(-β (1 - f Kᵀ)) L: the cache's per-class evidence, (n, C)."""
        return torch.exp(-beta * (1 - emb @ self.keys.T)) @ self.values

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        emb = as_float(emb)
        return self.zero_shot_logits(emb) + self.alpha * self.cache_affinity(emb, self.beta)

    @torch.no_grad()
    def logits(self, emb) -> torch.Tensor:
        return self(emb)

    @property
    def num_parameters(self) -> int:
        """Trainable parameters: 0 for the training-free cache, N·D when the keys are fine-tuned."""
        return self.keys.numel() if self.keys.requires_grad else 0

    @property
    def cache_size(self) -> int:
        """Stored (not trained) numbers: keys N·D plus one-hot values N·C."""
        return self.keys.numel() + self.values.numel()


def _validation_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -cross-entropy): the α, β search's score; the loss breaks accuracy ties on small val sets."""
    return accuracy(logits, labels), -float(F.cross_entropy(logits, labels))


@torch.no_grad()
def _search(
    adapter: TipAdapter, val_emb: torch.Tensor, val_labels: torch.Tensor, alphas, betas
) -> tuple[float, float, tuple[float, float]]:
    """(α, β, score) with the best validation (accuracy, -loss); ties keep the earlier grid point."""
    zero_shot = adapter.zero_shot_logits(val_emb)
    best = None
    for beta in betas:
        cache = adapter.cache_affinity(val_emb, beta)
        for alpha in alphas:
            score = _validation_score(zero_shot + alpha * cache, val_labels)
            if best is None or score > best[2]:
                best = (float(alpha), float(beta), score)
    return best


def train_tip_adapter(
    train_emb,
    train_labels,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    val_emb=None,
    val_labels=None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
) -> TipAdapter:
    """Training-free Tip-Adapter: cache the training embeddings, choose α and β on validation only."""
    adapter = TipAdapter(train_emb, train_labels, class_embeddings, logit_scale, PAPER_ALPHA, PAPER_BETA)
    val = validation_pair(val_emb, val_labels)
    if val is not None:
        adapter.alpha, adapter.beta, score = _search(adapter, *val, alphas, betas)
        adapter.val_accuracy = score[0]
    return adapter


@dataclass(frozen=True)
class TipAdapterFOptions:
    alphas: Sequence[float] = DEFAULT_ALPHAS
    betas: Sequence[float] = DEFAULT_BETAS
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256


def train_tip_adapter_f(
    train_emb,
    train_labels,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    val_emb=None,
    val_labels=None,
    options: TipAdapterFOptions = TipAdapterFOptions(),
    seed: int = 0,
) -> TipAdapter:
    """Tip-Adapter-F: start from the training-free cache, fine-tune the keys with cross-entropy (AdamW,
    cosine schedule, as in the paper), keep the epoch the training loop selects (epoch 0 = the
    training-free cache included), then search α and β again on validation.

    Training runs at the α, β of the training-free search; when that search chose α = 0 (the keys would
    get no gradient), at the paper's α = 1, β = 5.5.
    """
    x, y = as_float(train_emb), as_labels(train_labels)
    alphas, betas, epochs, batch_size = options.alphas, options.betas, options.epochs, options.batch_size
    adapter = train_tip_adapter(x, y, class_embeddings, logit_scale, val_emb, val_labels, alphas, betas)
    adapter.keys.requires_grad_(True)
    if adapter.alpha == 0:
        adapter.alpha, adapter.beta = PAPER_ALPHA, PAPER_BETA
    val = validation_pair(val_emb, val_labels)
    if epochs <= 0 or len(y) == 0:
        return adapter
    optimizer = torch.optim.AdamW([adapter.keys], lr=options.lr, eps=1e-4)
    steps = Steps(
        params={"keys": adapter.keys},
        batches=row_batches(np.arange(len(y)), batch_size),
        loss=lambda batch: F.cross_entropy(adapter(x[batch]), y[batch]),
        validate=None if val is None else lambda: accuracy(adapter.logits(val[0]), val[1]),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(y) // batch_size)),
    )
    adapter.best_epoch = train(steps, epochs, seed, desc="Tip-Adapter-F", metric="accuracy").best_epoch
    if val is not None:
        adapter.alpha, adapter.beta, score = _search(adapter, *val, alphas, betas)
        adapter.val_accuracy = score[0]
    return adapter


def _cache_args(ctx):
    train, val, classifier = ctx.split.train, ctx.split.val, ctx.ws.classifier
    return (ctx.embed(train), ctx.labels(train), classifier.class_embeddings, classifier.logit_scale, ctx.embed(val),
            ctx.labels(val))  # fmt: skip


@register
class TipAdapterMethod(Method):
    name = "tip_adapter"
    by_default = ("classification",)
    defaults = keyword_defaults(train_tip_adapter)

    def fit(self, ctx):
        return train_tip_adapter(*_cache_args(ctx), **ctx.options)

    def scores(self, model, ctx, rows):
        return model.logits(ctx.embed(rows))


@register
class TipAdapterF(Method):
    name = "tip_adapter_f"
    by_default = ("classification",)
    defaults = option_defaults(TipAdapterFOptions)

    def fit(self, ctx):
        return train_tip_adapter_f(*_cache_args(ctx), TipAdapterFOptions(**ctx.options), seed=ctx.seed)

    def scores(self, model, ctx, rows):
        return model.logits(ctx.embed(rows))
