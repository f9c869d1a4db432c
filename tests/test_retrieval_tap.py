"""TAP: uniform attention with identity maps is mean pooling; the fast pair score equals the explicit one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.methods.tap import TextAwarePooling
from audio_residual.tasks.loss import symmetric_infonce
from audio_residual.tasks.retrieval import metrics_from_ranks, retrieval_ranks

pytestmark = pytest.mark.usefixtures("single_thread")  # toy-sized training steps: thread hand-offs dominate


def data(n=5, m=7, length=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, length, dim, generator=g), torch.randn(m, dim, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_untrained_start_is_mean_pooling(seed):
    """From the real initialisation (random keys, nothing zeroed here): attention is uniform whatever the
    caption and token, so every pair's pooled vector is the clip's mean token and its score mean pooling's."""
    tokens, text = data(seed=seed)
    torch.manual_seed(seed)
    tap = TextAwarePooling(8, attn_dim=4)
    assert tap.key.weight.abs().sum() > 0  # the keys are random: uniform attention comes from the query map
    weights = tap.attention(tap.prepare_audio(tokens), tap.prepare_text(text))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / tokens.shape[1]), atol=1e-6, rtol=0)
    pooled = tap.pooled(tokens, text)
    torch.testing.assert_close(pooled, tokens.mean(1)[:, None].expand(-1, 7, -1), atol=1e-5, rtol=1e-5)
    expected = F.normalize(tokens.mean(1), dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(tap(tokens, text) / tap.scale, expected, atol=1e-5, rtol=1e-5)


def test_fast_pair_scores_equal_explicit_pooling_away_from_identity():
    tokens, text = data(seed=1)
    torch.manual_seed(3)
    tap = TextAwarePooling(8, attn_dim=4)
    with torch.no_grad():
        for p in tap.parameters():
            p.add_(0.3 * torch.randn_like(p))
    weights = tap.attention(tap.prepare_audio(tokens), tap.prepare_text(text))
    assert weights.std(-1).mean() > 0.05  # attention really depends on the caption and token
    explicit = F.cosine_similarity(tap.pooled(tokens, text), text[None], dim=-1)
    torch.testing.assert_close(tap.cosine(tap.prepare_audio(tokens), tap.prepare_text(text)), explicit,
                               atol=1e-5, rtol=1e-5)
    # Scoring without autograd (in-place passes) equals the differentiable forward.
    torch.testing.assert_close(tap(tokens, text).detach() / tap.scale.detach(), explicit, atol=1e-5, rtol=1e-5)
    # The blockwise scorer gives the same matrix for any (rows, cols) block and chunk.
    score = tap.scorer(tokens, text, chunk=2)
    torch.testing.assert_close(score(slice(1, 4), slice(2, 7)), explicit[1:4, 2:7], atol=1e-5, rtol=1e-5)


def test_tap_learns_to_attend_to_the_described_token():
    """Each clip holds one informative token among noise; the caption names it. Mean pooling dilutes it,
    TAP trained with symmetric InfoNCE finds it, so retrieval R@1 rises above the mean-pooling start."""
    g = torch.Generator().manual_seed(0)
    n, length, dim = 24, 8, 16
    concepts = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    tokens = 1.5 * torch.randn(n, length, dim, generator=g)
    slot = torch.randint(0, length, (n,), generator=g)
    tokens[torch.arange(n), slot] = 4 * concepts
    text = concepts + 0.05 * torch.randn(n, dim, generator=g)
    clips = torch.arange(n)
    tap = TextAwarePooling(dim, attn_dim=8, logit_scale=10.0)

    def r1():
        ranks = retrieval_ranks(tap.scorer(tokens, text), n, np.arange(n), block=5)
        return metrics_from_ranks(ranks)["mean_r1"]

    torch.manual_seed(0)
    before = r1()
    optimizer = torch.optim.Adam(tap.parameters(), lr=1e-2)
    for _ in range(150):
        loss = symmetric_infonce(tap(tokens, text), clips, clips)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert r1() > before + 0.2


def test_parameter_count():
    tap = TextAwarePooling(8, attn_dim=4)
    assert tap.num_parameters == 2 * 16 + 2 * (8 * 4 + 4) + 2 * (64 + 8) + 1


def test_symmetric_infonce_treats_same_clip_pairs_as_positives():
    logits = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    loss = symmetric_infonce(logits, torch.tensor([0, 1]), torch.tensor([0, 0, 1]))
    a2t = -(0.5 * logits[0].log_softmax(0)[:2].sum() + logits[1].log_softmax(0)[2]) / 2
    cols = logits.log_softmax(0)
    t2a = -(cols[0, 0] + cols[0, 1] + cols[1, 2]) / 3
    assert float(loss) == pytest.approx(float((a2t + t2a) / 2), abs=1e-6)
    with pytest.raises(ValueError, match="matching text"):
        symmetric_infonce(logits, torch.tensor([0, 2]), torch.tensor([0, 0, 1]))
