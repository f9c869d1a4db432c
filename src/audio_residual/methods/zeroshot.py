"""Zero-shot CLAP: cosine of the audio embedding and each text's (class prompt or caption), nothing trained."""

from __future__ import annotations

from audio_residual.methods.base import Method, register


@register
class ZeroShot(Method):
    name = "zeroshot"
    tasks = ("classification", "retrieval")
    by_default = ("classification", "retrieval")

    def fit(self, ctx):
        return None

    def embed(self, model, ws, rows):
        return ws.embeddings(rows)

    def trainable_params(self, model) -> int:
        return 0
