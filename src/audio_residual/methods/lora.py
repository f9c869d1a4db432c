"""LoRA (Hu et al., ICLR 2022) on the attention projections of CLAP's HTSAT audio encoder, through `peft`, for
any task.

Every Swin block's `attention.self.query` / `.value` Linear (optionally `.key`) gets a trainable low-rank update
W + (α/r)·B A; the base weights stay frozen, and so do the audio projection and the text side. The tower embeds
like CLAP's, so the task scores it against its frozen text side (class prompts, captions) and trains it with its
own loss; B starts at zero, so training starts exactly at zero-shot CLAP. The rank is chosen on the validation
split from a small set, each rank trained with the loop's epoch selection. The shared bundle is never touched:
the audio tower and projection are deep-copied first.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from audio_residual.clap.encode import audio_embeddings
from audio_residual.data_processing import Split
from audio_residual.methods.base import Method, option_defaults, register, release_memory
from audio_residual.tasks import Task
from audio_residual.training.encoder import encoder_steps
from audio_residual.training.loop import train
from audio_residual.workspace import Workspace

DEFAULT_RANKS = (4, 16)
ATTENTION_PROJECTIONS = ("query", "value")  # LoRA's original choice, W_q and W_v


class AudioTower(nn.Module):
    """An audio tower and projection (LoRA-wrapped or a trainable copy) that embeds like CLAP's."""

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module):
        super().__init__()
        self.audio_model, self.audio_projection = audio_model, audio_projection

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        return audio_embeddings(self, input_features, is_longer)


def batchnorm_frozen_mode(module: nn.Module):
    """The loop's train/eval switch for a copied tower: train mode, but BatchNorm keeps its pretrained running
    statistics (buffers, which epoch selection does not restore, and which small batches would corrupt)."""

    def mode(training: bool) -> None:
        module.train(training)
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()

    return mode


@dataclass
class LoraTuned:
    """The chosen rank's tower, peft's trainable-parameter count and the validation record."""

    tower: AudioTower
    rank: int
    trainable_params: int
    val_score: float | None = None
    best_epoch: int = 0
    val_scores: dict[int, float] = field(default_factory=dict)  # rank → best validation score

    @property
    def num_parameters(self) -> int:
        return self.trainable_params


def lora_tower(ws: Workspace, rank: int, target_modules: Sequence[str], lora_alpha: float, dropout: float,
               seed: int) -> AudioTower:
    """A deep copy of the audio tower with LoRA adapters on the named attention projections (peft), A drawn
    from `seed` (the global stream untouched), and a frozen copy of the projection."""
    config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        audio = get_peft_model(copy.deepcopy(ws.bundle.model.audio_model), config)
    projection = copy.deepcopy(ws.bundle.model.audio_projection).requires_grad_(False)
    return AudioTower(audio, projection).to(ws.bundle.device)


@dataclass(frozen=True)
class LoraOptions:
    ranks: int | Sequence[int] = DEFAULT_RANKS  # tried in turn, the best on validation kept
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS
    lora_alpha: float = 8.0  # fixed across ranks, as Hu et al. do: the update scale α/r shrinks with the rank
    dropout: float = 0.0
    epochs: int = 5
    lr: float = 5e-4
    weight_decay: float = 0.01
    batch_size: int = 16


def _train_rank(ws: Workspace, task: Task, split: Split, rank: int, options: LoraOptions, seed: int) -> LoraTuned:
    """One rank: AdamW on the LoRA weights, the epoch chosen by the training loop (epoch 0 = zero-shot)."""
    tower = lora_tower(ws, rank, options.target_modules, options.lora_alpha, options.dropout, seed)
    trainable = {name: p for name, p in tower.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=options.lr, weight_decay=options.weight_decay)
    bundle = ws.bundle
    scaler = torch.amp.GradScaler("cuda", enabled=bundle.amp_dtype == torch.float16 and bundle.device.type == "cuda")
    steps = encoder_steps(ws, task, split, tower, lambda rows: ws.embed(rows, model=tower), trainable, optimizer,
                          options.batch_size, scaler=scaler, mode=batchnorm_frozen_mode(tower))
    params = tower.audio_model.get_nb_trainable_parameters()[0]  # peft's count, before the tower is frozen
    result = train(steps, options.epochs, seed, desc=f"LoRA r={rank}", metric=task.selection_metric)
    tower.eval().requires_grad_(False)
    return LoraTuned(tower, rank, params, result.best_score, result.best_epoch)


def train_lora(ws: Workspace, task: Task, split: Split, options: LoraOptions = LoraOptions(), seed: int = 0
               ) -> LoraTuned:
    """LoRA for `task`, the rank chosen by the validation score (ties: the earlier rank). Without a validation
    split the first rank is trained for all epochs."""
    ranks = [int(options.ranks)] if np.isscalar(options.ranks) else [int(r) for r in options.ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"LoRA ranks must be positive integers, got {ranks}")
    best, scores = None, {}
    for rank in ranks if len(split.val) else ranks[:1]:
        tuned = _train_rank(ws, task, split, rank, options, seed)
        if tuned.val_score is not None:
            scores[rank] = tuned.val_score
        if best is None or (len(split.val) and tuned.val_score > best.val_score):  # ties: the earlier rank
            best = tuned
        release_memory(ws)
    best.val_scores = scores
    return best


@register
class Lora(Method):
    name = "lora"
    tasks = ("classification", "retrieval")
    by_default = ("classification", "retrieval")
    transferable = True
    defaults = option_defaults(LoraOptions)

    def fit(self, ctx):
        return train_lora(ctx.ws, ctx.task, ctx.split, LoraOptions(**ctx.options), seed=ctx.seed)

    def embed(self, model: LoraTuned, ws, rows):
        return ws.embed(rows, model=model.tower)

    def details(self, model: LoraTuned) -> dict:
        return {"best_epoch": model.best_epoch, "val_score": model.val_score, "chosen": f"rank {model.rank}"}
