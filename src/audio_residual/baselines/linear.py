"""A cheap baseline on frozen, cached CLAP audio embeddings: a contrastive linear adapter.

It trains on the CPU in seconds from the (n, D) L2-normalised embeddings that `Workspace.embed` returns,
so every fold reuses one embedding pass. Hyper-parameters are chosen on the validation split only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from audio_residual.io import atomic_path


def _as_float(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().cpu()


def _as_labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).long().cpu()


def _has_validation(val_emb, val_labels) -> bool:
    return val_emb is not None and val_labels is not None and len(val_labels) > 0


def _validation_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -cross-entropy): larger is better; the loss breaks accuracy ties on small val sets."""
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return accuracy, -float(F.cross_entropy(logits, labels))


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
        emb = _as_float(emb)
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


def symmetric_infonce(
    audio: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: float
) -> torch.Tensor:
    """CLIP's symmetric loss between adapted audio and the class text embedding of each clip's label.

    Clips of the same class share one text embedding, so every same-label pair is a positive (targets
    spread evenly over them) instead of being pushed apart as CLIP's one-positive diagonal would do.
    """
    logits = scale * audio @ text.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    audio_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_audio = -(targets * logits.log_softmax(0)).sum(0).mean()
    return (audio_to_text + text_to_audio) / 2


def train_contrastive_adapter(
    train_emb,
    train_labels,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    val_emb=None,
    val_labels=None,
    epochs: int = 50,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> ContrastiveAdapter:
    """Train the identity-initialised adapter with symmetric InfoNCE, mini-batch AdamW, on the CPU.

    With a validation split the returned weights are those of the best epoch (epoch 0 = zero-shot
    included), so the adapter is never worse than zero-shot on validation.
    """
    x, y = _as_float(train_emb), _as_labels(train_labels)
    torch.manual_seed(seed)
    adapter = ContrastiveAdapter(class_embeddings, logit_scale)
    if epochs <= 0 or len(y) == 0:
        return adapter
    optimizer = torch.optim.AdamW([adapter.delta, adapter.bias], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    val = (_as_float(val_emb), _as_labels(val_labels)) if _has_validation(val_emb, val_labels) else None
    best_state = {k: v.clone() for k, v in adapter.state_dict().items()}
    best_score = _validation_score(adapter.logits(val[0]), val[1]) if val is not None else None
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            labels = y[batch]
            loss = symmetric_infonce(
                adapter.adapt(x[batch]), adapter.class_embeddings[labels], labels, adapter.logit_scale
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if val is not None:
            score = _validation_score(adapter.logits(val[0]), val[1])
            if score > best_score:
                best_score = score
                best_state = {k: v.clone() for k, v in adapter.state_dict().items()}
    if val is not None:
        adapter.load_state_dict(best_state)
    return adapter
