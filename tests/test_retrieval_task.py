"""The retrieval task: captions as targets, symmetric InfoNCE, LAION's metric per direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_residual.evaluation.retrieval import metrics_from_ranks, retrieval_ranks
from audio_residual.tasks import TASKS
from audio_residual.tasks.retrieval import RETRIEVAL

CAPTION_CLIP = np.array([0, 0, 1, 2, 2])
S = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2], [0.5, 0.6, 0.4, 0.7, 0.1], [0.2, 0.3, 0.1, 0.4, 0.9]])


def test_task_is_registered_beside_classification():
    assert TASKS["retrieval"] is RETRIEVAL and "classification" in TASKS
    assert RETRIEVAL.selection_metric == "mean_r1" and RETRIEVAL.headline == "r1"


def test_evaluate_a_matrix_or_a_scorer_and_store_one_row_per_direction():
    metrics, arrays = RETRIEVAL.evaluate(S, CAPTION_CLIP)
    same, _ = RETRIEVAL.evaluate(lambda rows, cols: S[rows, cols], CAPTION_CLIP, block=1)
    assert metrics == same == metrics_from_ranks(retrieval_ranks(lambda rows, cols: S[rows, cols], 3, CAPTION_CLIP))
    assert metrics["t2a_r1"] == pytest.approx(0.4) and metrics["a2t_r1"] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(arrays["t2a_ranks"], [0, 2, 1, 1, 0])
    rows = RETRIEVAL.rows(metrics)
    assert [r["direction"] for r in rows] == list(RETRIEVAL.directions)
    assert all(set(RETRIEVAL.metrics) <= set(r) for r in rows)


def test_loss_is_symmetric_infonce_with_same_clip_positives():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    ids = torch.tensor([0, 1])
    expected = torch.nn.functional.cross_entropy(logits, ids)  # symmetric matrix: both directions agree
    assert float(RETRIEVAL.loss(logits, (ids, ids))) == pytest.approx(float(expected), abs=1e-6)


def test_retrieval_methods_register_beside_classification():
    from audio_residual.methods import REGISTRIES, REGISTRY

    assert REGISTRY is REGISTRIES["classification"]  # classification's lists never see retrieval methods
    retrieval = REGISTRIES["retrieval"]
    assert list(retrieval) == ["zero-shot", "residual", "residual-paper", "projection", "tap", "lora", "finetune"]
    assert all(m.task == "retrieval" for m in retrieval.values()) and "tap" not in REGISTRY
    assert all(m.task == "classification" for m in REGISTRY.values())
