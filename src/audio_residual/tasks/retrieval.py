"""Audio-text retrieval (Clotho, AudioCaps): captions as targets, symmetric InfoNCE, LAION's metric.

A target is the clip each caption describes (`caption_clip`); the text side is the split's captions;
the loss is CLIP's symmetric InfoNCE over (clip, caption) pairs; the metrics are R@1/5/10, mAP@10 and
mean/median rank in both directions (`evaluation.retrieval`), stored one row per direction; the
selection metric is validation mean R@1 (the mean of both directions' R@1).
"""

from __future__ import annotations

import numpy as np
import torch

from audio_residual.evaluation.retrieval import (
    DIRECTIONS,
    direction_rows,
    metrics_from_ranks,
    retrieval_ranks,
)
from audio_residual.retrieval.contrastive import symmetric_infonce
from audio_residual.tasks.base import Task


def matrix_scorer(scores: torch.Tensor):
    """A whole (clips, captions) score matrix as a blockwise scorer."""
    return lambda rows, cols: scores[rows, cols]


class Retrieval(Task):
    name = "retrieval"
    metrics = ("r1", "r5", "r10", "map10", "mean_rank", "median_rank", "random_r1", "random_r5", "random_r10")
    selection_metric = "mean_r1"
    report_columns = (("R@5", "r5"), ("R@10", "r10"), ("mAP@10", "map10"), ("random R@1", "random_r1"))
    directions = tuple(DIRECTIONS.values())  # each stored row is one direction

    def targets(self, ws, rows: np.ndarray) -> np.ndarray:
        """Per caption of the clips `rows` (a split of a `RetrievalData`), the position of its clip."""
        return ws.table.caption_pairs(rows)[1]

    def texts(self, ws, rows: np.ndarray | None = None) -> list[str]:
        """The captions of the clips `rows` (default: every clip), clip by clip."""
        return ws.table.caption_pairs(rows)[0]

    def loss(self, scores: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Symmetric InfoNCE of (clips, captions) logits; `targets` = (clip id per row, clip id per column)."""
        audio_clip, text_clip = targets
        return symmetric_infonce(scores, audio_clip, text_clip)

    def evaluate(self, scores, targets, block: int = 256):
        """(metrics of both directions and the selection metric, the ranks as arrays) of test scores: a
        (clips, captions) matrix or a blockwise `Scorer` with `targets` = each caption's clip position."""
        caption_clip = np.asarray(targets)
        n_audio = int(caption_clip.max()) + 1 if len(caption_clip) else 0
        scorer = scores if callable(scores) else matrix_scorer(torch.as_tensor(scores))
        ranks = retrieval_ranks(scorer, n_audio, caption_clip, block)
        return metrics_from_ranks(ranks), {"t2a_ranks": ranks.t2a, "a2t_ranks": ranks.a2t}

    def rows(self, metrics: dict) -> list[dict]:
        """The stored rows of one evaluation: one per direction, with this task's metric columns."""
        return direction_rows(metrics)

    def informative(self, metric: str, n_classes: int | None) -> bool:
        return True


RETRIEVAL = Retrieval()
