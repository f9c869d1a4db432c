"""What a saliency run reports besides its maps: the run's baseline and how the model reads it, each clip's
row of `clips.csv`, figure titles (prediction, s(x), s(b), padding) and `summary.json`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch

from audio_residual.analysis import faithfulness as faith
from audio_residual.analysis.saliency import Scorer, class_probabilities
from audio_residual.analysis.saliency_baselines import (
    BASELINES,
    NEUTRAL_LR,
    NEUTRAL_PULL,
    NEUTRAL_STEPS,
    SPECTRUM_KINDS,
    Baseline,
    entropy,
    mean_spectrum,
    neutral_spectrum,
)
from audio_residual.io import digest, read_keyed_npz, write_npz

IG_RULE = "|Σ IG − (s(x) − s(b))| ≤ ig_tolerance · |s(x) − s(b)|"
IG_ON_CAP = ("a clip that still misses the rule at max_steps keeps its max_steps attributions and is listed in "
             "ig.unconverged_rows (and clips.csv ig_converged = false): read its map with that gap in mind")


class AdapterError(ValueError):
    """The adapter (ResiDual λ) cannot run on this model."""


def check_adapter(scorer: Scorer, ws, adapter) -> None:
    """One forward pass of the adapted model on one clip, before any work: λ of another architecture or
    inconsistent buffers fail here as an `AdapterError` naming the model, not deep inside a method."""
    if adapter is None:
        return
    row = int(ws.valid_indices()[0])
    x = torch.from_numpy(np.array(ws.features.input_features[row : row + 1], dtype=np.float32)).to(ws.bundle.device)
    try:
        with torch.no_grad():
            scores = scorer.all_scores(x)
    except (RuntimeError, KeyError, IndexError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AdapterError(f"the λ do not fit {ws.bundle.model_id} ({type(error).__name__}: {first})") from None
    if not torch.isfinite(scores).all():
        raise AdapterError(f"the λ make {ws.bundle.model_id}'s scores NaN or infinite")


def _training_spectrum(ws, fold: int) -> tuple[np.ndarray, np.ndarray]:
    return mean_spectrum(ws.features.input_features, ws.split(fold).train)


def baseline_for_run(ws, fold: int, scorer: Scorer, kind: str, root: Path, adapter_digest: str | None) -> Baseline:
    """The run's `Baseline`: per clip, or one spectrum from the fold's training clips (`train_mean`) moved
    until the explained model reads it as no class (`neutral`). The spectrum is kept in `root/baseline.npz`
    under a key of everything it depends on, so a resumed run uses the very same one (and reads no features)."""
    if kind not in SPECTRUM_KINDS:
        return Baseline(kind)
    if kind == "train_mean":
        return Baseline(kind, _training_spectrum(ws, fold)[0])
    key = digest([kind, ws.features.digest(ws.split(fold).train), ws.provenance(), list(ws.table.class_names),
                  adapter_digest, NEUTRAL_STEPS, NEUTRAL_LR, NEUTRAL_PULL])
    path = root / "baseline.npz"
    stored = read_keyed_npz(path, key)
    if stored is not None:
        return Baseline(kind, stored["spectrum"])
    mean, std = _training_spectrum(ws, fold)
    frames = ws.features.input_features.shape[2]
    spectrum = neutral_spectrum(scorer.all_scores, mean, std, frames, ws.bundle.device)
    write_npz(path, {"key": np.array(key), "spectrum": spectrum, "train_mean": mean})
    return Baseline(kind, spectrum)


def _reading(probabilities: np.ndarray, targets: np.ndarray, class_names) -> dict:
    mean = probabilities.mean(0)
    top = int(mean.argmax())
    return {
        "class_probabilities": {name: round(float(p), 4) for name, p in zip(class_names, mean, strict=True)},
        "top_class": class_names[top], "top_probability": round(float(mean[top]), 4),
        "clips_read_as_top_class": round(float((probabilities.argmax(1) == top).mean()), 4),
        "mean_entropy": round(float(entropy(probabilities).mean()), 4),
        "own_class_probability": round(float(probabilities[np.arange(len(targets)), targets].mean()), 4),
    }  # fmt: skip


def baseline_readings(scorer: Scorer, ws, fold: int, rows: np.ndarray, chosen: Baseline, batch_size: int) -> dict:
    """How the explained model reads each offered baseline on the explained clips: mean class probabilities,
    the top class, mean normalised entropy (1 = uniform) and the probability of each clip's own class.
    `neutral` is read only when it is the run's baseline (fitting it costs a few hundred passes)."""
    kinds = {kind: Baseline(kind) for kind in BASELINES if kind not in SPECTRUM_KINDS}
    kinds["train_mean"] = chosen if chosen.kind == "train_mean" else Baseline("train_mean", _training_spectrum(ws, fold)[0])
    kinds[chosen.kind] = chosen
    targets = ws.table.labels[rows]
    readings = {}
    for kind in [k for k in BASELINES if k in kinds]:
        parts = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            x = torch.from_numpy(np.array(ws.features.input_features[chunk], dtype=np.float32)).to(ws.bundle.device)
            parts.append(class_probabilities(scorer, kinds[kind](x)))
        readings[kind] = _reading(np.concatenate(parts), targets, ws.table.class_names)
    return readings


@dataclass(frozen=True)
class Padding:
    """How a clip filled CLAP's 10 s input: its own length, a note for titles, where repeats start."""

    seconds: float | None
    note: str
    copies_at: tuple[float, ...] = ()


def padding_of(ws, row: int) -> Padding:
    """Read the audio file's length (header only) and say whether the input repeats it, pads it or crops it."""
    extractor = ws.bundle.feature_extractor
    window = extractor.nb_max_samples / extractor.sampling_rate
    try:
        seconds = float(sf.info(str(ws.table.paths()[row])).duration)
    except (OSError, RuntimeError, ValueError):
        return Padding(None, "")
    mode = str(ws.features.preprocessing.get("padding", extractor.padding))
    if seconds > window + 1e-3:
        return Padding(seconds, f"a {window:g} s window of a {seconds:.1f} s clip")
    if seconds >= window - 1e-3:
        return Padding(seconds, "")
    if "repeat" in mode:
        starts = tuple(seconds * k for k in range(1, int(np.ceil(window / seconds))) if seconds * k < window - 1e-3)
        return Padding(seconds, f"{seconds:.1f} s clip repeat-padded to {window:g} s (copies start at the dashed "
                       "lines)", starts)
    return Padding(seconds, f"{seconds:.1f} s clip zero-padded to {window:g} s", (seconds,))


def clip_title(result, ws, i: int, padding: Padding) -> str:
    """clip, file and class; prediction; s(x), s(b) and how the model reads the baseline; flags; padding."""
    names, row = ws.table.class_names, int(result.rows[i])
    clips = result.clips.iloc[i]
    lines = [
        f"clip {row} ({ws.table.filenames[row]}): class {names[result.targets[i]]}; predicted {clips['predicted']} "
        f"(p {clips['predicted_probability']:.2f})",
        f"s(x) {clips['score']:.2f}, s(b) {clips['baseline_score']:.2f} (baseline {result.baseline.kind}, read as "
        f"{clips['baseline_top_class']} p {clips['baseline_top_probability']:.2f})"
        + ("" if clips["explainable"] else f"; s(x) − s(b) < {result.clips.attrs['min_change']:g}: too small to explain"),
    ]
    if padding.note:
        lines.append(padding.note)
    return "\n".join(lines)


def clip_table(result, ws, records: list[dict], config) -> pd.DataFrame:
    """One row per clip: prediction, s(x), s(b), the baseline's reading, the flag, IG's gap, normalised AUCs."""
    names = ws.table.class_names
    curves = result.curves
    explainable = curves.explainable(config.min_change)
    probs_x = np.stack([r["probs_x"] for r in records])
    probs_b = np.stack([r["probs_b"] for r in records])
    frame = pd.DataFrame({
        "row": result.rows, "file": [ws.table.filenames[r] for r in result.rows],
        "class": [names[t] for t in result.targets], "predicted": [names[p] for p in probs_x.argmax(1)],
        "predicted_probability": probs_x.max(1), "score": result.maps["score"],
        "baseline_score": result.maps["baseline_score"],
        "change": result.maps["score"] - result.maps["baseline_score"], "explainable": explainable,
        "baseline_top_class": [names[p] for p in probs_b.argmax(1)], "baseline_top_probability": probs_b.max(1),
        "baseline_own_probability": probs_b[np.arange(len(records)), result.targets],
        "baseline_entropy": entropy(probs_b),
    })  # fmt: skip
    if "ig_delta" in result.maps:
        change = np.abs(frame["change"].to_numpy())
        with np.errstate(divide="ignore", invalid="ignore"):
            frame["ig_relative_gap"] = np.abs(result.maps["ig_delta"]) / change
        frame["ig_steps"], frame["ig_converged"] = result.maps["ig_steps"], result.maps["ig_converged"].astype(bool)
    for name in [*config.methods, "random"]:
        for mode in ("deletion", "insertion"):
            frame[f"{name}_{mode}_nauc"] = faith.auc(curves.normalised(name, mode))
    frame.attrs["min_change"] = config.min_change
    return frame


def summary(result, ws, fold: int, config, readings: dict) -> dict:
    """`summary.json`: the run's options, its baseline and how the model reads it, s(x) and s(b) per clip,
    the flagged clips, IG's rule and outcome, the colour scale of the figures, the resumed clips."""
    clips = result.clips
    record = {
        "fold": int(fold), "rows": result.rows.tolist(), "targets": result.targets.tolist(),
        "files": [ws.table.filenames[r] for r in result.rows], **config.options(),
        "score": "zero-shot logit of the clip's own class (logit scale × cosine)",
        "baseline": {**result.baseline.describe(), "reading": readings[result.baseline.kind]},
        "baselines": readings,
        "scores": clips["score"].round(5).tolist(), "baseline_scores": clips["baseline_score"].round(5).tolist(),
        "flagged_rows": clips.loc[~clips["explainable"], "row"].astype(int).tolist(),
        "figures": "each clip's maps share one colour scale per unit (the largest 99th percentile of |value| among "
                   "the methods in that unit): gradient and smoothgrad in logit per dB, gradient_x_input and "
                   "integrated_gradients in logit per cell",
        "resumed_rows": list(result.resumed),
    }  # fmt: skip
    if "ig_relative_gap" in clips:
        record["ig"] = {
            "rule": IG_RULE, "tolerance": config.ig_tolerance, "on_cap": IG_ON_CAP,
            "steps_used": clips["ig_steps"].astype(int).tolist(),
            "relative_gaps": [None if not np.isfinite(g) else round(float(g), 6) for g in clips["ig_relative_gap"]],
            "unconverged_rows": clips.loc[~clips["ig_converged"], "row"].astype(int).tolist(),
        }  # fmt: skip
    return record
