"""LAION's two audio recipes: sample counts and padding of what reaches the mel front end, cache keys, provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from audio_residual.clap.tiny import hub_feature_extractor
from audio_residual.data_processing.audio import load_audio
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.data_processing.datasets import ClipTable
from audio_residual.data_processing.features import FeatureCache
from audio_residual.data_processing.recipes import LAION_FILELIST, LAION_TRAINING, librosa_length, resample

TEN_SECONDS = 480_000

# (seconds, source rate) → samples at 48 kHz per recipe, then repeat-pad: copies and trailing zeros.
CASES = {
    "5s-44.1k": (5, 44_100, {LAION_TRAINING: (240_000, 2, 0), LAION_FILELIST: (240_001, 1, 239_999)}),
    "2s-44.1k": (2, 44_100, {LAION_TRAINING: (96_000, 5, 0), LAION_FILELIST: (96_001, 4, 95_996)}),
    "3s-44.1k": (3, 44_100, {LAION_TRAINING: (144_000, 3, 48_000), LAION_FILELIST: (144_000, 3, 48_000)}),
    "3s-48k": (3, 48_000, {LAION_TRAINING: (144_000, 3, 48_000), LAION_FILELIST: (144_000, 3, 48_000)}),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    for name, (seconds, rate, _) in CASES.items():
        t = np.arange(seconds * rate) / rate
        tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(folder / f"{name}.wav", tone.astype(np.float32), rate, subtype="FLOAT")
    return folder


def test_librosa_length_rule():
    """ceil of the float product: a hair above 240000 at 44.1 kHz, exact where the ratio is exact."""
    assert librosa_length(220_500, 44_100, 48_000) == 240_001
    assert librosa_length(88_200, 44_100, 48_000) == 96_001
    assert librosa_length(132_300, 44_100, 48_000) == 144_000
    assert librosa_length(110_250, 22_050, 48_000) == 240_001


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("recipe", [LAION_TRAINING, LAION_FILELIST])
def test_sample_counts_and_padding(clips, name, recipe):
    samples, copies, zeros = CASES[name][2][recipe]
    audio = load_audio(clips / f"{name}.wav", recipe=recipe)
    assert audio.size == samples
    if samples == 240_001 or samples == 96_001:
        assert audio[-1] == 0.0  # the sample librosa's length fix appends
    assert copies == TEN_SECONDS // samples and zeros == TEN_SECONDS - copies * samples

    # What the extractor actually computes equals the mel of the clip repeated `copies` times, then zeros.
    extractor = hub_feature_extractor(enable_fusion=False)
    table = ClipTable("recipes", clips, (f"{name}.wav",), np.zeros(1), np.ones(1), ("tone",))
    cache = FeatureCache(clips / "cache", extractor, AudioConfig(recipe=recipe))
    cached = cache.compute(table).input_features[0]
    padded = np.concatenate([np.tile(audio, copies), np.zeros(zeros, dtype=np.float32)])
    explicit = extractor(padded, sampling_rate=48_000, truncation="rand_trunc", return_tensors="np")
    np.testing.assert_allclose(cached, explicit["input_features"][0], atol=1e-5)


def test_the_recipes_differ_exactly_where_librosa_adds_a_sample(clips):
    extractor = hub_feature_extractor(enable_fusion=False)
    names = tuple(f"{name}.wav" for name in CASES)
    table = ClipTable("recipes", clips, names, np.zeros(len(names)), np.ones(len(names)), ("tone",))
    features = {
        recipe: FeatureCache(clips / "cache", extractor, AudioConfig(recipe=recipe)).compute(table)
        for recipe in (LAION_TRAINING, LAION_FILELIST)
    }
    training, filelist = features[LAION_TRAINING], features[LAION_FILELIST]
    assert training.config_hash != filelist.config_hash  # the cache key includes the recipe
    assert (training.preprocessing["recipe"], filelist.preprocessing["recipe"]) == (LAION_TRAINING, LAION_FILELIST)
    differs = [bool(np.abs(a - b).max() > 1e-3) for a, b in zip(training.input_features, filelist.input_features, strict=True)]
    assert differs == [True, True, False, False]  # 5 s and 2 s at 44.1 kHz; not 3 s


def test_filelist_resampling_is_soxr_then_librosas_fix():
    """Same resampler as the default, then zero-padded to librosa's length: the samples before agree."""
    audio = np.random.default_rng(1).standard_normal(220_500).astype(np.float32)
    training = resample(audio, 44_100, 48_000, LAION_TRAINING)
    filelist = resample(audio, 44_100, 48_000, LAION_FILELIST)
    np.testing.assert_array_equal(filelist[:-1], training)
    with pytest.raises(ValueError, match="recipe must be one of laion-training, laion-filelist"):
        resample(audio, 44_100, 48_000, "librosa")
    with pytest.raises(ValueError, match="recipe must be one of laion-training, laion-filelist"):
        AudioConfig(recipe="librosa")


def test_cli_records_the_recipe(small_data, tmp_path):
    from audio_residual.cli import main

    out = tmp_path / "out"
    args = ["zeroshot", "--data", str(small_data), "--model", "tiny-random", "--out", str(out),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", "--recipe", LAION_FILELIST]
    assert main(args) == 0
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["recipe"] == LAION_FILELIST and provenance["audio"]["recipe"] == LAION_FILELIST
