"""CoOp prompt learning (Zhou et al., IJCV 2022) for CLAP's RoBERTa text tower, on frozen audio embeddings.

The words of a class prompt before the label are replaced by learnable context vectors in the text
encoder's input-embedding space: [<s>] [V]_1 … [V]_M [label tokens] [. </s>]. The text tower, its
projection and the audio side stay frozen; only the vectors train, by cross-entropy on CLAP's logit-scaled
cosine between the cached audio embeddings and the class embeddings the prompts produce. The vectors are
shared by all classes (n_ctx × width parameters) or class-specific (× classes).

Initialised from the template's own words ("This is a sound of"), the learner starts exactly at the
zero-shot classifier of that template; with an explicit `n_ctx` they start at N(0, 0.02²) as in CoOp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audio_residual.clap.loading import ClapBundle
from audio_residual.clap.zeroshot import DEFAULT_TEMPLATES, class_prompts
from audio_residual.methods.base import (
    Method,
    accuracy,
    as_float,
    as_labels,
    option_defaults,
    register,
    validation_pair,
)
from audio_residual.training.loop import Steps, row_batches, train


def _within(suffix: list[int], room: int) -> list[int]:
    """A prompt's tokens after the context cut to `room`, its closing </s> kept (as the tokenizer truncates)."""
    return suffix if len(suffix) <= room else suffix[: room - 1] + suffix[-1:]


class PromptLearner(nn.Module):
    """Learnable context vectors plus the frozen token embeddings of the rest of every class prompt."""

    def __init__(
        self,
        bundle: ClapBundle,
        class_names: Sequence[str],
        template: str = DEFAULT_TEMPLATES[0],
        n_ctx: int | None = None,
        class_specific: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        if "{label}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{label}} placeholder")
        tokenizer, embeddings = bundle.tokenizer, bundle.model.text_model.embeddings
        prefix = template.split("{label}")[0].rstrip()
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
        length = bundle.text_length  # prompts are truncated as the zero-shot classifier's are
        prompts = tokenizer(class_prompts(class_names, template), truncation=True,
                            max_length=length.max_tokens)["input_ids"]
        for name, ids in zip(class_names, prompts, strict=True):
            if ids[1 : 1 + len(prefix_ids)] != prefix_ids:
                raise ValueError(f"class {name!r}: the prompt does not start with the tokens of {prefix!r}")
        if n_ctx is None and not prefix_ids:
            raise ValueError(f"template {template!r} has no words before {{label}}: pass n_ctx")
        if n_ctx is not None and n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
        room = length.max_tokens - 1 - (len(prefix_ids) if n_ctx is None else n_ctx)  # after <s> and the context
        if room < 2:
            raise ValueError(f"n_ctx={n_ctx} leaves no room for a label: {bundle.model_id} reads "
                             f"{length.max_tokens} tokens ({length.rule})")
        suffixes = [_within(ids[1 + len(prefix_ids) :], room) for ids in prompts]  # label tokens, '.', </s>
        width = max(len(s) for s in suffixes)
        pad = tokenizer.pad_token_id
        suffix_ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=bundle.device)
        self.padding_idx = embeddings.padding_idx
        word = embeddings.word_embeddings
        with torch.no_grad():
            self.register_buffer("bos", word(torch.tensor([prompts[0][0]], device=bundle.device)).float())
            self.register_buffer("suffix", word(suffix_ids).float())
            self.register_buffer("suffix_mask", (suffix_ids != pad).long())
            if n_ctx is None:
                ctx = word(torch.tensor(prefix_ids, device=bundle.device)).float()
            else:
                generator = torch.Generator().manual_seed(seed)
                ctx = 0.02 * torch.randn(n_ctx, word.embedding_dim, generator=generator).to(bundle.device)
        n_classes = len(class_names)
        self.ctx = nn.Parameter(ctx.expand(n_classes, -1, -1).clone() if class_specific else ctx.clone())
        self.class_specific = class_specific

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    @property
    def num_parameters(self) -> int:
        return self.ctx.numel()

    def forward(self, clap) -> torch.Tensor:
        """L2-normalised class embeddings (C, projection_dim) from the prompts, differentiable in ctx."""
        n_classes = self.suffix.shape[0]
        ctx = self.ctx if self.class_specific else self.ctx.expand(n_classes, -1, -1)
        embeds = torch.cat([self.bos.expand(n_classes, 1, -1), ctx, self.suffix], dim=1)
        head = torch.ones(n_classes, 1 + self.n_ctx, dtype=torch.long, device=embeds.device)
        mask = torch.cat([head, self.suffix_mask], dim=1)
        # RoBERTa numbers real tokens padding_idx+1, +2, … and gives pads padding_idx, as it does for
        # input_ids; from inputs_embeds alone it would number the pads too.
        position_ids = torch.cumsum(mask, dim=1) * mask + self.padding_idx
        pooled = clap.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids)
        return F.normalize(clap.text_projection(pooled.pooler_output).float(), dim=-1)


@dataclass
class CoOp:
    """Trained context vectors and the class embeddings they give; logits = scale · cos(audio, class)."""

    learner: PromptLearner
    class_embeddings: torch.Tensor  # (C, D) on the CPU, computed once after training
    logit_scale: float
    best_epoch: int = 0
    val_accuracy: float | None = None
    losses: list[float] = field(default_factory=list)

    @torch.no_grad()
    def logits(self, emb) -> torch.Tensor:
        return self.logit_scale * as_float(emb) @ self.class_embeddings.T

    @property
    def num_parameters(self) -> int:
        return self.learner.num_parameters


@torch.no_grad()
def _class_embeddings(learner: PromptLearner, bundle: ClapBundle) -> torch.Tensor:
    with bundle.autocast():
        return learner(bundle.model).float().cpu()


@dataclass(frozen=True)
class CoOpOptions:
    n_ctx: int | None = None  # context vectors; None: as many as the template's words before the label
    class_specific: bool = False
    epochs: int = 50
    lr: float = 2e-3
    weight_decay: float = 5e-4
    batch_size: int = 32


def train_coop(
    bundle: ClapBundle,
    class_names: Sequence[str],
    train_emb,
    train_labels,
    val_emb=None,
    val_labels=None,
    template: str = DEFAULT_TEMPLATES[0],
    options: CoOpOptions = CoOpOptions(),
    seed: int = 0,
) -> CoOp:
    """Train the context vectors on cached audio embeddings with CoOp's optimiser (SGD, momentum 0.9,
    cosine schedule); the text tower stays frozen. With a validation split the returned vectors are those
    of the epoch the training loop selects (epoch 0, the initial prompts, included).
    """
    x, y = as_float(train_emb), as_labels(train_labels)
    epochs, batch_size = options.epochs, options.batch_size
    learner = PromptLearner(bundle, class_names, template, options.n_ctx, options.class_specific, seed)
    scale = float(bundle.model.logit_scale_a.exp())
    result = CoOp(learner, _class_embeddings(learner, bundle), scale)
    if epochs <= 0 or len(y) == 0:
        return result
    val = validation_pair(val_emb, val_labels)

    def loss(batch) -> torch.Tensor:
        with bundle.autocast():
            text = learner(bundle.model)
        loss = F.cross_entropy(scale * x[batch].to(text.device) @ text.T, y[batch].to(text.device))
        result.losses.append(float(loss.detach()))
        return loss

    def validate() -> float:
        result.class_embeddings = _class_embeddings(learner, bundle)
        return accuracy(result.logits(val[0]), val[1])

    optimizer = torch.optim.SGD([learner.ctx], lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    steps = Steps(
        params={"ctx": learner.ctx},
        batches=row_batches(np.arange(len(y)), batch_size),
        loss=loss,
        validate=None if val is None else validate,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(y) // batch_size)),
    )
    loop = train(steps, epochs, seed, desc="CoOp", metric="accuracy")
    result.best_epoch, result.val_accuracy = loop.best_epoch, loop.best_score
    result.class_embeddings = _class_embeddings(learner, bundle)
    return result


@register
class CoOpMethod(Method):
    name = "coop"
    by_default = ("classification",)
    defaults = option_defaults(CoOpOptions)

    def fit(self, ctx):
        train, val = ctx.split.train, ctx.split.val
        return train_coop(ctx.ws.bundle, ctx.ws.table.class_names, ctx.embed(train), ctx.labels(train), ctx.embed(val),
                          ctx.labels(val), ctx.ws.templates[0], CoOpOptions(**ctx.options), seed=ctx.seed)  # fmt: skip

    def scores(self, model, ctx, rows):
        return model.logits(ctx.embed(rows))
