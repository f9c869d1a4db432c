"""Per-head mean ablation: how much zero-shot accuracy depends on each attention head's variation.

Head h's contribution to its block is W_O,h z_h (linear in its context z_h), so setting z_h to its
training mean m_h on `layers.{s}.blocks.{b}.attn.hook_z` replaces the contribution by its mean exactly:
the head keeps its average effect but carries no clip-specific information. Means come from the
`ResidualStatistics` of the training folds; accuracy is measured on held-out clips against the
unablated model, whose logits are computed once (one extra forward pass per head, nothing more).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.hooks import ClapHooks, HookPoint
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.names import Unit, hook_name, parse_block


def head_mean(stats: ResidualStatistics, block: str, head: int) -> torch.Tensor:
    """m_h: head `head`'s slice of the block's mean context, (d_head,) float64."""
    d_head = stats.head_dim(block)
    return stats.blocks[block]["z"].mean[head * d_head : (head + 1) * d_head]


@contextlib.contextmanager
def mean_ablated(model, stats: ResidualStatistics, units: Iterable[tuple[str, int]]) -> Iterator[None]:
    """Within the block, each (block, head) in `units` has z_h replaced by its mean; hooks removed after."""
    fwd = []
    for block, head in units:
        mean = head_mean(stats, block, head)

        def replace(z: torch.Tensor, _point: HookPoint, head: int = head, mean: torch.Tensor = mean) -> torch.Tensor:
            z = z.clone()
            z[..., head, :] = mean.to(z.device, z.dtype)
            return z

        fwd.append((hook_name(*parse_block(block), "attn.hook_z"), replace))
    with ClapHooks(model).hooks(fwd):
        yield


def _heads(stats: ResidualStatistics, stages: Sequence[int] | None) -> list[tuple[str, int, int, int]]:
    stages = stats.stages() if stages is None else list(stages)
    unknown = sorted(set(stages) - set(stats.stages()))
    if unknown:
        raise ValueError(f"no stage(s) {unknown} in the statistics (stages {stats.stages()})")
    out = []
    for stage in stages:
        for block in stats.blocks_of(stage):
            out += [(block, stage, parse_block(block)[1], h) for h in range(stats.num_heads(block))]
    return out


def _per_class_accuracy(correct: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Accuracy per class; NaN for classes with no clip in the evaluated set."""
    totals = np.bincount(labels, minlength=n_classes).astype(float)
    hits = np.bincount(labels, weights=correct.astype(float), minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, hits / totals, np.nan)


def select_clips(indices: np.ndarray, max_clips: int | None, seed: int = 0) -> np.ndarray:
    """A seeded uniform subset of at most `max_clips` rows, in ascending order (all rows if None)."""
    indices = np.asarray(indices)
    if max_clips is None or max_clips >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=max_clips, replace=False))


def head_ablation(
    classifier: ZeroShotClassifier,
    input_features: np.ndarray,
    labels: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    stats: ResidualStatistics,
    stages: Sequence[int] | None = None,
    max_clips: int | None = None,
    batch_size: int = 32,
    is_longer: np.ndarray | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Zero-shot accuracy with each head mean-ablated in turn, on `input_features[indices]`.

    `labels` is indexed like `input_features` (the dataset's label array). One row per head: unit,
    stage, block, head, clips, base_accuracy, accuracy, delta (= accuracy − base), flip_rate (share of
    changed predictions), logit_shift (mean |Δlogit|), and `delta:{class}` per class (NaN if absent).
    """
    rows = select_clips(indices, max_clips, seed)
    if len(rows) == 0:
        raise ValueError("ablation needs at least one clip to evaluate")
    labels = np.asarray(labels)[rows]
    n_classes = len(classifier.class_names)

    def logits() -> torch.Tensor:
        embeds = classifier.embed(input_features, rows, is_longer, batch_size=batch_size, desc="ablation pass")
        return classifier.logits(embeds)

    base = logits()
    base_pred = base.argmax(1).numpy()
    base_class = _per_class_accuracy(base_pred == labels, labels, n_classes)
    records = []
    for block, stage, block_index, head in tqdm(_heads(stats, stages), desc="head ablation"):
        with mean_ablated(classifier.bundle.model, stats, [(block, head)]):
            ablated = logits()
        pred = ablated.argmax(1).numpy()
        correct = pred == labels
        record = {
            "unit": Unit(stage, block_index, head=head).name,
            "stage": stage,
            "block": block_index,
            "head": head,
            "clips": len(rows),
            "base_accuracy": float(np.mean(base_pred == labels)),
            "accuracy": float(correct.mean()),
        }
        record["delta"] = record["accuracy"] - record["base_accuracy"]
        record["flip_rate"] = float(np.mean(pred != base_pred))
        record["logit_shift"] = float((ablated - base).abs().mean())
        deltas = _per_class_accuracy(correct, labels, n_classes) - base_class
        record.update({f"delta:{name}": float(d) for name, d in zip(classifier.class_names, deltas, strict=True)})
        records.append(record)
    return pd.DataFrame.from_records(records)
