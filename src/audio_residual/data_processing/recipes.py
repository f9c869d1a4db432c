"""LAION's two audio recipes: what reaches CLAP's mel front end from a file, named so runs can say which.

- `laion-training` (default): LAION's training-data path (ffmpeg to 48 kHz, int16 round trip, repeat-pad to
  10 s). soxr resamples a 5 s 44.1 kHz clip to exactly 240,000 samples, repeat-pad plays it twice.
- `laion-filelist`: what LAION-CLAP's inference helper `get_audio_embedding_from_filelist` feeds the model.
  It loads with `librosa.load(path, sr=48000)`, whose resampler (soxr HQ by default) then fixes the length
  to ceil(n · 48000 / sr) computed in floating point. For clips whose length divides 10 s at 44.1 kHz the
  product lands a hair above an integer (220500 · 48000/44100 = 240000.00000000003), so one zero sample is
  appended (240,001); repeat-pad then fits int(480000 / 240001) = 1 copy and fills 239,999 zeros.

Both then quantise to int16 and repeat-pad identically (transformers' `repeatpad` is LAION's rule).
librosa is not a dependency: its length rule is one line, reproduced here on the same soxr resampler.
"""

from __future__ import annotations

import math

import numpy as np
import soxr

LAION_TRAINING = "laion-training"
LAION_FILELIST = "laion-filelist"
RECIPES = (LAION_TRAINING, LAION_FILELIST)


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    return recipe


def librosa_length(n_samples: int, orig_sr: int, target_sr: int) -> int:
    """librosa.resample's output length: ceil(n · (target / orig)) with the ratio as a float, as librosa has it."""
    return int(math.ceil(n_samples * (float(target_sr) / orig_sr)))


def resample(audio: np.ndarray, orig_sr: int, target_sr: int, recipe: str = LAION_TRAINING) -> np.ndarray:
    """float32 mono `audio` at `target_sr` the recipe's way (soxr HQ; librosa's length fix for `laion-filelist`)."""
    check_recipe(recipe)
    if orig_sr == target_sr:
        return audio.astype(np.float32, copy=False)
    resampled = soxr.resample(audio, orig_sr, target_sr, quality="HQ").astype(np.float32)
    if recipe == LAION_TRAINING:
        return resampled
    size = librosa_length(audio.shape[-1], orig_sr, target_sr)  # librosa.util.fix_length: zero-pad or cut
    if resampled.shape[-1] >= size:
        return resampled[:size]
    return np.pad(resampled, (0, size - resampled.shape[-1]))
