"""Training an audio encoder for a task: the task's batches, loss against the frozen text side, and selection.

ResiDual's λ and LoRA's adapters train this way on any task: the encoder embeds a batch (`forward`, under the
bundle's autocast), the task scores the embeddings against its frozen text side (class prompts, captions) and
takes its loss (`Task.loss`); the one training loop keeps the epoch of the best validation `Task.score`.

Inside a process group of several ranks (torchrun), data-parallel: each rank embeds its share of every batch, the
shares are gathered with their gradients and every rank takes the task's loss of the whole batch (the contrastive
loss sees every rank's negatives); the loop averages the gradients. Validation: each rank embeds its share, rank 0
scores the gathered embeddings. Exact for an encoder whose embedding of a clip does not depend on the rest of its
batch (ResiDual's frozen, eval-mode CLAP); a tower trained in train mode (LoRA) normalises its log-mels with
its own share's BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from audio_residual.data_processing import Split
from audio_residual.tasks import Task
from audio_residual.training.distributed import Ranks
from audio_residual.training.loop import Steps
from audio_residual.workspace import Workspace

OPTIMIZERS = ("adam", "adamw", "schedulefree")


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, Adam, or schedule-free AdamW (the ResiDual paper's), over `params`."""
    if name == "schedulefree":
        import schedulefree

        return schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def optimizer_mode(optimizer, module_mode: Callable[[bool], None] | None = None) -> Callable[[bool], None]:
    """The loop's train/eval switch: schedule-free AdamW evaluates at its averaged weights, so it must be told
    when training stops; `module_mode` switches the trained module too."""

    def mode(training: bool) -> None:
        if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
            optimizer.train() if training else optimizer.eval()
        if module_mode is not None:
            module_mode(training)

    return mode


def encoder_steps(
    ws: Workspace,
    task: Task,
    split: Split,
    forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    embed_rows: Callable[[np.ndarray], torch.Tensor],
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    source=None,
    **loop_options,
) -> Steps:
    """The training loop's side of an encoder: `forward(x, is_longer)` gives a batch's differentiable unit
    embeddings from `source`'s inputs (the workspace's log-mels, or a stage-prefix cache), `embed_rows(rows)`
    the validation clips' embeddings. `loop_options` are further `Steps` fields (scheduler, scaler, mode)."""
    source = ws if source is None else source
    text = task.text_side(ws, split.train).to(ws.bundle.device)
    scale = float(ws.bundle.model.logit_scale_a.exp())
    ranks = Ranks.current()

    def loss(batch) -> torch.Tensor:
        mine = batch.rows[ranks.share(len(batch.rows))]
        if len(mine):
            x, longer = source.batch(mine)
            with ws.bundle.autocast():
                emb = forward(x, longer).float()
        else:  # more ranks than the batch has clips
            emb = text.new_zeros((0, text.shape[-1])).float().requires_grad_(True)
        emb = ranks.gather(emb, ranks.sizes(len(batch.rows)), grad=True).to(ws.bundle.device)
        return task.loss(emb, batch, text, scale)

    def validate() -> float:
        if not ranks.distributed:
            return task.score(ws, embed_rows(split.val), split.val)
        share = split.val[ranks.share(len(split.val))]
        mine = embed_rows(share).float() if len(share) else text.new_zeros((0, text.shape[-1])).float().cpu()
        emb = ranks.gather(mine, ranks.sizes(len(split.val))).cpu()
        return task.score(ws, emb, split.val) if ranks.main else float("nan")  # the loop takes rank 0's

    return Steps(params=params, batches=task.batches(ws, split.train, batch_size), loss=loss,
                 validate=validate if len(split.val) else None, optimizer=optimizer, ranks=ranks, **loop_options)
