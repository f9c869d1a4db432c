"""The published checkpoints' audio geometries (random weights, saved with save_pretrained) through the
command line: zero-shot, statistics and a λ step; exact decomposition and λ = 1 identity on each."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_fusion import _lengthen
from test_hooks import _check_decomposition

from audio_residual.analysis import ResidualStatistics
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.tiny import REAL_GEOMETRIES, build_real_geometry_random
from audio_residual.cli import main
from audio_residual.data_processing import make_synthetic_esc50
from audio_residual.data_processing.datasets import ESC50_CSV
from audio_residual.residual.units import ResiDual, ResidualConfig


@pytest.fixture(scope="module")
def two_clips(tmp_path_factory):
    """Two clips of two classes in folds 1 and 2; the fold-2 (training) clip lasts 12 s."""
    data = make_synthetic_esc50(tmp_path_factory.mktemp("two") / "data", n_classes=2, clips_per_class=2, n_folds=2)
    csv = pd.read_csv(data / ESC50_CSV)
    keep = csv[csv["fold"] - 1 == csv["target"]]
    keep.to_csv(data / ESC50_CSV, index=False)
    for name in set(csv["filename"]) - set(keep["filename"]):
        (data / "audio" / name).unlink()
    _lengthen(data, keep.loc[keep["fold"] == 2, "filename"].tolist())
    return data


@pytest.mark.parametrize("model_id", sorted(REAL_GEOMETRIES))
def test_real_geometry_through_the_command_line(model_id, two_clips, tmp_path, capsys, single_thread):
    model, processor = build_real_geometry_random(model_id, ("a", "b"))
    saved = tmp_path / "model"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    fusion = model.config.audio_config.enable_fusion
    assert fusion == (model_id == "laion/clap-htsat-fused")

    common = ["--data", str(two_clips), "--model", str(saved), "--cache", str(tmp_path / "cache"),
              "--device", "cpu", "--batch-size", "2"]
    assert main(["zeroshot", *common, "--out", str(tmp_path / "zs")]) == 0
    assert pd.read_csv(tmp_path / "zs" / "zeroshot.csv")["n"].sum() == 2
    train = tmp_path / "train"
    assert main(["train-residual", *common, "--out", str(train), "--granularity", "layer", "--epochs", "1",
                 "--folds", "1", "--val-fraction", "0"]) == 0
    capsys.readouterr()
    provenance = json.loads((train / "provenance.json").read_text())
    assert provenance["enable_fusion"] == fusion and provenance["truncation"] == ("fusion" if fusion else "rand_trunc")
    (stats_file,) = (train / "stats").glob("*.safetensors")
    stats = ResidualStatistics.load(stats_file)
    assert stats.metadata["clips"] == 1 and stats.metadata["provenance"] == provenance
    depths = model.config.audio_config.depths
    assert len(stats.blocks) == sum(depths)
    (history,) = train.glob("runs/*/fold1/history.csv")
    assert len(pd.read_csv(history)) == 1  # one epoch of one step

    _check_decomposition(model, batch=1)
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="head"))
    x = torch.randn(2, 4 if fusion else 1, 1001, 64, generator=torch.Generator().manual_seed(1))
    is_longer = torch.tensor([[True], [False]]) if fusion else None
    with torch.no_grad():
        plain = audio_embeddings(model, x, is_longer)
        with residual.attached(model):
            edited = audio_embeddings(model, x, is_longer)
    assert residual.num_parameters() > 1000
    assert (edited - plain).abs().max() <= 1e-5
    assert np.isfinite(plain.numpy()).all()
