"""End to end: `audio-residual analyze` on generated data with the tiny model writes sane outputs."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from audio_residual.analysis import ResidualStatistics
from audio_residual.cli import main

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    from audio_residual.data_processing import make_synthetic_esc50

    root = tmp_path_factory.mktemp("analyze")
    data = make_synthetic_esc50(root / "data", n_classes=3, clips_per_class=5, seconds=5.0, seed=0)
    out = root / "out"
    argv = ["analyze", "--data", str(data), "--model", "tiny-random", "--fold", "1", "--out", str(out)]
    argv += ["--cache", str(root / "cache"), "--device", "cpu", "--batch-size", "8", "--pattern-cap", "32"]
    argv += ["--ablation-stages", "2,3", "--ablation-max-clips", "2", "--tokens-per-clip", "200"]
    assert main(argv) == 0
    return data, out, root


def test_outputs_exist(analyzed):
    _, out, _ = analyzed
    expected = ["stats_fold1.safetensors", "heads.csv", "ablation.csv", "summary.json", "id90_heads.png", "ablation.png"]
    for name in expected:
        assert (out / name).stat().st_size > 0, name
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 6 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_statistics_fitted_on_training_folds_only(analyzed):
    _, out, _ = analyzed
    stats = ResidualStatistics.load(out / "stats_fold1.safetensors")
    meta = stats.metadata
    assert meta["fold"] == 1 and meta["model_id"] == "tiny-random" and meta["fit_on"] == "train"
    assert meta["train_folds"] == [2, 3, 4, 5] and meta["clips"] == 12  # 15 clips, 3 in test fold 1
    assert meta["tokens_per_clip"] == 200
    assert all(count <= 12 * 200 for count in meta["tokens_seen"].values())


def test_heads_table_has_one_sane_row_per_unit(analyzed):
    _, out, _ = analyzed
    stats = ResidualStatistics.load(out / "stats_fold1.safetensors")
    table = pd.read_csv(out / "heads.csv")
    n_heads = sum(stats.num_heads(b) for b in stats.blocks)
    n_blocks, n_stages = len(stats.blocks), len(stats.stages())
    contribution = table[table["view"] == "contribution"]
    assert contribution["unit"].is_unique and len(contribution) == n_heads + 2 * n_blocks + 2 * n_stages
    pattern = table[table["view"] == "pattern"]
    assert pattern["unit"].is_unique and len(pattern) == n_heads
    heads = contribution[contribution["granularity"] == "head"]
    d_head = heads["unit"].map(lambda u: stats.head_dim(u.split(".attn")[0]))
    assert (heads["rank"] <= d_head).all()
    assert (table["id90"] >= 1).all() and (table["id90"] <= table["id95"]).all()
    assert (table["id95"] <= table["id99"]).all() and (table["id99"] <= table["rank"]).all()
    assert ((table["participation_ratio"] >= 1 - 1e-9) & (table["participation_ratio"] <= table["rank"] + 1e-9)).all()
    assert ((table["top_evr"] > 0) & (table["top_evr"] <= 1)).all()


def test_ablation_table(analyzed):
    _, out, _ = analyzed
    ablation = pd.read_csv(out / "ablation.csv")
    stats = ResidualStatistics.load(out / "stats_fold1.safetensors")
    assert len(ablation) == sum(stats.num_heads(b) for s in (2, 3) for b in stats.blocks_of(s))
    assert (ablation["clips"] == 2).all()
    np.testing.assert_allclose(ablation["delta"], ablation["accuracy"] - ablation["base_accuracy"])


def test_unknown_fold_is_a_clear_error(analyzed, capsys):
    data, out, root = analyzed
    argv = ["analyze", "--data", str(data), "--model", "tiny-random", "--fold", "9", "--out", str(root / "other")]
    assert main([*argv, "--cache", str(root / "cache"), "--device", "cpu"]) == 2
    assert "no fold 9" in capsys.readouterr().err
