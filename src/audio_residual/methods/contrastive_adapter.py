"""The contrastive adapter: an identity-initialised affine map of the audio embedding, symmetric InfoNCE."""

from __future__ import annotations

from audio_residual.baselines.contrastive_adapter import ContrastiveAdapter, train_contrastive_adapter
from audio_residual.methods.base import Method, register


@register
class ContrastiveAdapterMethod(Method):
    name = "contrastive_adapter"
    by_default = True
    transferable = True
    model_type = ContrastiveAdapter

    def fit(self, ctx):
        train, val, classifier = ctx.split.train, ctx.split.val, ctx.ws.classifier
        return train_contrastive_adapter(
            ctx.embed(train), ctx.labels(train), classifier.class_embeddings, classifier.logit_scale, ctx.embed(val),
            ctx.labels(val), **{"seed": ctx.seed, **ctx.options},
        )  # fmt: skip

    def save(self, model, path) -> None:
        model.save(path)

    def load(self, path):
        return ContrastiveAdapter.load(path)

    def transfer_scores(self, model, target, rows):
        """The map applied to the target's audio embeddings, scored against the target's class prompts."""
        classifier = target.classifier
        emb = model.adapt(target.embed(rows, desc="transfer embeddings"))
        return classifier.logit_scale * emb @ classifier.class_embeddings.cpu().T
