"""Fusion checkpoints (`enable_fusion`): LAION's is_longer rule, batch-independent embeddings, truncation
following the model, every command on a tiny fused model, provenance records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from transformers import ClapFeatureExtractor

from audio_residual.clap.batches import model_inputs
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import load_clap
from audio_residual.clap.tiny import build_tiny_clap
from audio_residual.cli import main
from audio_residual.data_processing import FeatureCache, load_dataset, make_synthetic_esc50

LONG_SECONDS = 12.0  # over the extractor's 10 s: these clips take the fusion branch


def _lengthen(data, names: list[str]) -> list[str]:
    """Tile the named clips of a generated set to LONG_SECONDS; returns the names."""
    for name in names:
        audio, rate = sf.read(data / "audio" / name, dtype="float32")
        sf.write(data / "audio" / name, np.tile(audio, 3)[: int(LONG_SECONDS * rate)], rate)
    return names


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """3 classes × 4 clips over 2 folds; two of the clips last 12 s, the others 5 s."""
    data = make_synthetic_esc50(tmp_path_factory.mktemp("mixed") / "data", n_classes=3, clips_per_class=4, n_folds=2)
    return data, _lengthen(data, sorted(p.name for p in (data / "audio").glob("*.wav"))[:2])


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory):
    """A tiny fused CLAP saved with save_pretrained, as a hub checkpoint would be."""
    model, processor = build_tiny_clap(("dog", "rain", "sea_waves"), enable_fusion=True)
    path = tmp_path_factory.mktemp("fused_model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused", "fused"])
def test_embedding_of_a_clip_is_the_same_alone_and_in_any_batch(fusion, mixed_data, tmp_path, single_thread):
    data, long_names = mixed_data
    model, processor = build_tiny_clap(("a", "b", "c"), enable_fusion=fusion)
    table = load_dataset(data)
    features = FeatureCache(tmp_path, processor.feature_extractor).compute(table)
    assert features.input_features.shape[1] == (4 if fusion else 1)  # fusion: global mel + 3 local crops
    is_long = np.isin(np.array(table.filenames), long_names)
    # LAION's rule: only clips over 10 s are "longer"; the extractor alone would flag every short clip.
    assert np.array_equal(features.is_longer, is_long)
    n = len(table)
    with torch.no_grad():
        alone = torch.cat([audio_embeddings(model, *model_inputs(features.input_features, np.array([i]), "cpu",
                                                                  features.is_longer)) for i in range(n)])
        order = np.random.default_rng(0).permutation(n)
        for size in (n, 5, 2):
            for start in range(0, n, size):
                rows = order[start : start + size]
                batch = audio_embeddings(model, *model_inputs(features.input_features, rows, "cpu", features.is_longer))
                assert (batch - alone[rows]).abs().max() <= 1e-5


def test_fused_model_uses_only_the_global_mel_of_short_clips(fused_dir, single_thread):
    model = load_clap(fused_dir, device="cpu").model
    x = torch.randn(2, 4, 1001, 64, generator=torch.Generator().manual_seed(0))
    noisy = x.clone()
    noisy[:, 1:] += 1.0  # the three local crops
    short, long = torch.zeros(2, 1, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        assert (audio_embeddings(model, x, short) - audio_embeddings(model, noisy, short)).abs().max() <= 1e-6
        assert (audio_embeddings(model, x, long) - audio_embeddings(model, noisy, long)).abs().max() > 1e-4


def test_transformers_extractor_alone_flags_a_short_clip_as_longer():
    """Why the cache sets is_longer itself: the extractor's per-call random pick."""
    extractor = ClapFeatureExtractor(frequency_min=50, truncation="fusion")
    out = extractor(np.zeros(48_000 * 5, dtype=np.float32) + 0.1, sampling_rate=48_000, return_tensors="np")
    assert bool(np.asarray(out["is_longer"]).reshape(-1)[0])


def test_fused_model_without_is_longer_is_a_clear_error(fused_dir):
    model = load_clap(fused_dir, device="cpu").model
    with pytest.raises(ValueError, match="is_longer"):
        audio_embeddings(model, torch.zeros(1, 4, 1001, 64))


def test_tiny_extractors_use_the_hub_values():
    for fusion, truncation in ((False, "rand_trunc"), (True, "fusion")):
        extractor = build_tiny_clap(enable_fusion=fusion)[1].feature_extractor
        assert (extractor.frequency_min, extractor.frequency_max) == (50, 14_000)
        assert extractor.truncation == truncation and extractor.padding == "repeatpad"


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused", "fused"])
def test_truncation_follows_the_model_with_a_warning_naming_both(fusion, tmp_path):
    model, processor = build_tiny_clap(("dog",), enable_fusion=fusion)
    wrong = "rand_trunc" if fusion else "fusion"
    right = "fusion" if fusion else "rand_trunc"
    processor.feature_extractor.truncation = wrong
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=f"truncation='{wrong}'.*enable_fusion={fusion}.*'{right}'"):
        bundle = load_clap(tmp_path, device="cpu")
    assert bundle.feature_extractor.truncation == right
    assert FeatureCache(tmp_path / "cache", bundle.feature_extractor).preprocessing["truncation"] == right


def test_cached_features_from_before_the_rule_are_not_reused(mixed_data, tmp_path):
    """The old cache kept the extractor's random flag: a format bump must put new rows elsewhere."""
    from audio_residual.data_processing import features as features_module

    extractor = build_tiny_clap(enable_fusion=True)[1].feature_extractor
    current = FeatureCache(tmp_path, extractor).config_dir
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features_module, "CACHE_FORMAT_VERSION", 1)
        assert FeatureCache(tmp_path, extractor).config_dir != current


def _read_header(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["metadata"])


def test_analyze_train_residual_and_experiment_run_on_a_fused_model(fused_dir, mixed_data, tmp_path, capsys):
    data, _ = mixed_data
    common = ["--data", str(data), "--model", str(fused_dir), "--cache", str(tmp_path / "cache"),
              "--device", "cpu", "--batch-size", "4"]
    analysis = tmp_path / "analysis"
    assert main(["analyze", *common, "--out", str(analysis), "--fold", "1", "--pattern-cap", "16",
                 "--ablation-stages", "3", "--ablation-max-clips", "2", "--tokens-per-clip", "50"]) == 0
    stats_meta = _read_header(analysis / "stats_fold1.safetensors")
    provenance = json.loads((analysis / "provenance.json").read_text())
    assert stats_meta["provenance"] == provenance
    assert provenance["enable_fusion"] is True and provenance["truncation"] == "fusion"
    assert provenance["model"] == str(fused_dir) and provenance["commit"] is None

    train = tmp_path / "train"
    assert main(["train-residual", *common, "--out", str(train), "--granularity", "layer", "--epochs", "1",
                 "--folds", "1", "--val-fraction", "0.2", "--tokens-per-clip", "50"]) == 0
    (lambda_file,) = train.glob("runs/*/fold1/lambda.safetensors")
    assert _read_header(lambda_file)["provenance"] == provenance

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"granularity": ["layer"], "lr": [0.1], "epochs": [1], "fold": [1, 2]}))
    experiment = tmp_path / "experiment"
    # every method family on the fused encoder, one epoch each (ResiDual's paper and coarse variants train the
    # same hooks as `residual`: nothing fusion-specific, and the paper preset's 30 epochs would dominate the suite)
    methods = "zeroshot,linear_probe,contrastive_adapter,tip_adapter,tip_adapter_f,coop,lora,residual"
    assert main(["experiment", *common, "--out", str(experiment), "--grid", str(grid), "--val-fraction", "0.2",
                 "--ablation-max-clips", "2", "--wandb", "disabled", "--methods", methods, "--epochs", "1"]) == 0
    assert (experiment / "report.md").is_file()
    rows = pd.read_csv(experiment / "results.csv")
    assert sorted(zip(rows["method"], rows["fold"], strict=True)) == sorted(
        (method, fold) for method in methods.split(",") for fold in (1, 2))
    assert json.loads((experiment / "provenance.json").read_text()) == provenance
    capsys.readouterr()


def test_zeroshot_prints_and_writes_provenance(fused_dir, mixed_data, tmp_path, capsys):
    data, _ = mixed_data
    out = tmp_path / "out"
    argv = ["zeroshot", "--data", str(data), "--model", str(fused_dir), "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--template", "A sound of {label}."]
    assert main(argv) == 0
    (printed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("provenance: ")]
    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance) == {"model", "revision", "commit", "transformers", "enable_fusion", "text_length",
                               "sample_rate", "int16_roundtrip", "truncation", "padding", "min_seconds", "recipe", "audio",
                               "templates", "dataset"}
    assert provenance["audio"] == {"recipe": "laion-training", "int16_roundtrip": True, "min_seconds": 1.0,
                                   "cache_check": "content", "workers": 1, "on_bad_file": "error"}
    assert provenance["templates"] == ["A sound of {label}."] and provenance["sample_rate"] == 48_000
    assert provenance["int16_roundtrip"] is True and provenance["padding"] == "repeatpad"
    assert json.loads(printed.removeprefix("provenance: ")) == provenance


def test_revision_of_a_local_folder_is_a_clear_error(fused_dir, mixed_data, tmp_path, capsys):
    data, _ = mixed_data
    argv = ["zeroshot", "--data", str(data), "--model", str(fused_dir), "--revision", "v1", "--out", str(tmp_path),
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(argv) == 2
    assert "revision 'v1'" in capsys.readouterr().err
