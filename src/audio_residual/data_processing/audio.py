"""Audio loading that matches LAION-CLAP preprocessing and rejects bad files with a reason.

CLAP was trained on 48 kHz mono audio that went through an int16 quantisation round trip; doing the
same here keeps features comparable to the checkpoint's training distribution.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from audio_residual.data_processing.recipes import LAION_TRAINING, resample

MODEL_SAMPLE_RATE = 48_000
BAD_FILE_POLICIES = ("error", "skip")
_INT16_SCALE = 32767.0
FULL_SCALE = 0.999  # |sample| at or above this counts as clipped (int16 full scale is 0.99997)
CLIPPED_WARN_FRACTION = 0.01  # warn when at least 1 % of samples are clipped
DC_STD_LIMIT = 1e-4  # a mono signal varying less than this (-80 dBFS) around a non-zero mean is DC only
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000  # header rates outside this are damage, not audio
MAX_SECONDS = 4 * 3600  # a longer "clip" is a broken header or a whole recording: refused before decoding
CROP_MARGIN_SECONDS = 0.5  # audio kept beyond a crop window, so resampling has context at its edges ...
EDGE_SECONDS = 0.2  # ... of which this much is cut from each end after resampling (the filter's start-up)


class BadAudioError(ValueError):
    """An audio file cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def check_bad_file_policy(on_bad_file: str) -> None:
    if on_bad_file not in BAD_FILE_POLICIES:
        raise ValueError(f"on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")


def _wav_truncation(path: Path) -> str | None:
    """Reason string if a RIFF/WAVE file holds fewer data bytes than its header declares, else None.

    libsndfile silently reads whatever frames are present, so a half-downloaded wav would otherwise
    pass as a shorter clip.
    """
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        while chunk_header := handle.read(8):
            if len(chunk_header) < 8:
                return None
            chunk_id, chunk_size = chunk_header[:4], struct.unpack("<I", chunk_header[4:])[0]
            if chunk_id == b"data":
                available = file_size - handle.tell()
                if chunk_size in (0, 0xFFFFFFFF):  # streaming writers leave the size unset
                    return None
                if available < chunk_size:
                    return f"truncated wav: header declares {chunk_size} audio bytes, file holds {available}"
                return None
            handle.seek(chunk_size + (chunk_size & 1), 1)
    return None


def _au_problem(path: Path) -> str | None:
    """Reason string if a `.au` file is not a Sun/NeXT audio file or holds less data than its header says.

    libsndfile reads a `.au` without the `.snd` magic as headerless 8-bit u-law, so random bytes or an
    HTML error page would pass as noise; a cut file would pass as a shorter clip.
    """
    if path.suffix.lower() not in (".au", ".snd"):
        return None
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(24)
    if header[:4] != b".snd":
        return f"not a Sun .au audio file: no '.snd' magic (first bytes {header[:4]!r})"
    if len(header) < 24:
        return f"truncated .au header: {len(header)} of 24 bytes"
    offset, data_size = struct.unpack(">II", header[4:12])
    if not 24 <= offset <= size:
        return f"broken .au header: data offset {offset} in a file of {size} bytes"
    if data_size != 0xFFFFFFFF and size - offset < data_size:
        return f"truncated .au: header declares {data_size} audio bytes, file holds {size - offset}"
    return None


def _read_window(path: Path, max_seconds: float | None, seed: int) -> dict:
    """`sf.read`'s start/stop: the whole file, or with `max_seconds` a window of that length (plus a margin)
    at an offset seeded by `seed`, so a long clip is cropped before it is decoded and resampled.

    Headers claiming an implausible rate or duration are refused here, before any memory is spent.
    """
    info = sf.info(str(path))
    rate, n_frames = info.samplerate, info.frames
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise BadAudioError(
            path, f"implausible sample rate {rate} Hz in the header (accepted: {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz)"
        )
    if n_frames / rate > MAX_SECONDS:
        raise BadAudioError(
            path, f"implausibly long: {n_frames / rate / 3600:.1f} h at {rate} Hz (at most {MAX_SECONDS / 3600:g} h)"
        )
    keep = None if max_seconds is None else int(np.ceil((max_seconds + CROP_MARGIN_SECONDS) * rate))
    if keep is None or n_frames <= keep:
        return {}
    start = int(np.random.default_rng(seed).integers(0, n_frames - keep + 1))
    return {"start": start, "stop": start + keep}


def _trim_edges(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A cropped window without its first and last `EDGE_SECONDS`, where the resampler saw the cut as silence."""
    edge = int(EDGE_SECONDS * sample_rate)
    return audio[edge : audio.size - edge]


def _silence(audio: np.ndarray, int16_roundtrip: bool) -> str | None:
    """Reason string if the waveform the model would get is all zeros, though the file's samples were not:
    opposite-phase channels cancel in the mono mix, or a very quiet clip rounds to 0 in int16."""
    if np.any(audio):
        return None
    rounded = " after the int16 round trip (every sample below 1/32767 of full scale)" if int16_roundtrip else ""
    return f"silent: the mono mix is all zeros{rounded}"


def quantise_int16(audio: np.ndarray) -> np.ndarray:
    """LAION-CLAP's quantisation: clip to [-1, 1], scale to int16, scale back."""
    quantised = (np.clip(audio, -1.0, 1.0) * _INT16_SCALE).astype(np.int16)
    return (quantised / _INT16_SCALE).astype(np.float32)


def audio_warnings(frames: np.ndarray, mono: np.ndarray) -> list[str]:
    """Reasons to distrust a usable clip: heavy clipping or a constant (DC-only) signal.

    Both still give features, so they are reported like skipped files rather than refused.
    """
    reasons = []
    clipped = float(np.mean(np.abs(frames) >= FULL_SCALE))
    if clipped >= CLIPPED_WARN_FRACTION:
        reasons.append(f"clipped: {clipped:.0%} of samples at full scale (±1)")
    spread, offset = float(mono.std()), float(mono.mean())
    if spread < DC_STD_LIMIT and abs(offset) >= DC_STD_LIMIT:
        reasons.append(f"DC only: constant offset {offset:+.3g} with no signal around it (std {spread:.1e})")
    return reasons


def load_audio_checked(
    path: Path | str,
    target_sr: int = MODEL_SAMPLE_RATE,
    int16_roundtrip: bool = True,
    min_seconds: float = 1.0,
    max_seconds: float | None = None,
    seed: int = 0,
    recipe: str = LAION_TRAINING,
) -> tuple[np.ndarray, list[str]]:
    """`load_audio`'s waveform and the `audio_warnings` of the file (empty when it looks normal).

    `max_seconds` keeps only a window of about that length at an offset seeded by `seed` (`_read_window`):
    for models that crop long clips anyway, decoding and resampling the rest is wasted. `recipe` picks the
    resampler's length rule (`data_processing/recipes.py`): LAION's training data or its
    `get_audio_embedding_from_filelist` helper.
    """
    path = Path(path)
    if path.is_dir():
        raise BadAudioError(path, "is a directory, not an audio file")
    if not path.is_file():
        raise BadAudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadAudioError(path, "empty file (0 bytes)")
    truncation = _wav_truncation(path) or _au_problem(path)
    if truncation:
        raise BadAudioError(path, truncation)
    try:
        window = _read_window(path, max_seconds, seed)
        frames, sample_rate = sf.read(path, dtype="float32", always_2d=True, **window)
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        if isinstance(err, BadAudioError):
            raise
        raise BadAudioError(path, f"unreadable or not an audio file ({err})") from err
    if frames.shape[0] == 0:
        raise BadAudioError(path, "no audio frames")
    if not np.isfinite(frames).all():
        raise BadAudioError(path, "contains NaN or infinite samples")
    duration = frames.shape[0] / sample_rate
    if duration < min_seconds:
        raise BadAudioError(
            path,
            f"too short: {duration:.2f} s < min_seconds={min_seconds:g} s ({frames.shape[0]} samples at "
            f"{sample_rate} Hz; lower the minimum with --min-seconds)",
        )
    if not np.any(frames):
        raise BadAudioError(path, "silent: every sample is zero")
    audio = frames.mean(axis=1, dtype=np.float32)
    warnings = audio_warnings(frames, audio)
    if sample_rate != target_sr:
        audio = resample(audio, sample_rate, target_sr, recipe)
    audio = _trim_edges(audio, target_sr) if window else audio
    if int16_roundtrip:
        audio = quantise_int16(audio)
    silence = _silence(audio, int16_roundtrip)
    if silence:
        raise BadAudioError(path, silence)
    return audio, warnings


def load_audio(
    path: Path | str,
    target_sr: int = MODEL_SAMPLE_RATE,
    int16_roundtrip: bool = True,
    min_seconds: float = 1.0,
    recipe: str = LAION_TRAINING,
) -> np.ndarray:
    """Float32 mono waveform at `target_sr`; raises `BadAudioError` for anything unusable.

    `min_seconds` defaults to 1 s because shorter ESC-50-style clips are almost always truncated
    downloads; a clip of exactly `min_seconds` passes. Pass 0 to accept any non-empty clip.
    """
    return load_audio_checked(path, target_sr, int16_roundtrip, min_seconds, recipe)[0]


def load_many(
    paths: Sequence[Path | str], on_bad_file: str = "error", **load_kwargs
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Load each path; with `on_bad_file="skip"` bad files give None and a (path, reason) entry."""
    check_bad_file_policy(on_bad_file)
    waveforms: list[np.ndarray | None] = []
    skipped: list[tuple[str, str]] = []
    for path in tqdm(paths, desc="loading audio", unit="clip", leave=False):
        try:
            waveforms.append(load_audio(path, **load_kwargs))
        except BadAudioError as err:
            if on_bad_file == "error":
                raise
            waveforms.append(None)
            skipped.append((str(path), err.reason))
    return waveforms, skipped
