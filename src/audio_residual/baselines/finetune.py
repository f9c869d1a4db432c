"""Full fine-tuning of CLAP's audio encoder and audio projection with a linear head: the expensive upper baseline.

Meant for a GPU (AMP through `bundle.autocast()`); it runs on the CPU too, slowly, which the tests use on
the tiny model. The shared frozen bundle is never touched: the audio tower is deep-copied first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audio_residual.clap.batches import batches
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.training.loop import Steps, train


class AudioClassifier(nn.Module):
    """A trainable copy of the audio encoder + projection, followed by a linear head on normalised embeddings."""

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module, n_classes: int, dim: int):
        super().__init__()
        self.audio_model = audio_model
        self.audio_projection = audio_projection
        self.head = nn.Linear(dim, n_classes)

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(audio_embeddings(self, input_features, is_longer))


@dataclass
class FineTuned:
    """The trained classifier, its trainable-parameter count and the per-step training losses."""

    model: AudioClassifier
    bundle: ClapBundle
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    val_accuracy: float | None = None

    def logits(self, input_features, indices, is_longer=None, batch_size: int = 32) -> torch.Tensor:
        """Logits of the selected rows of a (memory-mapped) feature array, on the CPU."""
        return classifier_logits(
            self.model, self.bundle, input_features, indices, is_longer, batch_size, self.model.head.out_features
        )


def _train_mode(model: AudioClassifier) -> None:
    """Train mode, but BatchNorm keeps its pretrained running statistics (small batches would corrupt them)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def classifier_logits(
    model: nn.Module, bundle: ClapBundle, input_features, indices, is_longer, batch_size: int, n_classes: int
) -> torch.Tensor:
    """Eval-mode logits of an audio classifier (fine-tuned or LoRA) on the selected rows, on the CPU."""
    model.eval()
    out = []
    for _, x, longer in batches(input_features, indices, batch_size, bundle.device, is_longer):
        with bundle.autocast():
            out.append(model(x, longer).float().cpu())
    return torch.cat(out) if out else torch.empty(0, n_classes)


def classifier_steps(
    model: nn.Module, bundle: ClapBundle, input_features, is_longer, labels: np.ndarray, train_indices, val_indices,
    batch_size: int, optimizer, losses: list[float],
) -> Steps:  # fmt: skip
    """The training loop's side of an audio classifier (fine-tuning, LoRA): cross-entropy under the bundle's
    autocast (loss scaled for fp16), validation accuracy; `losses` collects the step losses."""
    scaler = torch.amp.GradScaler("cuda", enabled=bundle.amp_dtype == torch.float16 and bundle.device.type == "cuda")

    def loss(batch) -> torch.Tensor:
        rows, x, longer = batch
        with bundle.autocast():
            logits = model(x, longer)
        value = F.cross_entropy(logits.float(), torch.from_numpy(labels[rows]).to(bundle.device))
        losses.append(float(value.detach()))
        return value

    def validate() -> float:
        logits = classifier_logits(model, bundle, input_features, val_indices, is_longer, batch_size, 0)  # val ≠ ∅
        return float((logits.argmax(1).numpy() == labels[np.asarray(val_indices)]).mean())

    return Steps(
        params={name: p for name, p in model.named_parameters() if p.requires_grad},
        batches=lambda generator: batches(input_features, train_indices, batch_size, bundle.device, is_longer, generator),
        loss=loss,
        validate=validate if val_indices is not None and len(val_indices) > 0 else None,
        optimizer=optimizer,
        scaler=scaler,
        mode=lambda training: _train_mode(model) if training else model.eval(),
    )


def finetune_audio_encoder(
    bundle: ClapBundle,
    input_features,
    is_longer,
    labels,
    train_indices,
    n_classes: int,
    val_indices=None,
    zero_shot: ZeroShotClassifier | None = None,
    epochs: int = 5,
    lr: float = 1e-5,
    head_lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
) -> FineTuned:
    """Fine-tune a deep copy of the audio encoder + projection and a linear head with cross-entropy.

    `labels` indexes like `input_features` (the whole table). With `zero_shot`, the head starts as the
    zero-shot classifier (weights = logit scale × class text embeddings), so training starts from CLAP's
    own predictions; otherwise it is random. The encoder gets a small learning rate, the head a larger
    one. With validation indices, the returned weights are those of the epoch the training loop selects
    (epoch 0, the zero-shot head, included).
    """
    labels = np.asarray(labels)
    train_indices = np.asarray(train_indices)
    source = bundle.model
    dim = source.audio_projection.linear2.out_features
    with torch.random.fork_rng(devices=[]):  # a random head is drawn from `seed`, the global stream untouched
        torch.manual_seed(seed)
        model = AudioClassifier(copy.deepcopy(source.audio_model), copy.deepcopy(source.audio_projection), n_classes, dim)
    model = model.to(bundle.device).requires_grad_(True)
    if zero_shot is not None:
        with torch.no_grad():
            model.head.weight.copy_(zero_shot.logit_scale * zero_shot.class_embeddings)
            model.head.bias.zero_()
    encoder_params = [*model.audio_model.parameters(), *model.audio_projection.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": lr}, {"params": model.head.parameters(), "lr": head_lr}],
        weight_decay=weight_decay,
    )
    result = FineTuned(model, bundle, sum(p.numel() for p in model.parameters() if p.requires_grad))
    steps = classifier_steps(model, bundle, input_features, is_longer, labels, train_indices, val_indices, batch_size,
                             optimizer, result.losses)  # fmt: skip
    result.val_accuracy = train(steps, epochs, seed, desc="fine-tuning", metric="accuracy").best_score
    model.eval().requires_grad_(False)
    return result
