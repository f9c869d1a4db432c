"""A linear projection of frozen audio features into a frozen text encoder's space, trained contrastively
(retrieval).

The projection project's method: one affine map from the frozen audio embedding (or the pooled encoder
output before CLAP's own projection) into the space of any frozen text encoder, scored by cosine. When the
source is CLAP's joint embedding and the text side CLAP's own tower, the map starts at the identity, so
its untrained start is zero-shot; otherwise it starts at PyTorch's default init, near the random baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from audio_residual.clap.text_encoders import TextEncoder, load_text_encoder
from audio_residual.methods.base import Method, register, row_lookup, train_scored
from audio_residual.tasks import CLASSIFICATION, RETRIEVAL
from audio_residual.tasks.loss import pair_infonce
from audio_residual.tasks.retrieval import dot_scorer
from audio_residual.training.loop import LoopResult


class LinearProjection(nn.Module):
    """Audio features (n, in_dim) → unit vectors (n, out_dim); logits = scale · cos with the captions.

    The temperature starts at `logit_scale`; with `learn_temperature` it is trained (log-parameterised,
    clamped at 100 as in CLIP), else it stays fixed and adds no parameter.
    """

    def __init__(
        self, in_dim: int, out_dim: int, logit_scale: float = 1 / 0.07, learn_temperature: bool = False,
        identity: bool = False,
    ):
        super().__init__()
        self.map = nn.Linear(in_dim, out_dim)
        if identity:
            if in_dim != out_dim:
                raise ValueError(f"an identity start needs equal widths, got {in_dim} → {out_dim}")
            nn.init.eye_(self.map.weight)
            nn.init.zeros_(self.map.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learn_temperature)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.map(audio.float()), dim=-1)

    def logits(self, audio: torch.Tensor, text_unit: torch.Tensor) -> torch.Tensor:
        return self.scale * self(audio) @ text_unit.T

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


SOURCES = ("embedding", "pooled")


def audio_features(ws, rows, source: str) -> torch.Tensor:
    """The projection's input: CLAP's joint embedding, or the encoder's pooled output before CLAP's projection."""
    if source == "embedding":
        return ws.embeddings(rows)
    return ws.pooled_outputs(rows)


@dataclass
class Projected:
    """The trained map, its input, and its frozen text side (`encoder`; None: CLAP's own tower)."""

    projection: LinearProjection | None
    source: str
    encoder: TextEncoder | None = None
    result: LoopResult | None = None  # the loop's record: kept epoch, its validation score

    def text(self, ws, texts) -> torch.Tensor:
        return ws.text(texts) if self.encoder is None else self.encoder.embed(list(texts))

    @torch.no_grad()
    def embed(self, ws, rows) -> torch.Tensor:
        return self.projection(audio_features(ws, rows, self.source))


@register
class Projection(Method):
    name = "projection"
    tasks = ("retrieval",)
    by_default = ("retrieval",)
    transferable = True
    defaults = {"epochs": 5, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 32, "patience": None,
                "text_model": None, "source": "embedding", "learn_temperature": False}

    def check(self, options, ws) -> None:
        if options["source"] not in SOURCES:
            raise ValueError(f"projection source must be one of {SOURCES}, got {options['source']!r}")
        if options["text_model"] is not None:
            load_text_encoder(options["text_model"], "cpu")  # a model that is not a text encoder stops the run now

    def fit(self, ctx) -> Projected:
        ws, split, options = ctx.ws, ctx.split, ctx.options
        encoder = None if options["text_model"] is None else load_text_encoder(options["text_model"], ws.bundle.device)
        model = Projected(None, options["source"], encoder)
        train_audio = row_lookup(split.train, audio_features(ws, split.train, model.source))
        val_audio = audio_features(ws, split.val, model.source)
        train_text = model.text(ws, RETRIEVAL.texts(ws, split.train))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            model.projection = LinearProjection(
                val_audio.shape[1], train_text.shape[1], logit_scale=float(ws.bundle.model.logit_scale_a.exp()),
                learn_temperature=options["learn_temperature"], identity=encoder is None and model.source == "embedding")
        proj = model.projection

        def loss(batch):
            return pair_infonce(proj(train_audio(batch.rows)), train_text[torch.as_tensor(batch.targets)], proj.scale)

        def val_scores(rows):  # the validation clips, their features computed once
            with torch.no_grad():
                return dot_scorer(proj(val_audio), model.text(ws, RETRIEVAL.texts(ws, rows)))

        params = {n: p for n, p in proj.named_parameters() if p.requires_grad}
        model.result = train_scored(ctx, params, loss, val_scores, "retrieval/projection")
        return model

    def embed(self, model: Projected, ws, rows):
        return model.embed(ws, rows)

    def scores(self, model: Projected, ctx, rows):
        return dot_scorer(model.embed(ctx.ws, rows), model.text(ctx.ws, RETRIEVAL.texts(ctx.ws, rows)))

    def transfer_scores(self, model: Projected, target, rows):
        """The projected audio against the class prompts in the projection's text space (templates averaged)."""
        prompts = CLASSIFICATION.texts(target, rows)
        n = len(target.table.class_names)
        classes = F.normalize(model.text(target, prompts).reshape(-1, n, model.projection.map.out_features).mean(0),
                              dim=-1)
        return CLASSIFICATION.scores(target, model.embed(target, rows), rows, classes)

    def trainable_params(self, model: Projected) -> int:
        return model.projection.num_parameters

    def details(self, model: Projected) -> dict:
        return {"best_epoch": model.result.best_epoch, "val_score": model.result.best_score}
