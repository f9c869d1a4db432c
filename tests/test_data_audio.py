"""Audio loading: resampling and downmixing of valid input, BadAudioError for each kind of bad file (refused
before decoding where the header already says so)."""

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio_residual.data_processing import MODEL_SAMPLE_RATE, BadAudioError, load_audio, load_many
from audio_residual.data_processing.audio import load_audio_checked


def tone(seconds: float, sample_rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = 44100, subtype: str = "PCM_16") -> Path:
    sf.write(path, audio, sample_rate, subtype=subtype)
    return path


def test_valid_clip_resampled_to_48k_float32(tmp_path):
    audio = load_audio(write_wav(tmp_path / "a.wav", tone(1.5, 44100)))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.size == 72000  # 1.5 s at 48 kHz


def test_8khz_is_resampled_not_rejected(tmp_path):
    audio = load_audio(write_wav(tmp_path / "low.wav", tone(2.0, 8000, freq=300.0), sample_rate=8000))
    assert audio.size == 2 * MODEL_SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * MODEL_SAMPLE_RATE / audio.size
    assert abs(peak_hz - 300.0) < 2.0


def test_stereo_with_identical_channels_equals_mono(tmp_path):
    mono = tone(1.2, 44100)
    from_mono = load_audio(write_wav(tmp_path / "mono.wav", mono))
    from_stereo = load_audio(write_wav(tmp_path / "stereo.wav", np.stack([mono, mono], axis=1)))
    np.testing.assert_array_equal(from_stereo, from_mono)


def test_stereo_is_averaged(tmp_path):
    left = tone(1.0, 48000)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    audio = load_audio(write_wav(tmp_path / "s.wav", stereo, 48000, subtype="FLOAT"), int16_roundtrip=False)
    np.testing.assert_allclose(audio, left / 2, atol=1e-7)


def test_int16_roundtrip_quantises_and_clips(tmp_path):
    loud = np.full(48000, 0.3, dtype=np.float32)
    loud[::2] = 1.7  # out of range in a float wav: clipped to 1 by the round trip
    path = write_wav(tmp_path / "f.wav", loud, 48000, subtype="FLOAT")
    raw = load_audio(path, int16_roundtrip=False)
    rounded = load_audio(path)
    assert raw.max() == pytest.approx(1.7)
    assert rounded.max() == 1.0
    assert rounded[1] == pytest.approx(int(0.3 * 32767) / 32767)


def test_missing_file(tmp_path):
    with pytest.raises(BadAudioError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(BadAudioError, match=r"empty\.wav: empty file \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav")


def test_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n")
    with pytest.raises(BadAudioError, match=r"notes\.wav: unreadable or not an audio file"):
        load_audio(tmp_path / "notes.wav")


def test_truncated_wav_is_detected(tmp_path):
    """libsndfile would silently return the first half; the header check catches it."""
    data = write_wav(tmp_path / "full.wav", tone(3.0, 44100)).read_bytes()
    (tmp_path / "half.wav").write_bytes(data[: len(data) // 2])
    assert sf.read(tmp_path / "half.wav")[0].size > 0  # the silent failure we guard against
    with pytest.raises(BadAudioError, match=r"half\.wav: truncated wav: header declares \d+ audio bytes"):
        load_audio(tmp_path / "half.wav")


def test_wav_header_only(tmp_path):
    data = write_wav(tmp_path / "full.wav", tone(1.0, 44100)).read_bytes()
    (tmp_path / "head.wav").write_bytes(data[:30])
    with pytest.raises(BadAudioError, match=r"head\.wav"):
        load_audio(tmp_path / "head.wav")


def test_zero_frames(tmp_path):
    write_wav(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32))
    with pytest.raises(BadAudioError, match=r"zero\.wav: no audio frames"):
        load_audio(tmp_path / "zero.wav")


def test_half_second_clip_rejected_by_default_accepted_with_min_seconds_zero(tmp_path):
    path = write_wav(tmp_path / "short.wav", tone(0.5, 44100))
    with pytest.raises(BadAudioError, match=r"short\.wav: too short: 0\.50 s < min_seconds=1 s"):
        load_audio(path)
    assert load_audio(path, min_seconds=0).size == 24000


def test_all_zero_audio(tmp_path):
    write_wav(tmp_path / "silent.wav", np.zeros(44100, dtype=np.float32))
    with pytest.raises(BadAudioError, match=r"silent\.wav: silent"):
        load_audio(tmp_path / "silent.wav")


def test_nan_samples(tmp_path):
    audio = tone(1.0, 48000)
    audio[100] = np.nan
    write_wav(tmp_path / "nan.wav", audio, 48000, subtype="FLOAT")
    with pytest.raises(BadAudioError, match=r"nan\.wav: contains NaN or infinite"):
        load_audio(tmp_path / "nan.wav")


@pytest.fixture
def mixed_paths(tmp_path) -> list[Path]:
    good = write_wav(tmp_path / "good.wav", tone(1.0, 44100))
    (tmp_path / "empty.wav").write_bytes(b"")
    return [good, tmp_path / "empty.wav", tmp_path / "missing.wav", good]


def test_load_many_error_policy_names_file(mixed_paths):
    with pytest.raises(BadAudioError, match=r"empty\.wav"):
        load_many(mixed_paths, on_bad_file="error")


def test_load_many_skip_policy_lists_reasons(mixed_paths):
    waveforms, skipped = load_many(mixed_paths, on_bad_file="skip")
    assert [w is None for w in waveforms] == [False, True, True, False]
    assert skipped == [
        (str(mixed_paths[1]), "empty file (0 bytes)"),
        (str(mixed_paths[2]), "file not found"),
    ]


def test_load_many_rejects_unknown_policy(mixed_paths):
    with pytest.raises(ValueError, match=r"on_bad_file must be one of"):
        load_many(mixed_paths, on_bad_file="ignore")


# --- GTZAN's .au files ---------------------------------------------------------------------------------------


def _au(path: Path, audio: np.ndarray, sample_rate: int = 22050) -> None:
    sf.write(path, audio, sample_rate, format="AU", subtype="PCM_16")


def test_gtzan_au_without_magic_or_cut_short_is_a_bad_file(tmp_path):
    good = tmp_path / "good.au"
    _au(good, tone(2.0, 22050))
    assert load_audio_checked(good)[0].size > 0
    garbage, html, cut = tmp_path / "garbage.au", tmp_path / "page.au", tmp_path / "cut.au"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    html.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>" * 1000)
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.75)])
    for path, reason in [(garbage, "no '.snd' magic"), (html, "no '.snd' magic"), (cut, "truncated .au")]:
        with pytest.raises(BadAudioError, match=reason):
            load_audio_checked(path)
    header = bytearray(good.read_bytes())
    header[4:8] = struct.pack(">I", 10**9)  # data offset past the end of the file
    broken = tmp_path / "offset.au"
    broken.write_bytes(bytes(header))
    with pytest.raises(BadAudioError, match="broken .au header"):
        load_audio_checked(broken)


# --- WAV headers, long clips, silence ------------------------------------------------------------------------


def _with_rate(path: Path, audio: np.ndarray, claimed_rate: int) -> None:
    """A PCM-16 wav whose header claims `claimed_rate` (byte rate patched to match)."""
    sf.write(path, audio, 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", claimed_rate)
    data[28:32] = struct.pack("<I", (claimed_rate * 2) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 2**31 - 1])
def test_absurd_header_rates_are_refused_before_decoding(tmp_path, rate):
    path = tmp_path / "clip.wav"
    _with_rate(path, tone(1.0, 16000), rate)
    with pytest.raises(BadAudioError, match=f"implausible sample rate {rate} Hz"):
        load_audio_checked(path, min_seconds=0)


def test_absurd_durations_are_refused_before_decoding(tmp_path, monkeypatch):
    from audio_residual.data_processing import audio as audio_module

    path = tmp_path / "long.wav"
    sf.write(path, tone(3.0, 1000), 1000)  # 3 s: pretend the limit is 2 s
    monkeypatch.setattr(audio_module, "MAX_SECONDS", 2.0)
    monkeypatch.setattr(audio_module.sf, "read", lambda *a, **k: pytest.fail("decoded an absurd file"))
    with pytest.raises(BadAudioError, match="implausibly long"):
        load_audio_checked(path)


def test_long_clips_are_cropped_before_resampling(tmp_path, monkeypatch):
    from audio_residual.data_processing import recipes

    path = tmp_path / "long.wav"
    sf.write(path, tone(120.0, 8000), 8000, subtype="PCM_16")  # two minutes at 8 kHz
    resampled = []
    real = recipes.soxr.resample
    monkeypatch.setattr(recipes.soxr, "resample", lambda x, *a, **k: resampled.append(x.size) or real(x, *a, **k))
    audio, _ = load_audio_checked(path, max_seconds=10.0, seed=3)
    assert resampled == [int(np.ceil(10.5 * 8000))]  # 10 s plus the margin, never the whole clip
    assert audio.size == (10.5 - 2 * 0.2) * 48000  # the resampler's start-up cut from both ends: still > 10 s
    again, _ = load_audio_checked(path, max_seconds=10.0, seed=3)
    np.testing.assert_array_equal(audio, again)  # the window is seeded: reproducible
    assert load_audio_checked(path, max_seconds=10.0, seed=4)[0].size == audio.size
    # and the window is the whole clip's resampled audio at that place (the edges' start-up cut off)
    window, _ = load_audio_checked(path, max_seconds=10.0, seed=3, int16_roundtrip=False)
    full, _ = load_audio_checked(path, int16_roundtrip=False)
    start = int(np.random.default_rng(3).integers(0, 120 * 8000 - 84000 + 1)) * 6 + int(0.2 * 48000)
    np.testing.assert_allclose(window, full[start : start + window.size], atol=1e-4)


def test_silence_is_judged_after_the_mono_mix_and_the_int16_round_trip(tmp_path):
    stereo = tmp_path / "phase.wav"
    left = tone(1.5, 16000)
    sf.write(stereo, np.stack([left, -left], axis=1), 16000, subtype="FLOAT")
    with pytest.raises(BadAudioError, match="silent: the mono mix is all zeros"):
        load_audio_checked(stereo)
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, tone(1.5, 16000, amplitude=1e-6), 16000, subtype="FLOAT")  # −120 dBFS
    with pytest.raises(BadAudioError, match="after the int16 round trip"):
        load_audio_checked(quiet)
    assert np.any(load_audio_checked(quiet, int16_roundtrip=False)[0])  # without the round trip it is signal
