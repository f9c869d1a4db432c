"""Synthetic ESC-50: loadable layout, determinism, balanced folds, learnable classes, atomic reuse."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_residual.data_processing import load_audio, load_esc50, make_synthetic_esc50, official_splits

SMALL = {"n_classes": 10, "clips_per_class": 5, "seconds": 1.0, "sample_rate": 16000}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_synthetic_esc50(tmp_path_factory.mktemp("syn") / "esc", **SMALL, seed=3)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_loads_with_distinct_class_names(dataset):
    table = load_esc50(dataset)
    assert len(table) == 50
    assert len(set(table.class_names)) == 10
    assert table.class_names[:5] == (
        "tone_220hz",
        "noise_band_300hz",
        "clicks_4_per_s",
        "chirp_up_300_1200hz",
        "am_tone_600hz_3_per_s",
    )
    info = sf.info(table.paths()[0])
    assert (info.samplerate, info.frames, info.subtype) == (16000, 16000, "PCM_16")
    first = table.filenames[0]
    assert first.startswith(f"{table.folds[0]}-") and first.endswith(f"-A-{table.labels[0]}.wav")


def test_folds_balanced_per_class(dataset):
    table = load_esc50(dataset)
    for label in range(10):
        assert np.bincount(table.folds[table.labels == label], minlength=6)[1:].tolist() == [1] * 5


def test_same_seed_byte_identical_other_seed_differs(tmp_path, dataset):
    again = make_synthetic_esc50(tmp_path / "again", **SMALL, seed=3)
    assert file_bytes(again) == file_bytes(dataset)
    other = make_synthetic_esc50(tmp_path / "other", **SMALL, seed=4)
    assert file_bytes(other)["audio/1-000000-A-0.wav"] != file_bytes(dataset)["audio/1-000000-A-0.wav"]


def test_clips_of_a_class_differ(dataset):
    table = load_esc50(dataset)
    first, second = (load_audio(p) for p in table.subset(np.flatnonzero(table.labels == 0)[:2]).paths())
    assert not np.allclose(first, second, atol=1e-3)


def log_band_energies(audio: np.ndarray, n_bands: int = 48) -> np.ndarray:
    power = np.abs(np.fft.rfft(audio)) ** 2
    edges = np.geomspace(1, power.size, n_bands + 1).astype(int)
    return np.log(
        np.array([power[a : max(b, a + 1)].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])
        + 1e-10
    )


def test_classes_are_learnable_by_nearest_centroid(dataset):
    """A trivial spectral classifier, cross-validated over the official folds, should nearly ace it."""
    table = load_esc50(dataset)
    features = np.stack([log_band_energies(load_audio(p)) for p in table.paths()])
    correct = 0
    for split in official_splits(table):
        centroids = np.stack(
            [features[split.train][table.labels[split.train] == c].mean(0) for c in range(10)]
        )
        distances = ((features[split.test][:, None, :] - centroids[None]) ** 2).sum(-1)
        correct += int((distances.argmin(1) == table.labels[split.test]).sum())
    assert correct / len(table) >= 0.9


def test_existing_set_reused_without_rewrite(tmp_path):
    root = make_synthetic_esc50(tmp_path / "s", n_classes=2, clips_per_class=2, seconds=0.5)
    wav = next((root / "audio").iterdir())
    mtime = wav.stat().st_mtime_ns
    assert make_synthetic_esc50(tmp_path / "s", n_classes=2, clips_per_class=2, seconds=0.5) == root
    assert wav.stat().st_mtime_ns == mtime
    assert json.loads((root / "meta" / "generator.json").read_text())["clips_per_class"] == 2


def test_changed_parameters_regenerate(tmp_path):
    make_synthetic_esc50(tmp_path / "s", n_classes=2, clips_per_class=2, seconds=0.5)
    root = make_synthetic_esc50(tmp_path / "s", n_classes=3, clips_per_class=2, seconds=0.5)
    assert len(load_esc50(root)) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging or old folders left behind


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = sf.write
    monkeypatch.setattr(sf, "write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_esc50(tmp_path / "s", n_classes=2, clips_per_class=2, seconds=0.5)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_esc50(tmp_path / "mine", n_classes=2, clips_per_class=2, seconds=0.5)


def test_too_many_classes_for_sample_rate(tmp_path):
    with pytest.raises(ValueError, match=r"too close to Nyquist at 8000 Hz"):
        make_synthetic_esc50(tmp_path / "s", n_classes=20, clips_per_class=1, sample_rate=8000)
    assert list(tmp_path.iterdir()) == []


# --- generated captioned audio: the held-out split of the tiny CLAP ------------------------------------------
def _matches(attributes, combination) -> bool:
    return all(attributes.get(name) == value for name, value in combination.items())


def test_seen_draws_never_hold_a_held_out_combination_and_held_out_draws_always_do():
    from audio_residual.data_processing.synthetic_captions import HELD_OUT_COMBINATIONS, draw_clip_attributes

    rng = np.random.default_rng(0)
    seen = [draw_clip_attributes(rng, "seen") for _ in range(500)]
    held = [draw_clip_attributes(rng, "held_out") for _ in range(300)]
    assert not any(_matches(a, c) for a in seen for c in HELD_OUT_COMBINATIONS)
    assert all(sum(_matches(a, c) for c in HELD_OUT_COMBINATIONS) == 1 for a in held)
    for combination in HELD_OUT_COMBINATIONS:  # each drawn, and each of its attributes free otherwise
        theirs = [a for a in held if _matches(a, combination)]
        assert len(theirs) > 50 and {a["loudness"] for a in theirs} == {"quiet", "loud"}
    with pytest.raises(ValueError, match="combinations must be one of"):
        draw_clip_attributes(rng, "unseen")


def test_held_out_captions_always_name_the_combination_in_held_out_shapes():
    from audio_residual.data_processing.synthetic_captions import (
        compose_caption,
        draw_clip_attributes,
        held_out_combination,
    )

    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(200):
        attributes = draw_clip_attributes(rng, "held_out")
        caption = compose_caption(attributes, rng, held_out=True).lower().rstrip(".")
        words = caption.replace(",", " ").split()
        assert set(held_out_combination(attributes).values()) <= set(words), caption
        starts.add(" ".join(words[:2]))
    # the three held-out shapes: "the <noun> starts ...", "it is ...", "a|an <family> sound that is ..."
    assert {"it is", "a hum", "the high"} <= starts and not starts & {"this is", "the sound"}


def test_generated_caption_sets_record_their_combinations(tmp_path):
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

    root = make_synthetic_captions(tmp_path / "held", n_clips=6, captions_per_clip=2, seconds=0.2, seed=0,
                                   combinations="held_out")
    assert json.loads((root / "meta" / "generator.json").read_text())["combinations"] == "held_out"
    with pytest.raises(ValueError, match="combinations must be one of"):
        make_synthetic_captions(tmp_path / "bad", n_clips=6, combinations="novel")
