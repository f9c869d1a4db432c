"""LAION's retrieval metric on hand-made similarity matrices with known ranks, and blockwise = whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.tasks.retrieval import (
    RETRIEVAL,
    RetrievalRanks,
    metrics_from_ranks,
    random_recall,
    retrieval_metrics,
    retrieval_ranks,
    top_captions,
)

# 3 clips; captions 0,1 describe clip 0, caption 2 clip 1, captions 3,4 clip 2.
CAPTION_CLIP = np.array([0, 0, 1, 2, 2])
S = torch.tensor(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2],
        [0.5, 0.6, 0.4, 0.7, 0.1],
        [0.2, 0.3, 0.1, 0.4, 0.9],
    ]
)


def matrix_scorer(scores, calls=None):
    def score(rows, cols):
        block = scores[rows, cols]
        if calls is not None:
            calls.append(tuple(block.shape))
        return block

    return score


@pytest.mark.parametrize("block", [1, 2, 100])
def test_ranks_and_metrics_of_a_hand_made_matrix(block):
    ranks = retrieval_ranks(matrix_scorer(S), 3, CAPTION_CLIP, block=block)
    # text→audio, per caption column: its clip's position among the 3 clips.
    np.testing.assert_array_equal(ranks.t2a, [0, 2, 1, 1, 0])
    # audio→text, per caption: its position in its clip's row.
    np.testing.assert_array_equal(ranks.a2t, [0, 4, 3, 1, 0])
    np.testing.assert_array_equal(ranks.best_a2t(), [0, 3, 0])
    m = metrics_from_ranks(ranks)
    assert m["t2a_r1"] == pytest.approx(2 / 5) and m["t2a_r5"] == 1.0 and m["t2a_r10"] == 1.0
    assert m["t2a_map10"] == pytest.approx((1 + 1 / 3 + 1 / 2 + 1 / 2 + 1) / 5)
    assert m["t2a_mean_rank"] == pytest.approx(1.8) and m["t2a_median_rank"] == 2.0
    assert m["a2t_r1"] == pytest.approx(2 / 3) and m["a2t_r5"] == 1.0
    # AP@10: clip 0 ranks {0, 4} → (1/1 + 2/5)/2; clip 1 {3} → (1/4)/1; clip 2 {1, 0} sorted → (1/1 + 2/2)/2.
    assert m["a2t_map10"] == pytest.approx((0.7 + 0.25 + 1.0) / 3)
    assert m["a2t_mean_rank"] == pytest.approx(2.0) and m["a2t_median_rank"] == 1.0
    assert m["mean_r1"] == pytest.approx((2 / 5 + 2 / 3) / 2)
    assert m["n_audio"] == 3 and m["n_text"] == 5
    # Random baselines: 1/3 text→audio; audio→text 1 − (T−c)/T per clip: (0.4 + 0.2 + 0.4)/3.
    assert m["t2a_random_r1"] == pytest.approx(1 / 3) and m["a2t_random_r1"] == pytest.approx(1 / 3)
    assert m["a2t_random_r5"] == 1.0 and m["t2a_random_r5"] == 1.0


def test_ranks_beyond_ten_score_zero_in_map_and_miss_recall():
    n = 12
    scores = torch.arange(n).float().repeat(n, 1)  # every row ranks caption j at position n−1−j
    ranks = retrieval_ranks(matrix_scorer(scores), n, np.arange(n), block=5)
    expected = n - 1 - np.arange(n)
    np.testing.assert_array_equal(ranks.a2t, expected)
    m = metrics_from_ranks(ranks)
    a2t = np.array(expected)
    assert m["a2t_map10"] == pytest.approx(np.mean(np.where(a2t < 10, 1 / (a2t + 1), 0)))
    assert m["a2t_r10"] == pytest.approx(np.mean(a2t < 10)) and m["a2t_r10"] < 1


def test_ties_rank_the_lower_index_first():
    scores = torch.zeros(3, 5)
    ranks = retrieval_ranks(matrix_scorer(scores), 3, CAPTION_CLIP, block=2)
    np.testing.assert_array_equal(ranks.t2a, CAPTION_CLIP)  # clip i sits at position i
    np.testing.assert_array_equal(ranks.a2t, np.arange(5))  # caption q at position q


def laion_reference(audio, text, n_captions=5):
    """LAION's evaluate_clotho_audiocaps loops on the whole matrix (captions grouped by clip), with the
    sort of Mei et al. in the audio→text mAP@10 that LAION's docstring describes (`a2t_map10`), and without
    it, as LAION's code computes it (`a2t_map10_laion`: the positions in caption order)."""
    n = audio.shape[0]
    logits_per_audio = audio @ text.T
    logits_per_text = logits_per_audio.T
    preds = []
    for d in range(n_captions):
        logit = logits_per_text.reshape(n, n_captions, n)[:, d, :]
        ranking = torch.argsort(logit, descending=True)
        preds.append(torch.where(ranking == torch.arange(n).view(-1, 1))[1].numpy())
    t2a = np.concatenate(preds)
    out = {"t2a_mean_rank": t2a.mean() + 1, "t2a_median_rank": np.floor(np.median(t2a)) + 1}
    for k in (1, 5, 10):
        out[f"t2a_r{k}"] = np.mean(t2a < k)
    out["t2a_map10"] = np.mean(np.where(t2a < 10, 1 / (t2a + 1), 0.0))
    best, aps, laion_aps = [], [], []
    for d in range(n):
        ranking = torch.argsort(logits_per_audio[d], descending=True)
        truth = torch.arange(d * n_captions, d * n_captions + n_captions)
        all_pred = torch.where(torch.stack([ranking] * n_captions) == truth.view(-1, 1))[1]  # caption order
        best.append(int(all_pred.min()))
        in_order = all_pred[all_pred < 10].numpy()
        kept = np.sort(in_order)
        aps.append(np.sum(np.arange(1, len(kept) + 1) / (kept + 1)) / n_captions)
        laion_aps.append(np.sum(np.arange(1, len(in_order) + 1) / (in_order + 1)) / n_captions)
    for k in (1, 5, 10):
        out[f"a2t_r{k}"] = np.mean(np.array(best) < k)
    out["a2t_map10"] = np.mean(aps)
    out["a2t_map10_laion"] = np.mean(laion_aps)
    return out


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_embeddings_match_laions_whole_matrix_evaluation_at_any_block(block):
    g = torch.Generator().manual_seed(0)
    n, dim = 23, 6
    audio = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    text = F.normalize(audio.repeat_interleave(5, 0) + 0.9 * torch.randn(5 * n, dim, generator=g), dim=-1)
    caption_clip = np.repeat(np.arange(n), 5)
    ours = retrieval_metrics(audio * 3.0, text, caption_clip, block=block)  # scale is normalised away
    ref = laion_reference(audio, text)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < ours["t2a_r1"] < 1 and 0 < ours["a2t_map10"] < 1  # the data is neither trivial nor hopeless
    assert ours["a2t_map10_laion"] > ours["a2t_map10"]  # the captions here do not come in rank order


def test_laions_unsorted_map_differs_and_exceeds_ours_here():
    """Clip 0's captions rank 1 then 0: sorted AP@10 = (1/1 + 2/2)/2 = 1; LAION's code, which pairs the
    ranks in caption order with 1, 2, ..., gives (1/2 + 2/1)/2 = 1.25 for that clip (above 1)."""
    scores = torch.tensor([[0.8, 0.9, 0.0], [0.1, 0.0, 0.9]])
    ranks = retrieval_ranks(matrix_scorer(scores), 2, np.array([0, 0, 1]))
    np.testing.assert_array_equal(ranks.a2t, [1, 0, 0])
    m = metrics_from_ranks(ranks)
    assert m["a2t_map10"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["a2t_map10_laion"] == pytest.approx((1.25 + 1.0) / 2)


def test_both_maps_by_hand_with_the_cutoff_at_ten():
    """Clip 0's three captions rank 12, 4, 1 (in caption order), clip 1's two rank 0, 2. Ours sorts the
    ranks under 10: clip 0 (1/2 + 2/5)/3 = 0.3. LAION's code keeps caption order: (1/5 + 2/2)/3 = 0.4.
    Clip 1 comes in rank order: (1/1 + 2/3)/2 for both. The captions' order within a clip matters only
    to LAION's value."""
    caption_clip = np.array([0, 0, 0, 1, 1])
    ranks = RetrievalRanks(t2a=np.zeros(5, np.int64), a2t=np.array([12, 4, 1, 0, 2]), caption_clip=caption_clip,
                           n_audio=2)
    m = metrics_from_ranks(ranks)
    clip1 = (1 + 2 / 3) / 2
    assert m["a2t_map10"] == pytest.approx((0.3 + clip1) / 2)
    assert m["a2t_map10_laion"] == pytest.approx((0.4 + clip1) / 2)
    reordered = RetrievalRanks(t2a=ranks.t2a, a2t=np.array([1, 4, 12, 0, 2]), caption_clip=caption_clip, n_audio=2)
    again = metrics_from_ranks(reordered)
    assert again["a2t_map10"] == m["a2t_map10"] and again["a2t_map10_laion"] == pytest.approx(m["a2t_map10"])
    # Captions of one clip need not be adjacent: their order among the clip's own captions is what counts.
    interleaved = RetrievalRanks(t2a=np.zeros(5, np.int64), a2t=np.array([12, 0, 4, 2, 1]),
                                 caption_clip=np.array([0, 1, 0, 1, 0]), n_audio=2)
    assert metrics_from_ranks(interleaved)["a2t_map10_laion"] == pytest.approx(m["a2t_map10_laion"])


def test_scorer_is_only_asked_for_bounded_blocks():
    n, calls = 40, []
    scores = torch.randn(n, 3 * n)
    retrieval_ranks(matrix_scorer(scores, calls), n, np.repeat(np.arange(n), 3), block=8)
    assert calls and all(min(shape) <= 8 for shape in calls)
    assert sum(a * b for a, b in calls) == 2 * n * 3 * n  # each direction scores every pair exactly once


def test_random_recall_is_k_over_n_with_one_caption_per_clip():
    assert random_recall(50, np.arange(50), 5) == {"t2a": pytest.approx(0.1), "a2t": pytest.approx(0.1)}
    # Five captions per clip: 1 − C(T−5, 1)/C(T, 1) = 5/T = 1/N at k = 1.
    assert random_recall(50, np.repeat(np.arange(50), 5), 1)["a2t"] == pytest.approx(1 / 50)


def test_one_wide_row_holds_both_directions_and_top_captions():
    """A stored row is wide: every metric of both directions and their random baselines, headline mean R@1."""
    m = metrics_from_ranks(retrieval_ranks(matrix_scorer(S), 3, CAPTION_CLIP))
    row, _ = RETRIEVAL.evaluate(S, CAPTION_CLIP)
    assert set(RETRIEVAL.metrics) == set(row) and RETRIEVAL.headline == "mean_r1"
    assert all(row[k] == m[k] for k in row)
    assert row["t2a_random_r1"] == pytest.approx(1 / 3) and row["a2t_map10"] == m["a2t_map10"]
    assert "a2t_map10_laion" in row and dict(RETRIEVAL.report_columns)["A→T mAP@10 (LAION's code)"] == \
        "a2t_map10_laion"
    indices, values = top_captions(matrix_scorer(S), [1, 2], n_text=5, k=2)
    np.testing.assert_array_equal(indices, [[3, 1], [4, 3]])
    np.testing.assert_allclose(values, [[0.7, 0.6], [0.9, 0.4]])


@pytest.mark.parametrize(
    ("caption_clip", "n_audio", "message"),
    [
        (np.array([0, 0, 2]), 3, "no caption"),
        (np.array([0, 3]), 3, "outside"),
        (np.array([0.0, 1.0]), 2, "integer"),
        (np.array([], dtype=int), 0, "needs clips"),
    ],
)
def test_bad_caption_maps_are_named(caption_clip, n_audio, message):
    with pytest.raises(ValueError, match=message):
        retrieval_ranks(matrix_scorer(torch.zeros(max(n_audio, 1), max(len(caption_clip), 1))), n_audio,
                        caption_clip)


def test_mismatched_embeddings_are_named():
    with pytest.raises(ValueError, match="embeddings"):
        retrieval_metrics(torch.zeros(2, 3), torch.zeros(2, 4), np.array([0, 1]))
