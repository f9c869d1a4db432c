"""CLIP's linear probe: logistic regression on frozen embeddings, C chosen on validation."""

from __future__ import annotations

from audio_residual.baselines.probe import train_logistic_probe
from audio_residual.methods.base import Method, register


@register
class LinearProbe(Method):
    name = "linear_probe"
    by_default = True

    def fit(self, ctx):
        train, val = ctx.split.train, ctx.split.val
        return train_logistic_probe(ctx.embed(train), ctx.labels(train), len(ctx.ws.table.class_names), ctx.embed(val),
                                    ctx.labels(val), seed=ctx.seed, **ctx.options)  # fmt: skip
