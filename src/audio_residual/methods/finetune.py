"""Full fine-tuning of the audio encoder and projection with a zero-shot-initialised linear head."""

from __future__ import annotations

from audio_residual.baselines.finetune import finetune_audio_encoder
from audio_residual.methods.base import Method, register


@register
class FineTune(Method):
    name = "finetune"
    uses_embeddings = False

    def fit(self, ctx):
        ws, features = ctx.ws, ctx.ws.features
        return finetune_audio_encoder(ws.bundle, features.input_features, features.is_longer, ws.table.labels,
                                      ctx.split.train, len(ws.table.class_names), ctx.split.val,
                                      zero_shot=ws.classifier, **{"seed": ctx.seed, **ctx.options})  # fmt: skip

    def scores(self, model, ctx, rows):
        features = ctx.ws.features
        return model.logits(features.input_features, rows, features.is_longer)

    def trainable_params(self, model) -> int:
        return model.trainable_params
