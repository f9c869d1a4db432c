"""The one training loop of every gradient-trained method (ResiDual, the adapters, CoOp, LoRA, fine-tuning).

A method hands the loop its `Steps`: the tensors that train, how an epoch's batches are drawn, the loss of
a batch and its validation score. The loop owns everything the methods must not do differently:

* selection: the best value of the task's selection metric on the validation split, the untrained start
  (epoch 0) included, ties to the earlier epoch; without validation, the last epoch;
* patience (epochs without a better validation score), seeded shuffling (a `torch.Generator` per epoch,
  so a resumed run reshuffles exactly as the uninterrupted one; no global seeding);
* resume from a safetensors checkpoint, a tqdm progress bar and W&B logging through `RunTracker`;
* data parallelism (`Steps.ranks`, under torchrun): the ranks draw the same batches and their losses are the global
  batch's (`training.distributed`); the loop averages the gradients over the ranks before every optimizer step,
  selects on rank 0's validation score, and only rank 0 writes checkpoints, logs and shows progress. Every rank
  resumes from the one checkpoint (the output folder is on storage every machine sees), then takes rank 0's weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from audio_residual.training.checkpoint import load_checkpoint, save_checkpoint
from audio_residual.training.distributed import Ranks


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the parameters are no longer meaningful, so the run stops."""


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of a (1-based) epoch: a function of the seed and epoch only."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch - 1)


def row_batches(rows, batch_size: int) -> Callable[[torch.Generator], Iterable[np.ndarray]]:
    """The default batching: `rows` in an order drawn from the epoch's generator, in chunks."""
    rows = np.asarray(rows)

    def draw(generator: torch.Generator) -> Iterable[np.ndarray]:
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

    return draw


@dataclass
class Steps:
    """A method's side of the loop."""

    params: dict[str, torch.Tensor]  # what trains: kept at the selected epoch, saved in checkpoints
    batches: Callable[[torch.Generator], Iterable[Any]]  # one epoch's batches (`row_batches` by default)
    loss: Callable[[Any], torch.Tensor] | None  # the loss of one batch, differentiable in `params`
    validate: Callable[[], float] | None  # the selection metric on validation; None: no validation split
    optimizer: torch.optim.Optimizer
    scheduler: Any = None  # stepped after every optimizer step
    scaler: torch.amp.GradScaler | None = None  # fp16 loss scaling
    mode: Callable[[bool], None] | None = None  # switch train (True) / eval (False): dropout, schedule-free
    record: Callable[[], dict] | None = None  # extra per-epoch history entries, read after the epoch
    # Instead of `loss`: puts a batch's gradients into .grad itself and returns its (detached) loss, for a loss
    # that is not one graph (pretraining's accumulation re-embeds each micro-batch, as GradCache does).
    backward: Callable[[Any], torch.Tensor] | None = None
    ranks: Ranks = field(default_factory=Ranks)  # data-parallel ranks: the loss must be the global batch's


@dataclass
class LoopResult:
    """What the loop kept: the selected epoch, its validation score, and every epoch's record."""

    best_epoch: int = 0
    best_score: float | None = None  # None without validation
    start_score: float | None = None  # epoch 0's validation score
    history: list[dict] = field(default_factory=list)  # epochs 1..n
    best: dict[str, torch.Tensor] | None = None
    earlier_seconds: float = 0.0  # wall time of the sessions before a resume


def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


@torch.no_grad()
def _restore(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(state[name].to(p.device))


def _validate(steps: Steps, ranks: Ranks) -> float | None:
    """The selection score; with several ranks, rank 0's (every rank then keeps the same epoch)."""
    if steps.validate is None:
        return None
    if steps.mode is not None:
        steps.mode(False)
    return float(ranks.broadcast_json(float(steps.validate()), "validation"))


def _resume(steps: Steps, checkpoint: Path | None, key: str) -> LoopResult | None:
    """The state an interrupted run of the same `key` saved, else None."""
    if checkpoint is None or not checkpoint.exists():
        return None
    states, info = load_checkpoint(checkpoint)
    if info["config"] != key:
        return None
    _restore(steps.params, states["params"])
    steps.optimizer.load_state_dict(states["optimizer"])
    if steps.scheduler is not None:
        steps.scheduler.load_state_dict(states["scheduler"])
    return LoopResult(info["best_epoch"], info["best_val"], info["start_val"], info["history"], states["best"],
                      info["seconds"])


def _save(steps: Steps, checkpoint: Path, key: str, result: LoopResult, seconds: float) -> None:
    states = {"params": _snapshot(steps.params), "optimizer": steps.optimizer.state_dict(), "best": result.best}
    if steps.scheduler is not None:
        states["scheduler"] = steps.scheduler.state_dict()
    info = {"config": key, "epoch": len(result.history), "history": result.history, "best_epoch": result.best_epoch,
            "best_val": result.best_score, "start_val": result.start_score, "seconds": seconds}
    save_checkpoint(checkpoint, states, info)


def _finite(loss: torch.Tensor, where: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"{where}, step {step}: loss is {loss.item()}; lower the learning rate")


def _epoch(steps: Steps, generator: torch.Generator, where: str) -> list[float]:
    """One pass of optimizer steps; the batch losses."""
    if steps.mode is not None:
        steps.mode(True)
    trained = [p for group in steps.optimizer.param_groups for p in group["params"]]
    losses = []
    for step, batch in enumerate(steps.batches(generator), 1):
        steps.optimizer.zero_grad(set_to_none=True)
        loss = steps.backward(batch) if steps.backward is not None else steps.loss(batch)
        _finite(loss, where, step)
        if steps.backward is None:
            with steps.ranks.collective("the backward pass"):
                (loss if steps.scaler is None else steps.scaler.scale(loss)).backward()
        steps.ranks.average_gradients(trained)
        if steps.scaler is not None:
            steps.scaler.step(steps.optimizer)
            steps.scaler.update()
        else:
            steps.optimizer.step()
        if steps.scheduler is not None:
            steps.scheduler.step()
        losses.append(float(loss.detach()))
    return losses


def _start(steps: Steps, checkpoint: Path | None, key: str) -> LoopResult:
    """The resumed state, or epoch 0's; with several ranks, every rank at rank 0's epoch and weights."""
    ranks = steps.ranks
    result = _resume(steps, checkpoint, key)
    if ranks.distributed:
        mine = None if result is None else len(result.history)
        theirs = ranks.broadcast_json(mine, "the resume")
        if mine != theirs:
            raise OSError(f"rank {ranks.rank} finds {'no checkpoint' if mine is None else f'epoch {mine}'} in "
                          f"{checkpoint}, rank 0 {'none' if theirs is None else f'epoch {theirs}'}: the output folder "
                          "must be on storage that every machine of the job sees")  # fmt: skip
        ranks.broadcast_tensors(steps.params.values())
    if result is None:
        start = _validate(steps, ranks)
        result = LoopResult(0, start, start, [], _snapshot(steps.params))
    return result


def train(
    steps: Steps,
    epochs: int,
    seed: int = 0,
    patience: int | None = None,
    checkpoint: str | Path | None = None,
    key: str = "",
    logger=None,
    desc: str = "training",
    metric: str = "score",
) -> LoopResult:
    """Train for up to `epochs` epochs; leave `steps.params` at the selected epoch and say which it was.

    With a `checkpoint` path, the state is saved after every epoch and a run of the same `key` resumes
    from it; `logger` (a `RunTracker`) gets every epoch's record under `desc`; `metric` names the
    validation score in the records (`val_<metric>`).
    """
    started = time.perf_counter()
    checkpoint = None if checkpoint is None else Path(checkpoint)
    ranks = steps.ranks
    result = _start(steps, checkpoint, key)
    for epoch in tqdm(range(len(result.history) + 1, epochs + 1), desc=desc, leave=False,
                      initial=len(result.history), total=epochs, disable=not ranks.main):
        losses = _epoch(steps, epoch_generator(seed, epoch), f"{desc}, epoch {epoch}")
        score = _validate(steps, ranks)
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                  **(steps.record() if steps.record is not None else {}),
                  f"val_{metric}": float("nan") if score is None else score, "lr": steps.optimizer.param_groups[0]["lr"]}
        result.history.append(record)
        if score is None or score > result.best_score:
            result.best_epoch, result.best_score, result.best = epoch, score, _snapshot(steps.params)
        if logger is not None and ranks.main:
            logger.log({f"{desc}/{k}": v for k, v in record.items()})
        if checkpoint is not None and ranks.main:
            _save(steps, checkpoint, key, result, result.earlier_seconds + time.perf_counter() - started)
        if patience is not None and score is not None and epoch - result.best_epoch >= patience:
            break
    if steps.mode is not None:
        steps.mode(False)
    _restore(steps.params, result.best)
    return result
