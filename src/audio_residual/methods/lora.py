"""LoRA on the audio encoder's attention projections (peft), CLAP's zero-shot head frozen."""

from __future__ import annotations

from audio_residual.baselines.lora import train_lora
from audio_residual.methods.base import Method, register


@register
class Lora(Method):
    name = "lora"
    uses_embeddings = False

    def fit(self, ctx):
        features, ws = ctx.ws.features, ctx.ws
        return train_lora(ws.bundle, features.input_features, features.is_longer, ws.table.labels, ctx.split.train,
                          ws.classifier, ctx.split.val, **{"seed": ctx.seed, **ctx.options})  # fmt: skip

    def scores(self, model, ctx, rows):
        features = ctx.ws.features
        return model.logits(features.input_features, rows, features.is_longer)
