"""A cheap baseline on frozen, cached CLAP audio embeddings: a contrastive linear adapter.

It trains on the CPU in seconds from the (n, D) L2-normalised embeddings that `Workspace.embeddings`
returns, so every fold reuses one embedding pass. Hyper-parameters are chosen on the validation split only.
It keeps CLAP's text side, so its map also scores another dataset's classes zero-shot (transfer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from audio_residual.io import atomic_path
from audio_residual.methods.base import (
    Method,
    accuracy,
    as_float,
    as_labels,
    option_defaults,
    register,
    validation_pair,
)
from audio_residual.tasks.loss import symmetric_infonce
from audio_residual.training.loop import Steps, row_batches, train


class ContrastiveAdapter(nn.Module):
    """Audio embedding → text space by an affine map initialised at the identity; classes by cosine.

    W = I + Δ with Δ and the bias starting at zero, so before training the logits are exactly the
    zero-shot ones, and weight decay on Δ pulls the adapter back towards zero-shot rather than towards 0.
    The temperature is CLAP's own logit scale, frozen: the adapter adds no parameter beyond D·D + D.
    """

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float):
        super().__init__()
        dim = class_embeddings.shape[1]
        self.delta = nn.Parameter(torch.zeros(dim, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.detach().float().cpu(), dim=-1))
        self.logit_scale = float(logit_scale)

    def adapt(self, emb: torch.Tensor) -> torch.Tensor:
        emb = as_float(emb)
        return F.normalize(emb + emb @ self.delta.T + self.bias, dim=-1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.adapt(emb) @ self.class_embeddings.T

    @torch.no_grad()
    def logits(self, emb) -> torch.Tensor:
        return self(emb)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, path: str | Path) -> Path:
        """Map, class embeddings and logit scale in one safetensors file: zero-shot transfer reloads the map."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"logit_scale": json.dumps(self.logit_scale)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ContrastiveAdapter:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            logit_scale = json.loads(handle.metadata()["logit_scale"])
        adapter = cls(tensors["class_embeddings"], logit_scale)
        adapter.load_state_dict(tensors)
        return adapter


@dataclass(frozen=True)
class AdapterOptions:
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256


def train_contrastive_adapter(
    train_emb,
    train_labels,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    val_emb=None,
    val_labels=None,
    options: AdapterOptions = AdapterOptions(),
    seed: int = 0,
) -> ContrastiveAdapter:
    """Train the identity-initialised adapter with symmetric InfoNCE, mini-batch AdamW, on the CPU.

    With a validation split the returned weights are those of the epoch the training loop selects (epoch 0 =
    zero-shot included), so the adapter is never worse than zero-shot on validation.
    """
    x, y = as_float(train_emb), as_labels(train_labels)
    adapter = ContrastiveAdapter(class_embeddings, logit_scale)
    if options.epochs <= 0 or len(y) == 0:
        return adapter
    val = validation_pair(val_emb, val_labels)

    def loss(batch) -> torch.Tensor:
        """CLIP's loss between adapted audio and each clip's class prompt: clips of one class share their
        prompt, so every same-class pair is a positive."""
        labels = y[batch]
        logits = adapter.logit_scale * adapter.adapt(x[batch]) @ adapter.class_embeddings[labels].T
        return symmetric_infonce(logits, labels, labels)

    steps = Steps(
        params={"delta": adapter.delta, "bias": adapter.bias},
        batches=row_batches(np.arange(len(y)), options.batch_size),
        loss=loss,
        validate=None if val is None else lambda: accuracy(adapter.logits(val[0]), val[1]),
        optimizer=torch.optim.AdamW([adapter.delta, adapter.bias], lr=options.lr, weight_decay=options.weight_decay),
    )
    train(steps, options.epochs, seed, desc="contrastive adapter", metric="accuracy")
    return adapter


@register
class ContrastiveAdapterMethod(Method):
    name = "contrastive_adapter"
    by_default = ("classification",)
    transferable = True
    defaults = option_defaults(AdapterOptions)

    def fit(self, ctx):
        train, val, classifier = ctx.split.train, ctx.split.val, ctx.ws.classifier
        return train_contrastive_adapter(
            ctx.embed(train), ctx.labels(train), classifier.class_embeddings, classifier.logit_scale, ctx.embed(val),
            ctx.labels(val), AdapterOptions(**ctx.options), seed=ctx.seed,
        )  # fmt: skip

    def embed(self, model, ws, rows):
        """The map applied to the plain embeddings (of this dataset, or of a transfer target)."""
        return model.adapt(ws.embeddings(rows))

    def save(self, model, path) -> None:
        model.save(path)

    def load(self, path, ws):
        return ContrastiveAdapter.load(path)
