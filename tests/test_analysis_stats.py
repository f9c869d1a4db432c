"""Streaming residual statistics: exact against captured activations, bounded, fitted only on given clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_residual.analysis import Moments, ResidualStatistics, StreamingMoments, pca_from_moments
from audio_residual.analysis.stats import FP32_EPS
from audio_residual.clap.hooks import ClapHooks, audio_encoder


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 1001, 64)).astype(np.float32)


def _cov(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = rows.reshape(-1, rows.shape[-1]).double()
    return rows.mean(0), torch.cov(rows.T, correction=0)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(expected.abs().max())
    assert float((actual - expected).abs().max()) <= rel * scale + 1e-12


@pytest.fixture(scope="module")
def features():
    return _features(3)


@pytest.fixture(scope="module")
def fitted(tiny_bundle, features):
    # batch_size 2 over 3 clips: two uneven batches exercise the streaming update.
    return ResidualStatistics.fit(tiny_bundle.model, features, np.arange(3), batch_size=2, metadata={"fold": 1})


@pytest.fixture(scope="module")
def captured(tiny_bundle, features):
    names = lambda name: name.endswith(("hook_attn_out", "hook_mlp_out", "attn.hook_result"))  # noqa: E731
    with torch.no_grad():
        _, cache = ClapHooks(tiny_bundle.model).run_with_cache(torch.from_numpy(features), names)
    return cache


def test_moments_equal_torch_cov_of_captured_activations(fitted, captured):
    for block, parts in fitted.blocks.items():
        for kind, site in (("attn", "hook_attn_out"), ("mlp", "hook_mlp_out")):
            mean, cov = _cov(captured[f"{block}.{site}"])
            _close(parts[kind].mean, mean)
            _close(parts[kind].cov, cov)
            assert parts[kind].count == captured[f"{block}.{site}"].shape[0] * captured[f"{block}.{site}"].shape[1]
        result = captured[f"{block}.attn.hook_result"]
        for h in range(fitted.num_heads(block)):
            mean, cov = _cov(result[..., h, :])
            head = fitted.head_moments(block, h)
            _close(head.mean, mean)
            _close(head.cov, cov)


def test_head_pca_matches_pca_of_head_moments(fitted):
    for block in fitted.blocks:
        for h in range(fitted.num_heads(block)):
            fast = fitted.head_pca(block, h)
            exact = pca_from_moments(fast.name, fitted.head_moments(block, h))
            k = min(len(fast.eigenvalues), len(exact.eigenvalues), fitted.head_dim(block))
            assert len(fast.eigenvalues) <= fitted.head_dim(block)
            _close(fast.eigenvalues[:k], exact.eigenvalues[:k], rel=1e-8)
            assert fast.total_variance == pytest.approx(exact.total_variance, rel=1e-8)
            # Same subspace and spectrum: the basis rebuilds the head covariance up to the float32 resolution
            # below which directions are cut (robust to degenerate tails), and a well-separated leading
            # direction agrees up to sign.
            rebuilt = fast.components.T @ torch.diag(fast.eigenvalues) @ fast.components
            resolution = fitted.head_dim(block) * FP32_EPS * float(exact.eigenvalues[0])
            assert float((rebuilt - fitted.head_moments(block, h).cov).abs().max()) <= resolution
            if exact.eigenvalues[0] > 1.05 * exact.eigenvalues[1]:
                assert abs(float(fast.components[0] @ exact.components[0])) == pytest.approx(1.0, abs=1e-6)


def test_layer_pooling_equals_moments_of_concatenated_tokens(fitted, captured):
    pooled = fitted.unit_moments("layer", "attn")
    for stage in fitted.stages():
        tokens = [captured[f"{block}.hook_attn_out"].reshape(-1, pooled[f"layers.{stage}.attn"].mean.shape[0])
                  for block in fitted.blocks_of(stage)]
        mean, cov = _cov(torch.cat(tokens))
        _close(pooled[f"layers.{stage}.attn"].mean, mean)
        _close(pooled[f"layers.{stage}.attn"].cov, cov)
        assert pooled[f"layers.{stage}.attn"].count == sum(len(t) for t in tokens)


def test_save_load_round_trip_is_exact(fitted, tmp_path):
    path = fitted.save(tmp_path / "stats.safetensors")
    loaded = ResidualStatistics.load(path)
    assert loaded.metadata == fitted.metadata and loaded.metadata["fold"] == 1
    assert loaded.blocks.keys() == fitted.blocks.keys()
    for block, parts in fitted.blocks.items():
        assert torch.equal(loaded.w_out[block], fitted.w_out[block])
        for kind, m in parts.items():
            assert torch.equal(loaded.blocks[block][kind].mean, m.mean)
            assert torch.equal(loaded.blocks[block][kind].cov, m.cov)
            assert loaded.blocks[block][kind].count == m.count


def test_streaming_moments_state_does_not_grow_and_is_accurate_with_offset():
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.standard_normal((3, 500, 5)) * 0.01 + 1000.0).float()
    acc = StreamingMoments(5)
    acc.update(data[0])
    sizes = [t.shape for t in (acc.sum, acc.sum_outer, acc.shift)]
    acc.update(data[1])
    acc.update(data[2])
    assert [t.shape for t in (acc.sum, acc.sum_outer, acc.shift)] == sizes
    mean, cov = acc.mean_cov()
    ref_mean, ref_cov = _cov(data)
    _close(mean, ref_mean, rel=1e-9)
    _close(cov, ref_cov, rel=1e-4)  # variance 1e-4 next to a mean of 1e3: no cancellation


def test_fitted_statistics_have_the_same_size_for_more_clips(tiny_bundle):
    x = _features(3, seed=1)
    one = ResidualStatistics.fit(tiny_bundle.model, x, [0], batch_size=1, tokens_per_clip=16)
    three = ResidualStatistics.fit(tiny_bundle.model, x, [0, 1, 2], batch_size=1, tokens_per_clip=16)
    shapes = lambda s: {(b, k): (m.mean.shape, m.cov.shape) for b, p in s.blocks.items() for k, m in p.items()}  # noqa: E731
    assert shapes(one) == shapes(three)
    assert three.blocks["layers.0.blocks.0"]["z"].count == 3 * one.blocks["layers.0.blocks.0"]["z"].count


def test_fit_uses_only_the_index_set(tiny_bundle):
    x = _features(4, seed=2)
    before = ResidualStatistics.fit(tiny_bundle.model, x, [0, 2], batch_size=2, tokens_per_clip=32)
    x[[1, 3]] = 5.0 * _features(2, seed=3)
    after = ResidualStatistics.fit(tiny_bundle.model, x, [0, 2], batch_size=2, tokens_per_clip=32)
    changed = ResidualStatistics.fit(tiny_bundle.model, x, [0, 1], batch_size=2, tokens_per_clip=32)
    for block, parts in before.blocks.items():
        for kind, m in parts.items():
            assert torch.equal(after.blocks[block][kind].mean, m.mean)
            assert torch.equal(after.blocks[block][kind].cov, m.cov)
    assert not torch.equal(changed.blocks["layers.0.blocks.0"]["z"].mean, before.blocks["layers.0.blocks.0"]["z"].mean)
    assert before.metadata["clips"] == 2


def test_empty_index_set_is_a_clear_error(tiny_bundle):
    with pytest.raises(ValueError, match="empty"):
        ResidualStatistics.fit(tiny_bundle.model, _features(1), [])


def test_tokens_per_clip_subsampling_counts(tiny_bundle):
    stats = ResidualStatistics.fit(tiny_bundle.model, _features(2, seed=4), [0, 1], batch_size=2, tokens_per_clip=100)
    grid = audio_encoder(tiny_bundle.model).input_resolutions  # tokens per clip: height × width per stage
    assert max(h * w for h, w in grid) > 100 > min(h * w for h, w in grid)  # both cases are exercised
    for block, parts in stats.blocks.items():
        height, width = grid[int(block.split(".")[1])]
        expected = 2 * min(100, height * width)
        assert parts["z"].count == parts["attn"].count == parts["mlp"].count == expected
        assert stats.metadata["tokens_seen"][block] == expected
    assert stats.metadata["tokens_per_clip"] == 100


def test_pool_of_moments_is_law_of_total_covariance():
    rng = np.random.default_rng(5)
    a, b = torch.from_numpy(rng.standard_normal((40, 3))), torch.from_numpy(rng.standard_normal((60, 3)) + 2)
    parts = [Moments(*_cov(t), len(t)) for t in (a, b)]
    pooled = Moments.pool(parts)
    mean, cov = _cov(torch.cat([a, b]))
    _close(pooled.mean, mean, rel=1e-12)
    _close(pooled.cov, cov, rel=1e-12)


def test_few_clips_keep_at_most_rank_components(tiny_bundle):
    """n tokens span at most n − 1 centred directions; float32 noise above 1e-10 · λ_max must not add more."""
    one_clip = ResidualStatistics.fit(tiny_bundle.model, _features(1), np.arange(1), batch_size=1)
    checked, noise_kept_before = 0, 0
    for granularity, kind in (("head", "attn"), ("block", "attn"), ("block", "mlp"), ("layer", "attn"), ("layer", "mlp")):
        moments = one_clip.unit_moments(granularity, kind)
        for name, basis in one_clip.pca(granularity, kind).items():
            rank_bound = moments[name].count - 1
            assert len(basis.eigenvalues) <= rank_bound, (name, len(basis.eigenvalues), rank_bound)
            checked += 1
            noise_kept_before += len(pca_from_moments(name, moments[name], rel_tol=1e-10).eigenvalues) > rank_bound
    assert checked > 20 and noise_kept_before > 0  # the former cut-off kept noise on these very units
