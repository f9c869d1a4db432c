"""CoOp: learned prompt context on CLAP's text tower, frozen audio embeddings."""

from __future__ import annotations

from audio_residual.baselines.prompt_learning import train_coop
from audio_residual.methods.base import Method, register


@register
class CoOpMethod(Method):
    name = "coop"

    def fit(self, ctx):
        train, val = ctx.split.train, ctx.split.val
        options = {"template": ctx.ws.templates[0], "seed": ctx.seed, **ctx.options}  # several templates: the first
        return train_coop(ctx.ws.bundle, ctx.ws.table.class_names, ctx.embed(train), ctx.labels(train), ctx.embed(val),
                          ctx.labels(val), **options)  # fmt: skip
