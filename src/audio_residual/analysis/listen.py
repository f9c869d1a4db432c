"""Hear what drove a prediction: keep a log-mel's most salient cells and invert it to audio.

CLAP's extractor (transformers' `ClapFeatureExtractor`) computes 10·log10 of mel power with a 1e-10
floor, from a centred Hann STFT (n_fft 1024, hop 480 at 48 kHz). The inversion undoes each step with
librosa: dB → power, mel → linear power by non-negative least squares on the extractor's own filterbank
(`librosa.util.nnls`, as `librosa.feature.inverse.mel_to_stft` does with librosa's filters), magnitude →
waveform by Griffin-Lim (`librosa.griffinlim`). Phase is estimated, so the round trip is close, not exact
(tests/test_saliency.py states the measured tolerance).
"""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
from transformers.audio_utils import spectrogram, window_function

from audio_residual.analysis.faithfulness import DEFAULT_CELL, cell_scores
from audio_residual.io import atomic_path


def mel_filters(extractor) -> np.ndarray:
    """The (frequency bins, mels) filterbank the extractor used: Slaney for rand_trunc, HTK for fusion."""
    return extractor.mel_filters if extractor.truncation == "fusion" else extractor.mel_filters_slaney


def log_mel(audio: np.ndarray, extractor) -> np.ndarray:
    """(frames, mels) log-mel of a waveform exactly as the extractor computes it (no padding or truncation)."""
    return spectrogram(
        np.asarray(audio, dtype=np.float64),
        window_function(extractor.fft_window_size, "hann"),
        frame_length=extractor.fft_window_size,
        hop_length=extractor.hop_length,
        power=2.0,
        mel_filters=mel_filters(extractor),
        log_mel="dB",
    ).T


def mel_to_audio(log_mel_db: np.ndarray, extractor, n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """A waveform whose log-mel approximates the (frames, mels) dB input: NNLS mel inversion + Griffin-Lim."""
    power_mel = np.power(10.0, np.asarray(log_mel_db, dtype=np.float64) / 10.0).T  # (mels, frames)
    power = librosa.util.nnls(mel_filters(extractor).T, power_mel)  # (frequency bins, frames)
    magnitude = np.sqrt(np.maximum(power, 0.0))
    n_fft, hop = extractor.fft_window_size, extractor.hop_length
    audio = librosa.griffinlim(
        magnitude, n_iter=n_iter, hop_length=hop, win_length=n_fft, n_fft=n_fft, window="hann",
        center=True, pad_mode="reflect", random_state=seed, length=(log_mel_db.shape[0] - 1) * hop,
    )
    return audio.astype(np.float32)


def keep_salient(
    log_mel_db: np.ndarray, saliency: np.ndarray, fraction: float = 0.1, cell: tuple[int, int] = DEFAULT_CELL
) -> np.ndarray:
    """The log-mel with only its `fraction` most salient cells kept; the rest at the clip's quietest level."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction of salient cells to keep must be in (0, 1], got {fraction}")
    scores = cell_scores(saliency, cell)
    keep_cells = scores >= np.quantile(scores, 1 - fraction)
    keep = np.repeat(np.repeat(keep_cells, cell[0], 0), cell[1], 1)[: log_mel_db.shape[0], : log_mel_db.shape[1]]
    return np.where(keep, log_mel_db, log_mel_db.min()).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM, peak-normalised to −1 dBFS (inverted spectrograms have no meaningful absolute level)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    scaled = audio * (10 ** (-1 / 20) / peak) if peak > 0 else audio
    with atomic_path(path) as tmp:
        sf.write(str(tmp), scaled, sample_rate, subtype="PCM_16", format="WAV")
    return Path(path)
