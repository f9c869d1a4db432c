"""Spectra summaries against hand-computed values; pattern PCA via Gram matrix and its bounded reservoir."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from audio_residual.analysis import (
    TABLE_COLUMNS,
    Moments,
    PatternReservoir,
    ResidualStatistics,
    collect_patterns,
    gram_eigenvalues,
    intrinsic_dimension,
    parse_unit,
    participation_ratio,
    spectra_table,
    spectrum_summary,
)
from audio_residual.clap.hooks import audio_encoder

BLOCK = "layers.0.blocks.0"


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.from_numpy(np.random.default_rng(seed).standard_normal((d, d))))
    return q


def _known_stats() -> ResidualStatistics:
    """One block, one head, d = 4: context covariance with eigenvalues 4, 2, 1, 1; MLP with 3, 1, 0, 0."""
    q, w = _rotation(4, 0), _rotation(4, 1)  # an orthogonal W_O keeps the spectrum in residual space
    z_cov = q @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)) @ q.T
    mlp_cov = q @ torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)) @ q.T
    zero = torch.zeros(4, dtype=torch.float64)
    blocks = {
        BLOCK: {
            "z": Moments(zero, z_cov, 10),
            "attn": Moments(zero, w @ z_cov @ w.T, 10),
            "mlp": Moments(zero, mlp_cov, 10),
        }
    }
    return ResidualStatistics(blocks, {BLOCK: w}, {"heads": {BLOCK: 1}})


def test_summary_of_known_spectrum():
    summary = spectrum_summary([4.0, 2.0, 1.0, 1.0])  # EVR 0.5, 0.25, 0.125, 0.125
    assert summary["participation_ratio"] == pytest.approx(64 / 22, rel=1e-12)
    assert (summary["id90"], summary["id95"], summary["id99"]) == (4, 4, 4)
    assert summary["top_evr"] == 0.5 and summary["total_variance"] == 8.0 and summary["rank"] == 4
    evr = np.array([0.5, 0.25, 0.125, 0.125])
    assert [intrinsic_dimension(evr, p) for p in (0.5, 0.75, 0.76, 0.875, 0.9)] == [1, 2, 3, 3, 4]
    assert participation_ratio([1.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert participation_ratio([5.0, 0.0]) == pytest.approx(1.0)


def test_dropped_variance_counts_against_the_thresholds():
    # The basis kept 4 directions but the covariance trace is 10: cumulative EVR stops at 0.8.
    summary = spectrum_summary([4.0, 2.0, 1.0, 1.0], total_variance=10.0)
    assert summary["top_evr"] == pytest.approx(0.4)
    assert summary["id90"] == 4  # never reached: every kept component


def test_spectra_table_on_known_covariance():
    table = spectra_table(_known_stats())
    assert list(table.columns) == TABLE_COLUMNS
    assert set(zip(table["granularity"], table["kind"], strict=True)) == {
        ("head", "attn"), ("block", "attn"), ("block", "mlp"), ("layer", "attn"), ("layer", "mlp")
    }
    assert table["unit"].is_unique
    head = table[table["granularity"] == "head"].iloc[0]
    assert head["unit"] == f"{BLOCK}.attn.head.0"
    assert (head["stage"], head["block"], head["head"], head["dim"], head["rank"]) == (0, 0.0, 0.0, 4, 4)
    assert head["participation_ratio"] == pytest.approx(64 / 22, rel=1e-9)
    assert head["total_variance"] == pytest.approx(8.0) and head["top_evr"] == pytest.approx(0.5)
    assert head["samples"] == 10
    mlp = table[(table["granularity"] == "block") & (table["kind"] == "mlp")].iloc[0]
    assert mlp["rank"] == 2 and (mlp["id90"], mlp["id95"], mlp["id99"]) == (2, 2, 2)  # EVR 0.75, 0.25
    assert mlp["participation_ratio"] == pytest.approx(16 / 10, rel=1e-9)
    layer = table[(table["granularity"] == "layer") & (table["kind"] == "attn")].iloc[0]
    assert math.isnan(layer["block"]) and math.isnan(layer["head"]) and layer["unit"] == "layers.0.attn"
    assert layer["participation_ratio"] == pytest.approx(64 / 22, rel=1e-9)  # one block: same as the block


def test_parse_unit_names():
    assert parse_unit("layers.2.blocks.5.attn.head.13") == (2, 5.0, 13.0)
    assert parse_unit("layers.1.mlp")[0] == 1 and math.isnan(parse_unit("layers.1.mlp")[1])
    with pytest.raises(ValueError, match="unit name"):
        parse_unit("blocks.1.attn")


def test_gram_route_equals_covariance_route():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((20, 50)))
    via_gram = gram_eigenvalues(x)
    centred = x - x.mean(0)
    via_cov = torch.linalg.eigvalsh(centred.T @ centred / len(x)).flip(0)
    assert len(via_gram) == 20
    torch.testing.assert_close(via_gram[:19], via_cov[:19], rtol=1e-8, atol=0)
    assert float(via_gram[19]) <= 1e-10 * float(via_gram[0])  # centring costs one dimension


def test_reservoir_never_exceeds_cap_and_keeps_offered_windows():
    reservoir = PatternReservoir(cap=16, seed=0)
    offered = []
    for batch in range(10):
        patterns = torch.rand(37, 2, 4, 4)
        offered.append(patterns.reshape(37, 2, -1).half())
        reservoir.add(BLOCK, patterns)
        assert reservoir.samples[BLOCK].shape == (min(16, 37 * (batch + 1)), 2, 16)
    assert reservoir.seen[BLOCK] == 370
    every = torch.cat(offered)
    for row in reservoir.samples[BLOCK]:
        assert (every == row).all(dim=(1, 2)).any()  # a stored window is one of the offered ones, intact


def test_reservoir_sample_is_uniform_over_the_stream():
    reservoir = PatternReservoir(cap=50, seed=1)
    for start in range(0, 1000, 64):
        ids = torch.arange(start, min(start + 64, 1000), dtype=torch.float32)
        reservoir.add(BLOCK, ids.reshape(-1, 1, 1, 1))
    kept = reservoir.samples[BLOCK][:, 0, 0].float().numpy()
    assert len(np.unique(kept)) == 50
    assert abs(kept.mean() - 499.5) < 4 * 289 / np.sqrt(50)  # not just the first (or last) windows
    again = PatternReservoir(cap=50, seed=1)
    for start in range(0, 1000, 64):
        again.add(BLOCK, torch.arange(start, min(start + 64, 1000), dtype=torch.float32).reshape(-1, 1, 1, 1))
    assert torch.equal(again.samples[BLOCK], reservoir.samples[BLOCK])  # seeded: reproducible


def test_pattern_table_from_tiny_model(tiny_bundle):
    x = np.random.default_rng(0).standard_normal((2, 1, 1001, 64)).astype(np.float32)
    reservoir = collect_patterns(tiny_bundle.model, x, [0, 1], cap=24, stages=(2, 3))
    table = reservoir.table()
    assert list(table.columns) == TABLE_COLUMNS
    assert len(table) == 4 + 4 + 4 and set(table["stage"]) == {2, 3}  # heads of stages 2 and 3 only
    encoder = audio_encoder(tiny_bundle.model)
    for row in table.itertuples():
        window = encoder.layers[row.stage].blocks[int(row.block)].window_size
        (height, width), kept = encoder.input_resolutions[row.stage], reservoir.seen[row.unit.split(".attn")[0]]
        assert row.view == "pattern" and row.dim == window**4  # a w²×w² pattern per window
        assert kept == 2 * -(-height // window) * -(-width // window)  # every window of both clips offered
        assert row.samples == min(24, kept)
    assert ((table["rank"] <= table["samples"] - 1) & (table["id90"] <= table["id95"])).all()
    assert (table["id95"] <= table["id99"]).all() and (table["id99"] <= table["rank"]).all()
