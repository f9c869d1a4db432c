"""Text-aware attention pooling (TAP; Xin, Yang, Zou, ICASSP 2023, arXiv 2303.05681) over frozen frame tokens
(retrieval).

CLAP pools HTSAT's final tokens by their mean, whatever the caption. TAP lets the caption choose: a
scaled dot-product attention whose query comes from the caption embedding and whose keys and values come
from the clip's frame tokens (here already in the joint space: each token through CLAP's frozen audio
projection), then an output map; the pooled vector is scored against the caption by cosine. So every
(clip, caption) pair has its own audio embedding, and retrieval must score pairs, not a dot product.

As in TAP, the query and key inputs pass layer norms. The value path stays linear (W_V, W_O initialised
to the identity) and the query map starts at zero, so attention starts uniform: the untrained start is
exactly the mean of the tokens, the text-agnostic pooling TAP replaces. Because pooling is linear in the values, a pair's
score needs only per-clip precomputations: u_i = W_O(W_V x_i + b_V) + b_O, the Gram matrix U Uᵀ and the
keys. Then cos(Σ α_i u_i, t) = Σ α_i ⟨u_i, t̂⟩ / sqrt(αᵀ U Uᵀ α): O(L·(d_k + D) + L²) per pair in batched
matrix products, never an (L, D) pooled tensor per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from audio_residual.methods.base import Method, register, row_lookup, train_scored
from audio_residual.tasks import CLASSIFICATION, RETRIEVAL
from audio_residual.tasks.loss import symmetric_infonce
from audio_residual.tasks.retrieval import Scorer
from audio_residual.training.loop import LoopResult


@dataclass(frozen=True)
class TapAudio:
    """Per-clip precomputations, frames flattened clip-major and stored transposed so that every score
    product is a plain GEMM with a contiguous right operand: keys (d_k, n·L), output-mapped values
    (D, n·L), and the values' Gram matrix per clip (n, L, L)."""

    keys_t: torch.Tensor
    values_t: torch.Tensor
    gram: torch.Tensor

    @property
    def frames(self) -> int:
        return self.gram.shape[-1]

    def __getitem__(self, clips: slice) -> TapAudio:
        """The clips `clips` (a slice with step 1): column views, no copy."""
        start, stop, _ = clips.indices(self.gram.shape[0])
        cols = slice(start * self.frames, stop * self.frames)
        return TapAudio(self.keys_t[:, cols], self.values_t[:, cols], self.gram[start:stop])

    def values(self) -> torch.Tensor:
        """(n, L, D) the output-mapped values."""
        return self.values_t.T.reshape(self.gram.shape[0], self.frames, -1)


@dataclass(frozen=True)
class TapText:
    """Per-caption precomputations: queries (m, d_k), unit caption embeddings (m, D)."""

    queries: torch.Tensor
    unit: torch.Tensor


class TextAwarePooling(nn.Module):
    """TAP for tokens and captions of width `dim`, attention width `attn_dim`, a learned logit scale."""

    def __init__(self, dim: int, attn_dim: int = 64, logit_scale: float = 1 / 0.07):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_key = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, attn_dim)
        self.key = nn.Linear(dim, attn_dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        for linear in (self.value, self.out):
            nn.init.eye_(linear.weight)
            nn.init.zeros_(linear.bias)
        # A zero query map: every attention logit is 0 at the start, so attention is uniform and TAP starts
        # exactly at mean pooling. The keys keep their random init, so the query map's gradient is not zero.
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))

    @property
    def scale(self) -> torch.Tensor:
        """exp(log scale), clamped at 100 as CLIP clamps its temperature."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def prepare_audio(self, tokens: torch.Tensor) -> TapAudio:
        """`tokens` (n, L, dim): one clip's frame tokens per row."""
        n, length, dim = tokens.shape
        flat_t = tokens.reshape(n * length, dim).T
        # W_O(W_V x + b_V) + b_O as one map, computed straight into the transposed layout.
        weight = self.out.weight @ self.value.weight
        bias = self.out.weight @ self.value.bias + self.out.bias
        values_t = torch.addmm(bias[:, None], weight, flat_t)  # (D, n·L)
        keys_t = self.key(self.norm_key(tokens)).reshape(n * length, -1).T.contiguous()
        per_clip = values_t.T.reshape(n, length, dim)
        return TapAudio(keys_t, values_t, per_clip @ per_clip.transpose(1, 2))

    def prepare_text(self, text: torch.Tensor) -> TapText:
        """Queries carry the 1/sqrt(d_k) of scaled dot-product attention."""
        queries = self.query(self.norm_query(text)) / math.sqrt(self.query.out_features)
        return TapText(queries, F.normalize(text, dim=-1))

    @staticmethod
    def _logits(audio: TapAudio, text: TapText) -> torch.Tensor:
        """(m, n, L) attention logits of every caption over every clip's frames: one GEMM."""
        return (text.queries @ audio.keys_t).view(text.queries.shape[0], -1, audio.frames)

    def attention(self, audio: TapAudio, text: TapText) -> torch.Tensor:
        """(n, m, L): caption j's attention over clip i's frames."""
        return self._logits(audio, text).softmax(-1).transpose(0, 1)

    def cosine(self, audio: TapAudio, text: TapText) -> torch.Tensor:
        """(n, m) cosine of every clip's caption-pooled embedding with every caption.

        The weights stay unnormalised (exp(logit − max)): a cosine ignores the scale of Σ α_i u_i, so the
        softmax's division cancels. Logits and frame similarities are each one GEMM over all (clip, frame)
        rows, in the (m, n, L) layout with the frames innermost. Without autograd (scoring) the elementwise
        passes run in place; with it they keep the tensors backward needs. Same values either way.
        """
        in_place = not torch.is_grad_enabled()
        logits = self._logits(audio, text)
        shift = logits.detach().amax(-1, keepdim=True)
        weights = logits.sub_(shift).exp_() if in_place else (logits - shift).exp()
        along = (text.unit @ audio.values_t).view(logits.shape)
        numerator = (along.mul_(weights) if in_place else along * weights).sum(-1)
        spread = torch.einsum("mnl,nlk->mnk", weights, audio.gram)  # U Uᵀ α per pair
        squared_norm = (spread.mul_(weights) if in_place else spread * weights).sum(-1)
        return (numerator / squared_norm.clamp_min(1e-30).sqrt()).T

    def forward(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, m) logits: scale · cos(TAP(tokens_i | text_j), text_j)."""
        return self.scale * self.cosine(self.prepare_audio(tokens), self.prepare_text(text))

    def pooled(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n, m, dim): the pooled audio embedding of every pair, explicitly (for tests and inspection)."""
        audio = self.prepare_audio(tokens)
        return self.attention(audio, self.prepare_text(text)) @ audio.values()

    @torch.no_grad()
    def scorer(self, tokens: torch.Tensor, text: torch.Tensor, chunk: int = 128) -> Scorer:
        """A retrieval `Scorer`: cosines of any (clips, captions) block, `chunk` clips at a time so a
        block's memory stays chunk × captions × L whatever the number of clips."""
        audio = self.prepare_audio(tokens)
        captions = self.prepare_text(text)

        def score(rows: slice, cols: slice) -> torch.Tensor:
            text_block = TapText(captions.queries[cols], captions.unit[cols])
            first, stop, _ = rows.indices(audio.gram.shape[0])
            return torch.cat([self.cosine(audio[slice(start, min(start + chunk, stop))], text_block)
                              for start in range(first, stop, chunk)])

        return score

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


@dataclass
class TapFitted:
    tap: TextAwarePooling
    result: LoopResult | None = None


@register
class Tap(Method):
    name = "tap"
    tasks = ("retrieval",)
    by_default = ("retrieval",)
    transferable = True
    defaults = {"epochs": 5, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 32, "patience": None, "attn_dim": 64}

    def fit(self, ctx) -> TapFitted:
        ws, split = ctx.ws, ctx.split
        tokens = row_lookup(split.train, ws.frame_tokens(split.train))
        val_tokens = ws.frame_tokens(split.val)
        train_text = ws.text(RETRIEVAL.texts(ws, split.train))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            tap = TextAwarePooling(val_tokens.shape[-1], attn_dim=ctx.options["attn_dim"],
                                   logit_scale=float(ws.bundle.model.logit_scale_a.exp()))

        def loss(batch):
            index = torch.arange(len(batch.rows))
            return symmetric_infonce(tap(tokens(batch.rows), train_text[torch.as_tensor(batch.targets)]), index, index)

        def val_scores(rows):  # the validation clips, their tokens computed once
            return tap.scorer(val_tokens, ws.text(RETRIEVAL.texts(ws, rows)))

        result = train_scored(ctx, dict(tap.named_parameters()), loss, val_scores, "retrieval/tap")
        return TapFitted(tap, result)

    def scores(self, model: TapFitted, ctx, rows):
        return model.tap.scorer(ctx.ws.frame_tokens(rows), ctx.ws.text(RETRIEVAL.texts(ctx.ws, rows)))

    @torch.no_grad()
    def transfer_scores(self, model: TapFitted, target, rows):
        """Every clip pooled per class prompt: cosines averaged over the templates, times CLAP's logit scale."""
        prompts = CLASSIFICATION.texts(target, rows)
        n = len(target.table.class_names)
        cosines = model.tap.scorer(target.frame_tokens(rows), target.text(prompts))(slice(0, len(rows)),
                                                                                     slice(0, len(prompts)))
        return target.classifier.logit_scale * cosines.reshape(len(rows), -1, n).mean(1)

    def trainable_params(self, model: TapFitted) -> int:
        return model.tap.num_parameters

    def details(self, model: TapFitted) -> dict:
        return {"best_epoch": model.result.best_epoch, "val_score": model.result.best_score}
