"""Zero-shot CLAP: cosine of the audio embedding and each class prompt's, nothing trained."""

from __future__ import annotations

from audio_residual.methods.base import Method, register


@register
class ZeroShot(Method):
    name = "zeroshot"
    by_default = True

    def fit(self, ctx):
        return ctx.ws.classifier

    def trainable_params(self, model) -> int:
        return 0
