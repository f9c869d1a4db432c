"""The retrieval task: captions as targets, symmetric InfoNCE, LAION's metric in one wide row."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.data_processing.captions import CaptionTable
from audio_residual.tasks import TASKS, TrainBatch
from audio_residual.tasks.retrieval import RETRIEVAL, metrics_from_ranks, retrieval_ranks

CAPTION_CLIP = np.array([0, 0, 1, 2, 2])
S = torch.tensor([[0.9, 0.1, 0.8, 0.3, 0.2], [0.5, 0.6, 0.4, 0.7, 0.1], [0.2, 0.3, 0.1, 0.4, 0.9]])


def test_task_is_registered_beside_classification():
    assert TASKS["retrieval"] is RETRIEVAL and "classification" in TASKS
    assert RETRIEVAL.selection_metric == "mean_r1" and RETRIEVAL.headline == "mean_r1"
    assert RETRIEVAL.baseline == "zeroshot" and RETRIEVAL.captioned


def test_evaluate_a_matrix_or_a_scorer_into_one_wide_row():
    metrics, arrays = RETRIEVAL.evaluate(S, CAPTION_CLIP)
    same, _ = RETRIEVAL.evaluate(lambda rows, cols: S[rows, cols], CAPTION_CLIP)
    reference = metrics_from_ranks(retrieval_ranks(lambda rows, cols: S[rows, cols], 3, CAPTION_CLIP, block=1))
    assert metrics == same == {k: v for k, v in reference.items() if not k.startswith("n_")}
    assert metrics["t2a_r1"] == pytest.approx(0.4) and metrics["a2t_r1"] == pytest.approx(2 / 3)
    assert metrics["mean_r1"] == pytest.approx((0.4 + 2 / 3) / 2)
    np.testing.assert_array_equal(arrays["t2a_ranks"], [0, 2, 1, 1, 0])
    np.testing.assert_array_equal(arrays["a2t_ranks"], [0, 4, 3, 1, 0])
    # One row per method: every metric of both directions is a column, no `direction` column.
    assert set(RETRIEVAL.metrics) == set(metrics) and "direction" not in metrics
    assert {f"{d}_{m}" for d in ("t2a", "a2t") for m in ("r1", "r10", "map10", "random_r1")} <= set(metrics)


def test_loss_is_clips_symmetric_infonce_against_their_drawn_captions():
    """Audio i is paired with caption `targets[i]` of the split's texts; both directions count once."""
    g = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    batch = TrainBatch(rows=np.array([7, 2, 4]), targets=np.array([4, 0, 2]))
    logits = 3.0 * audio @ text[[4, 0, 2]].T
    ids = torch.arange(3)
    expected = (F.cross_entropy(logits, ids) + F.cross_entropy(logits.T, ids)) / 2
    assert float(RETRIEVAL.loss(audio, batch, text, 3.0)) == pytest.approx(float(expected), abs=1e-6)


def test_batches_draw_one_caption_of_each_clip_and_never_a_lone_pair():
    table = CaptionTable("toy", ".", tuple(f"{i}.wav" for i in range(5)),
                         (("a",), ("b", "c"), ("d",), ("e", "f", "g"), ("h",)), ("train",) * 5)
    ws = SimpleNamespace(table=table)
    rows = np.array([0, 1, 3, 4])
    texts, owner = RETRIEVAL.texts(ws, rows), RETRIEVAL.targets(ws, rows)
    assert texts == ["a", "b", "c", "e", "f", "g", "h"] and owner.tolist() == [0, 1, 1, 2, 2, 2, 3]
    draw = RETRIEVAL.batches(ws, rows, batch_size=3)
    batches = draw(torch.Generator().manual_seed(0))
    assert [len(b.rows) for b in batches] == [3]  # the fourth clip alone has no negative: dropped
    for batch in batches:
        for row, caption in zip(batch.rows, batch.targets, strict=True):
            assert rows[owner[caption]] == row  # each clip brings one of its own captions
    again = draw(torch.Generator().manual_seed(0))
    assert [b.rows.tolist() for b in again] == [b.rows.tolist() for b in batches]  # a function of the generator


def test_retrieval_methods_register_beside_classification():
    from audio_residual.methods import REGISTRIES, default_methods, registry

    assert registry("classification") is REGISTRIES["classification"]
    retrieval = REGISTRIES["retrieval"]
    assert list(retrieval) == ["zeroshot", "lora", "finetune", "residual", "residual-paper", "residual_coarse",
                               "projection", "tap"]
    assert default_methods("retrieval") == ("zeroshot", "lora", "finetune", "residual", "projection", "tap")
    assert all("retrieval" in m.tasks for m in retrieval.values())
    classification = REGISTRIES["classification"]
    assert "tap" not in classification and "projection" not in classification  # never in classification's lists
    assert all("classification" in m.tasks for m in classification.values())
    # One zero-shot method serves both tasks; fine-tuning is a different method per task.
    assert retrieval["zeroshot"] is classification["zeroshot"]
    assert type(retrieval["finetune"]) is not type(classification["finetune"])
