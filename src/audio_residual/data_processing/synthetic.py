"""A small ESC-50-shaped dataset of synthetic, learnable sounds for tests and smoke runs.

Classes cycle through five sound families (harmonic tone, noise band, resonant click train, chirp,
amplitude-modulated tone); later classes of a family move to a different pitch, band or rate. Each
clip gets its own onset, amplitude, pitch jitter and background noise so that no two are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm.auto import tqdm

from audio_residual.data_processing.datasets import ESC50_CSV, ESC50_FOLDS

GENERATOR_FORMAT_VERSION = 1
GENERATOR_JSON = Path("meta") / "generator.json"

SoundFn = Callable[[np.ndarray, int, float, np.random.Generator], np.ndarray]


def _harmonic_tone(f0: float) -> SoundFn:
    def render(t, sample_rate, pitch_factor, rng):
        f = f0 * pitch_factor
        harmonics = [h for h in range(1, 6) if h * f < 0.45 * sample_rate]
        return sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi)) / h for h in harmonics)

    return render


def _noise_band(center: float) -> SoundFn:
    def render(t, sample_rate, pitch_factor, rng):
        spectrum = np.fft.rfft(rng.standard_normal(t.size))
        freqs = np.fft.rfftfreq(t.size, 1 / sample_rate)
        c = center * pitch_factor
        spectrum[(freqs < c / 1.41) | (freqs > c * 1.41)] = 0  # one-octave band around c
        return np.fft.irfft(spectrum, n=t.size)

    return render


def _click_train(rate: float, resonance: float) -> SoundFn:
    def render(t, sample_rate, pitch_factor, rng):
        since_click = np.mod(t + rng.uniform(0, 1 / rate), 1 / (rate * pitch_factor))
        return np.sin(2 * np.pi * resonance * since_click) * np.exp(-since_click * 300.0)

    return render


def _chirp(f_start: float, f_end: float) -> SoundFn:
    def render(t, sample_rate, pitch_factor, rng):
        sweep = 0.5  # seconds per sweep, repeated over the clip
        phase_t = np.mod(t, sweep)
        k = np.log(f_end / f_start) / sweep
        phase = 2 * np.pi * f_start * pitch_factor * (np.exp(k * phase_t) - 1) / k
        return np.sin(phase)

    return render


def _am_tone(carrier: float, modulation: float) -> SoundFn:
    def render(t, sample_rate, pitch_factor, rng):
        envelope = 0.5 * (1 + np.sin(2 * np.pi * modulation * pitch_factor * t))
        return envelope * np.sin(2 * np.pi * carrier * pitch_factor * t)

    return render


def _class_sound(target: int) -> tuple[str, SoundFn, float]:
    """Category name, renderer and highest frequency of class `target`.

    `variant` moves a class away from earlier classes of the same family; 50 classes fit at 44.1 kHz.
    """
    family, variant = target % 5, target // 5
    if family == 0:
        f0 = 220.0 * 2 ** (variant * 4 / 12)
        return f"tone_{f0:.0f}hz", _harmonic_tone(f0), f0
    if family == 1:
        center = 300.0 * 2 ** (variant * 0.5)
        return f"noise_band_{center:.0f}hz", _noise_band(center), center * 1.41
    if family == 2:
        rate, resonance = 4.0 + 5.0 * variant, 2000.0 + 500.0 * variant
        return f"clicks_{rate:.0f}_per_s", _click_train(rate, resonance), resonance
    if family == 3:
        low = 300.0 * 1.3**variant
        high = 4 * low
        if variant % 2 == 0:
            return f"chirp_up_{low:.0f}_{high:.0f}hz", _chirp(low, high), high
        return f"chirp_down_{high:.0f}_{low:.0f}hz", _chirp(high, low), high
    carrier, modulation = 600.0 * 2 ** (variant * 5 / 12), 3.0 + 4.0 * variant
    return f"am_tone_{carrier:.0f}hz_{modulation:.0f}_per_s", _am_tone(carrier, modulation), carrier


def _render_clip(render: SoundFn, n_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n_samples) / sample_rate
    pitch_factor = 2 ** (rng.uniform(-0.5, 0.5) / 12)  # within a quarter tone
    event = np.asarray(render(t, sample_rate, pitch_factor, rng), dtype=np.float64)
    event /= np.max(np.abs(event)) + 1e-12
    onset = int(rng.uniform(0.0, 0.2) * n_samples)
    fade = min(int(0.01 * sample_rate), max(n_samples - onset, 1))
    envelope = np.zeros(n_samples)
    envelope[onset:] = 1.0
    envelope[onset : onset + fade] = np.linspace(0.0, 1.0, fade)
    clip = rng.uniform(0.3, 0.8) * envelope * event
    clip += rng.uniform(0.002, 0.01) * rng.standard_normal(n_samples)
    return np.clip(clip, -1.0, 1.0)


def make_synthetic_esc50(
    out_dir: Path | str,
    n_classes: int = 5,
    clips_per_class: int = 10,
    n_folds: int = 5,
    seconds: float = 5.0,
    sample_rate: int = 44100,
    seed: int = 0,
    first_class: int = 0,
) -> Path:
    """Write (or reuse) an ESC-50-shaped folder; byte-identical for identical arguments.

    `first_class` starts the class list further along the generator's sounds (targets stay 0..n-1), so
    two sets with disjoint class ranges have no class in common (zero-shot transfer between them).

    Generation happens in a hidden sibling folder renamed into place at the end, so an interrupted
    run never leaves a half-written dataset. An existing set with the same parameters is returned as is.
    """
    out_dir = Path(out_dir)
    if not 1 <= n_folds <= len(ESC50_FOLDS):
        raise ValueError(f"n_folds must be 1..{len(ESC50_FOLDS)} (ESC-50 folds), got {n_folds}")
    if n_classes < 1 or clips_per_class < 1 or seconds <= 0:
        raise ValueError("n_classes and clips_per_class must be >= 1 and seconds > 0")
    if first_class < 0:
        raise ValueError(f"first_class must be >= 0, got {first_class}")
    highest = max(_class_sound(first_class + target)[2] for target in range(n_classes))
    if highest * 1.03 > 0.45 * sample_rate:  # 1.03: the per-clip pitch jitter
        raise ValueError(
            f"{n_classes} classes need frequencies up to {highest:.0f} Hz, too close to Nyquist "
            f"at {sample_rate} Hz; use fewer classes or a higher sample_rate"
        )
    params = {
        "format_version": GENERATOR_FORMAT_VERSION,
        "n_classes": n_classes,
        "clips_per_class": clips_per_class,
        "n_folds": n_folds,
        "seconds": seconds,
        "sample_rate": sample_rate,
        "seed": seed,
    } | ({"first_class": first_class} if first_class else {})  # sets written before the option stay valid
    generator_json = out_dir / GENERATOR_JSON
    if generator_json.is_file():
        if json.loads(generator_json.read_text()) == params:
            return out_dir
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a synthetic dataset; refusing to overwrite it")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        _write_dataset(staging, params)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _write_dataset(root: Path, params: dict) -> None:
    n_samples = int(round(params["seconds"] * params["sample_rate"]))
    (root / "audio").mkdir()
    (root / "meta").mkdir()
    rows = []
    classes = [_class_sound(params.get("first_class", 0) + target) for target in range(params["n_classes"])]
    jobs = [
        (target, clip) for target in range(params["n_classes"]) for clip in range(params["clips_per_class"])
    ]
    for target, clip in tqdm(jobs, desc="synthesising clips", unit="clip", leave=False):
        category, render, _ = classes[target]
        fold = clip % params["n_folds"] + 1
        src_file = f"{target * params['clips_per_class'] + clip:06d}"
        filename = f"{fold}-{src_file}-A-{target}.wav"
        rng = np.random.default_rng([params["seed"], params.get("first_class", 0) + target, clip])
        audio = _render_clip(render, n_samples, params["sample_rate"], rng)
        sf.write(root / "audio" / filename, audio, params["sample_rate"], subtype="PCM_16", format="WAV")
        rows.append((filename, fold, target, category, False, src_file, "A"))
    columns = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    pd.DataFrame(rows, columns=columns).to_csv(root / ESC50_CSV, index=False)
    (root / GENERATOR_JSON).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`, replacing a previous (generated or empty) `target` if present."""
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(new, target)
        shutil.rmtree(trash)
    else:
        os.replace(new, target)
