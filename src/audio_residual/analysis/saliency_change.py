"""Does an adaptation change what the model listens to? Saliency before vs after, on the same clips.

Per clip: the rank correlation of the two maps (cells, Spearman). Where the change concentrates: each map
is normalised to unit total |saliency|, and the |difference| is summed per frequency band (mel bins grouped
by their centre frequency) and over onset frames (librosa's onset detector on the log-mel, ± a few frames)
against the share of the spectrogram those regions cover (enrichment 1 = no preference).
"""

from __future__ import annotations

from collections.abc import Sequence

import librosa
import numpy as np
import pandas as pd

from audio_residual.analysis.faithfulness import DEFAULT_CELL, map_rank_correlation

DEFAULT_BANDS_HZ = (0.0, 500.0, 2000.0, 6000.0, float("inf"))
ONSET_HALF_WIDTH = 3  # frames either side of a detected onset (30 ms at CLAP's 10 ms hop)


def mel_centres(extractor) -> np.ndarray:
    """Centre frequency (Hz) of each mel bin of the extractor (Slaney or HTK scale as it uses)."""
    return librosa.mel_frequencies(
        extractor.feature_size + 2, fmin=extractor.frequency_min, fmax=extractor.frequency_max,
        htk=extractor.truncation == "fusion",
    )[1:-1]


def onset_frames(log_mel_db: np.ndarray, sample_rate: int, hop: int, half_width: int = ONSET_HALF_WIDTH) -> np.ndarray:
    """Bool (frames,): frames within `half_width` of an onset detected on the (frames, mels) dB log-mel."""
    envelope = librosa.onset.onset_strength(S=log_mel_db.T, sr=sample_rate, hop_length=hop)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate, hop_length=hop)
    near = np.zeros(log_mel_db.shape[0], dtype=bool)
    for frame in onsets:
        near[max(0, frame - half_width) : frame + half_width + 1] = True
    return near


def _normalised(maps: np.ndarray) -> np.ndarray:
    total = np.abs(maps).sum(axis=(1, 2), keepdims=True)
    return maps / np.where(total > 0, total, 1.0)


def saliency_change(
    before: np.ndarray,
    after: np.ndarray,
    log_mels: np.ndarray,
    extractor,
    bands_hz: Sequence[float] = DEFAULT_BANDS_HZ,
    cell: tuple[int, int] = DEFAULT_CELL,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-clip table, per-region table) of the change between two stacks of (clips, frames, mels) maps.

    per clip: `rank_corr` of the maps, `onset_share` of |change| on onset frames, `onset_frames` their
    share of frames. per region (bands, then "onsets"): `change_share` (mean over clips), `area_share`,
    `enrichment` = change_share / area_share.
    """
    if before.shape != after.shape or before.shape != log_mels.shape:
        raise ValueError(f"maps and log-mels differ in shape: {before.shape}, {after.shape}, {log_mels.shape}")
    change = np.abs(_normalised(after) - _normalised(before))  # (clips, frames, mels)
    per_clip_total = change.sum(axis=(1, 2))
    safe_total = np.where(per_clip_total > 0, per_clip_total, 1.0)
    centres = mel_centres(extractor)
    region_rows = []
    for low, high in zip(bands_hz[:-1], bands_hz[1:], strict=True):
        in_band = (centres >= low) & (centres < high)
        if not in_band.any():
            continue
        share = change[:, :, in_band].sum(axis=(1, 2)) / safe_total
        label = f"{low:.0f}-{high:.0f} Hz" if np.isfinite(high) else f">{low:.0f} Hz"
        region_rows.append({"region": label, "change_share": float(share.mean()), "area_share": float(in_band.mean())})
    onsets = np.stack([onset_frames(m, extractor.sampling_rate, extractor.hop_length) for m in log_mels])
    onset_share = (change * onsets[:, :, None]).sum(axis=(1, 2)) / safe_total
    region_rows.append({"region": "onsets", "change_share": float(onset_share.mean()),
                        "area_share": float(onsets.mean())})
    regions = pd.DataFrame.from_records(region_rows)
    regions["enrichment"] = regions["change_share"] / regions["area_share"].where(regions["area_share"] > 0)
    clips = pd.DataFrame({
        "clip": np.arange(len(before)),
        "rank_corr": map_rank_correlation(before, after, cell),
        "change_l1": per_clip_total,
        "onset_share": onset_share,
        "onset_frames": onsets.mean(axis=1),
    })
    return clips, regions
