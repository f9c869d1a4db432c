"""The retrieval task's methods in the registry (`REGISTRIES["retrieval"]`), one class each.

A retrieval `Context` holds a `RetrievalData` (`ctx.ws`) and its official `RetrievalSplits` (`ctx.split`);
`ctx.options` carries the method's keyword arguments, the optimisation (`fit`, a `retrieval.methods.Fit`)
and the shared frozen-text cache (`text`). `fit` returns a `Fitted`; `scores` is a blockwise `Scorer` of
the given clips against their captions (the task evaluates it without a whole matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audio_residual.evaluation.retrieval import Scorer
from audio_residual.methods.base import Method, register
from audio_residual.retrieval import methods as fitters
from audio_residual.retrieval.data import CaptionSplit
from audio_residual.tasks.retrieval import RETRIEVAL


@dataclass(frozen=True)
class RetrievalSplits:
    """The official splits: fit on train, choose on validation, report on test."""

    train: CaptionSplit
    validation: CaptionSplit
    test: CaptionSplit

    @classmethod
    def of(cls, data) -> RetrievalSplits:
        return cls(*(data.split(name) for name in ("train", "validation", "test")))


class RetrievalMethod(Method):
    task = "retrieval"
    uses_embeddings = False

    def fit(self, ctx) -> fitters.Fitted:
        options = dict(ctx.options)
        fit, text = options.pop("fit", fitters.Fit(seed=ctx.seed)), options.pop("text", None)
        return self.fit_splits(ctx.ws, ctx.split.train, ctx.split.validation, fit, text, **options)

    def fit_splits(self, data, train, val, fit, text, **options) -> fitters.Fitted:
        raise NotImplementedError

    def scores(self, model: fitters.Fitted, ctx, rows: np.ndarray) -> Scorer:
        """The clips `rows` against all of their captions, as a blockwise scorer."""
        return model.score(ctx.ws, rows, RETRIEVAL.texts(ctx.ws, rows))

    def trainable_params(self, model: fitters.Fitted) -> int:
        return model.trainable_params


@register
class ZeroShot(RetrievalMethod):
    name = "zero-shot"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, **options):
        return fitters.zero_shot(data, text)


@register
class Residual(RetrievalMethod):
    """λ by symmetric InfoNCE; `grid`: ResiDual configurations, the best on validation kept (nested choice)."""

    name = "residual"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, grid=({"granularity": "head"},)):
        stats = fitters.fit_residual_stats(data, train)  # one PCA pass for every configuration
        fits = [fitters.fit_residual(data, train, val, fit, stats=stats, text=text, **options) for options in grid]
        return max(fits, key=lambda f: max([f.start_score, *(h["val_mean_r1"] for h in f.history)]))


@register
class ResidualPaper(Residual):
    """The paper preset (its unit variant and schedule-free optimisation): only when named."""

    name = "residual-paper"
    by_default = False

    def fit_splits(self, data, train, val, fit, text, grid=({"preset": "paper"},)):
        fitted = super().fit_splits(data, train, val, fit, text, grid)
        fitted.method = self.name
        return fitted


@register
class Projection(RetrievalMethod):
    name = "projection"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, encoder=None, source="embedding", learn_temperature=False):
        return fitters.fit_projection(data, train, val, fit, encoder=encoder, source=source,
                                      learn_temperature=learn_temperature)


@register
class Tap(RetrievalMethod):
    name = "tap"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, attn_dim=64):
        return fitters.fit_tap(data, train, val, fit, attn_dim=attn_dim, text=text)


@register
class Lora(RetrievalMethod):
    name = "lora"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, rank=8):
        return fitters.fit_lora(data, train, val, fit, rank=rank, text=text)


@register
class Finetune(RetrievalMethod):
    """`pretrain` continued from the study's checkpoint on the training split (text tower frozen by default)."""

    name = "finetune"
    by_default = True

    def fit_splits(self, data, train, val, fit, text, out, freeze="text"):
        from audio_residual.retrieval.finetune import fit_pretrain_finetune

        return fit_pretrain_finetune(data, fit, out, freeze=freeze)
