"""The analysis collects statistics and attention patterns in one forward, with the same results as two."""

from __future__ import annotations

import numpy as np
import torch

from audio_residual.analysis.patterns import PatternReservoir, collect_patterns
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.hooks import audio_encoder


def test_patterns_ride_the_statistics_pass(tiny_bundle):
    model = tiny_bundle.model
    x = np.random.default_rng(0).standard_normal((6, 1, 1001, 64)).astype(np.float32)
    rows = np.arange(6)
    calls = []
    handle = audio_encoder(model).patch_embed.register_forward_hook(lambda *_: calls.append(1))
    try:
        reservoir = PatternReservoir(cap=40, seed=0)
        stats = ResidualStatistics.fit(model, x, rows, batch_size=4, extra_hooks=[("*.attn.hook_pattern", reservoir.hook)])
    finally:
        handle.remove()
    assert len(calls) == 2  # one forward per batch, not two
    separate = collect_patterns(model, x, rows, cap=40, batch_size=4, seed=0)
    assert reservoir.seen == separate.seen
    for block, samples in separate.samples.items():
        assert torch.equal(reservoir.samples[block], samples)
    alone = ResidualStatistics.fit(model, x, rows, batch_size=4)
    for block, parts in alone.blocks.items():
        for kind, moments in parts.items():
            assert torch.equal(stats.blocks[block][kind].cov, moments.cov)
