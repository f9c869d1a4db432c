"""Tip-Adapter (training-free cache) and Tip-Adapter-F (the cache's keys fine-tuned)."""

from __future__ import annotations

from audio_residual.baselines.tip_adapter import train_tip_adapter, train_tip_adapter_f
from audio_residual.methods.base import Method, register


def _cache_args(ctx):
    train, val, classifier = ctx.split.train, ctx.split.val, ctx.ws.classifier
    return (ctx.embed(train), ctx.labels(train), classifier.class_embeddings, classifier.logit_scale, ctx.embed(val),
            ctx.labels(val))  # fmt: skip


@register
class TipAdapter(Method):
    name = "tip_adapter"

    def fit(self, ctx):
        return train_tip_adapter(*_cache_args(ctx), **ctx.options)


@register
class TipAdapterF(Method):
    name = "tip_adapter_f"

    def fit(self, ctx):
        return train_tip_adapter_f(*_cache_args(ctx), **{"seed": ctx.seed, **ctx.options})
