"""LoRA (Hu et al., ICLR 2022) on the attention projections of CLAP's HTSAT audio encoder, through `peft`.

Every Swin block's `attention.self.query` / `.value` Linear (optionally `.key`) gets a trainable low-rank
update W + (α/r)·B A; the base weights stay frozen. The head is CLAP's own zero-shot classifier (frozen
class text embeddings × logit scale), and LoRA's B starts at zero, so training starts exactly at zero-shot
CLAP. The rank is chosen on the validation split from a small set, each rank trained with early stopping
on validation. The shared bundle is never touched: the audio tower and projection are deep-copied first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from audio_residual.baselines.finetune import classifier_logits, classifier_steps
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.training.loop import train

DEFAULT_RANKS = (4, 16)
ATTENTION_PROJECTIONS = ("query", "value")  # LoRA's original choice, W_q and W_v


class LoraAudioClassifier(nn.Module):
    """peft-wrapped audio tower + frozen projection + frozen zero-shot head: logits = s · cos(audio, class)."""

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module, zero_shot: ZeroShotClassifier):
        super().__init__()
        self.audio_model = audio_model
        self.audio_projection = audio_projection
        self.register_buffer("class_embeddings", zero_shot.class_embeddings.detach().float().clone())
        self.logit_scale = zero_shot.logit_scale

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit_scale * audio_embeddings(self, input_features, is_longer) @ self.class_embeddings.T


@dataclass
class LoraTuned:
    """The chosen rank's classifier, peft's trainable-parameter count and the validation record."""

    model: LoraAudioClassifier
    bundle: ClapBundle
    rank: int
    trainable_params: int
    val_accuracy: float | None = None
    val_accuracies: dict[int, float] = field(default_factory=dict)  # rank → best validation accuracy
    losses: list[float] = field(default_factory=list)

    @property
    def num_parameters(self) -> int:
        return self.trainable_params

    def logits(self, input_features, indices, is_longer=None, batch_size: int = 32) -> torch.Tensor:
        """Logits of the selected rows of a (memory-mapped) feature array, on the CPU."""
        n_classes = self.model.class_embeddings.shape[0]
        return classifier_logits(self.model, self.bundle, input_features, indices, is_longer, batch_size, n_classes)


def lora_audio_model(
    audio_model: nn.Module, rank: int, target_modules: Sequence[str], lora_alpha: float, dropout: float
) -> nn.Module:
    """A deep copy of the audio tower with LoRA adapters on the named attention projections (peft)."""
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=dropout)
    return get_peft_model(copy.deepcopy(audio_model), config)


def _train_rank(
    bundle, input_features, is_longer, labels, train_indices, val_indices, zero_shot, rank, target_modules,
    lora_alpha, dropout, epochs, lr, weight_decay, batch_size, seed,
) -> LoraTuned:  # fmt: skip
    """One rank: AdamW on the LoRA weights, the epoch chosen by the training loop (epoch 0 = zero-shot)."""
    with torch.random.fork_rng(devices=[]):  # LoRA's A is drawn from `seed`, the global stream untouched
        torch.manual_seed(seed)
        audio = lora_audio_model(bundle.model.audio_model, rank, target_modules, lora_alpha, dropout)
    model = LoraAudioClassifier(audio, copy.deepcopy(bundle.model.audio_projection), zero_shot).to(bundle.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result = LoraTuned(model, bundle, rank, audio.get_nb_trainable_parameters()[0])
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    steps = classifier_steps(model, bundle, input_features, is_longer, labels, train_indices, val_indices, batch_size,
                             optimizer, result.losses)  # fmt: skip
    result.val_accuracy = train(steps, epochs, seed, desc=f"LoRA r={rank}", metric="accuracy").best_score
    model.eval().requires_grad_(False)
    return result


def train_lora(
    bundle: ClapBundle,
    input_features,
    is_longer,
    labels,
    train_indices,
    zero_shot: ZeroShotClassifier,
    val_indices=None,
    ranks: int | Sequence[int] = DEFAULT_RANKS,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    lora_alpha: float = 8.0,
    dropout: float = 0.0,
    epochs: int = 5,
    lr: float = 5e-4,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
) -> LoraTuned:
    """LoRA on the audio encoder's attention projections, the rank chosen by validation accuracy (ties: the earlier rank).

    `labels` indexes like `input_features` (the whole table). `lora_alpha` is fixed across ranks, as
    Hu et al. do, so the update scale α/r shrinks with the rank. Without a validation split the first
    rank is trained for all epochs.
    """
    labels, train_indices = np.asarray(labels), np.asarray(train_indices)
    ranks = [int(ranks)] if np.isscalar(ranks) else [int(r) for r in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"LoRA ranks must be positive integers, got {ranks}")
    has_val = val_indices is not None and len(val_indices) > 0
    best, accuracies = None, {}
    for rank in ranks if has_val else ranks[:1]:
        tuned = _train_rank(
            bundle, input_features, is_longer, labels, train_indices, val_indices, zero_shot, rank,
            target_modules, lora_alpha, dropout, epochs, lr, weight_decay, batch_size, seed,
        )  # fmt: skip
        if tuned.val_accuracy is not None:
            accuracies[rank] = tuned.val_accuracy
        if best is None or (has_val and tuned.val_accuracy > best.val_accuracy):  # ties: the earlier rank
            best = tuned
        if bundle.device.type == "cuda":
            torch.cuda.empty_cache()
    best.val_accuracies = accuracies
    return best
