"""The saliency analysis of one fold's test clips: maps, faithfulness, listenable explanations, head
attribution against the mean ablation, and (with an adapter) what the adaptation changed.

    OUT/
      faithfulness.csv          one row per method: deletion/insertion AUC vs random and vs randomised model
      curves.csv                mean deletion/insertion curves of every ordering
      maps.npz                  maps[method] (clips, frames, mels), rows, targets, scores (no pickle)
      figures/                  saliency_clip{row}.png (log-mel + one overlay per method), curves.png, change.png
      wavs/                     clip{row}_original.wav (the log-mel inverted) and clip{row}_{method}_top{q}.wav
      heads_attribution.csv     gradient × head output per head (with `analysis`: on the ablation's clips)
      head_vs_ablation.csv      Spearman ρ between the attribution and the ablation deltas
      change_clips.csv, change_regions.csv   zero-shot vs adapted maps (with an adapter)
      summary.json              what produced all of the above
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn

from audio_residual.analysis import faithfulness as faith
from audio_residual.analysis import saliency_plots as plots
from audio_residual.analysis.ablation import select_clips
from audio_residual.analysis.head_attribution import compare_with_ablation, head_attribution
from audio_residual.analysis.listen import keep_salient, mel_to_audio, write_wav
from audio_residual.analysis.saliency import (
    METHODS,
    RANDOMISED_SEED,
    SIGNED,
    randomised_scorer,
    saliency_maps,
    zero_shot_scorer,
)
from audio_residual.analysis.saliency_change import saliency_change
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.io import atomic_path, save_figure, write_csv, write_json
from audio_residual.layout import AnalysisLayout


@dataclass(frozen=True)
class SaliencyLayout:
    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def figure(self, name: str) -> Path:
        return self.root / "figures" / f"{name}.png"

    def wav(self, name: str) -> Path:
        return self.root / "wavs" / f"{name}.wav"


@dataclass
class SaliencyResult:
    rows: np.ndarray  # dataset rows of the explained clips
    targets: np.ndarray  # class index explained per clip (its label)
    maps: dict[str, np.ndarray]  # method → (clips, frames, mels); "score", "baseline_score", "ig_delta"
    randomised_maps: dict[str, np.ndarray]
    faithfulness: pd.DataFrame
    curves: dict
    heads: pd.DataFrame | None = None
    head_vs_ablation: pd.DataFrame | None = None
    change_clips: pd.DataFrame | None = None
    change_regions: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict)
    wavs: dict[str, Path] = field(default_factory=dict)  # "clip{row}_original" etc. → path
    paths: dict[str, Path] = field(default_factory=dict)


def _log_mels(features, rows: np.ndarray) -> np.ndarray:
    """(clips, frames, mels) channel 0 of the cached input features (the whole clip for unfused models)."""
    return np.asarray(features.input_features[rows], dtype=np.float32)[:, 0]


def _maps(scorer, ws, rows, targets, methods, options, desc) -> dict[str, np.ndarray]:
    f = ws.features
    return saliency_maps(scorer, f.input_features, rows, targets, methods, f.is_longer,
                         device=ws.bundle.device, desc=desc, **options)


def _listen(result: SaliencyResult, ws, log_mels, methods, keep_fraction, layout, n_iter) -> None:
    extractor = ws.bundle.feature_extractor
    percent = round(100 * keep_fraction)
    for i, row in enumerate(result.rows):
        name = f"clip{row}_original"
        audio = mel_to_audio(log_mels[i], extractor, n_iter=n_iter)
        result.wavs[name] = write_wav(layout.wav(name), audio, extractor.sampling_rate)
        for method in methods:
            name = f"clip{row}_{method}_top{percent}"
            kept = keep_salient(log_mels[i], result.maps[method][i], keep_fraction)
            audio = mel_to_audio(kept, extractor, n_iter=n_iter)
            result.wavs[name] = write_wav(layout.wav(name), audio, extractor.sampling_rate)


def _ablation_and_stats(analysis, fold: int) -> tuple[pd.DataFrame, ResidualStatistics]:
    """From an `AnalysisResult`, or from the folder `audio-residual analyze --fold FOLD` wrote."""
    if hasattr(analysis, "ablation"):
        return analysis.ablation, analysis.stats
    layout = AnalysisLayout.of(Path(analysis))
    for path in (layout.ablation, layout.stats(fold)):
        if not path.is_file():
            raise FileNotFoundError(f"--analysis {layout.root}: no {path.name} (run `audio-residual analyze --fold {fold}`)")
    return pd.read_csv(layout.ablation), ResidualStatistics.load(layout.stats(fold))


def _heads(result: SaliencyResult, ws, fold, ablation: pd.DataFrame, stats: ResidualStatistics, batch_size) -> None:
    """Head attribution of the zero-shot model on the clips the ablation used."""
    split = ws.split(fold)
    clips = int(ablation["clips"].iloc[0]) if len(ablation) else None
    rows = select_clips(split.test, clips, seed=0)  # the ablation's own choice (head_ablation's default seed)
    targets = ws.table.labels[rows]
    scorer = zero_shot_scorer(ws.classifier)
    result.heads = head_attribution(scorer, ws.features.input_features, rows, targets, stats,
                                    ws.features.is_longer, batch_size, ws.bundle.device)
    result.head_vs_ablation = compare_with_ablation(result.heads, ablation)


def run_saliency(
    ws,
    fold: int,
    out_dir: str | Path,
    clips: int = 4,
    methods: Sequence[str] = METHODS,
    adapter: nn.Module | None = None,
    analysis=None,
    steps: int = 64,
    ig_tolerance: float | None = 0.01,
    max_steps: int = 1024,
    noise_samples: int = 16,
    baseline: str = "floor",
    curve_steps: int = faith.DEFAULT_STEPS,
    listen: Sequence[str] = ("integrated_gradients",),
    keep_fraction: float = 0.1,
    griffin_lim_iters: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> SaliencyResult:
    """Explain the (adapted, if `adapter`) zero-shot score of each clip's own class on `clips` test clips of
    `fold`, judge the maps, write everything under `out_dir` (see the module docstring).

    IG starts at `steps` and doubles them, up to `max_steps`, for clips whose attributions miss s(x) − s(b)
    by more than `ig_tolerance` (relative); `summary.json` gives the steps used and the largest gap left.
    `analysis`: an `AnalysisResult` of the same fold (notebook 1's `run_analysis`), or the folder `analyze`
    wrote, for head attribution on the ablation's clips. `listen`: the methods whose top `keep_fraction` cells are inverted to audio.
    """
    unknown = sorted(set(methods) - set(METHODS)) + sorted(set(listen) - set(methods))
    if unknown:
        raise ValueError(f"unknown or unselected saliency method(s) {unknown}: choose from {list(methods)}")
    layout = SaliencyLayout(Path(out_dir))
    heads_from = None if analysis is None else _ablation_and_stats(analysis, fold)  # fail before the long part
    rows = select_clips(ws.split(fold).test, clips, seed)
    if len(rows) == 0:
        raise ValueError(f"fold {fold} has no usable test clips to explain")
    targets = ws.table.labels[rows]
    options = {"steps": steps, "ig_tolerance": ig_tolerance, "max_steps": max_steps, "noise_samples": noise_samples, "baseline_kind": baseline, "batch_size": batch_size,
               "seed": seed}
    zero_shot = zero_shot_scorer(ws.classifier)
    scorer = zero_shot_scorer(ws.classifier, adapter) if adapter is not None else zero_shot
    maps = _maps(scorer, ws, rows, targets, methods, options, "saliency")
    randomised = _maps(randomised_scorer(zero_shot, RANDOMISED_SEED + seed), ws, rows, targets, methods, options, "randomised model")
    to_judge = {**{m: maps[m] for m in methods}, **{f"randomised:{m}": randomised[m] for m in methods}}
    aucs, curves = faith.evaluate_faithfulness(
        scorer, ws.features.input_features, rows, targets, to_judge, methods, ws.features.is_longer,
        seed=seed, device=ws.bundle.device, baseline_kind=baseline, steps=curve_steps, batch_size=4 * batch_size,
    )
    similarity = {m: faith.map_rank_correlation(maps[m], randomised[m]) for m in methods}
    table = faith.faithfulness_table(aucs, methods, similarity)
    result = SaliencyResult(rows, targets, maps, randomised, table, curves)
    log_mels = _log_mels(ws.features, rows)
    if adapter is not None:
        before = _maps(zero_shot, ws, rows, targets, methods, options, "zero-shot saliency")
        changes = [saliency_change(before[m], maps[m], log_mels, ws.bundle.feature_extractor) for m in methods]
        result.change_clips = pd.concat([c.assign(method=m) for m, (c, _) in zip(methods, changes, strict=True)])
        result.change_regions = pd.concat([r.assign(method=m) for m, (_, r) in zip(methods, changes, strict=True)])
    if heads_from is not None:
        _heads(result, ws, fold, *heads_from, batch_size)
    _listen(result, ws, log_mels, listen, keep_fraction, layout, griffin_lim_iters)
    _figures(result, ws, log_mels, methods)
    _write(result, ws, fold, layout, methods, options)
    return result


def _figures(result: SaliencyResult, ws, log_mels: np.ndarray, methods: Sequence[str]) -> None:
    hop_seconds = ws.bundle.feature_extractor.hop_length / ws.bundle.feature_extractor.sampling_rate
    names = ws.table.class_names
    for i, row in enumerate(result.rows):
        title = f"clip {row} ({ws.table.filenames[row]}): class {names[result.targets[i]]}"
        maps = {m: result.maps[m][i] for m in methods}
        result.figures[f"saliency_clip{row}"] = plots.saliency_figure(log_mels[i], maps, SIGNED, hop_seconds, title)
    result.figures["curves"] = plots.curves_figure(result.curves, methods)
    if result.change_regions is not None:
        first = methods[-1]
        result.figures["change"] = plots.change_figure(
            result.change_regions[result.change_regions["method"] == first],
            result.change_clips[result.change_clips["method"] == first],
        )


def _write(result: SaliencyResult, ws, fold: int, layout: SaliencyLayout, methods, options) -> None:
    paths = result.paths
    paths["faithfulness"] = write_csv(layout / "faithfulness.csv", result.faithfulness)
    curve_rows = [{"ordering": name, "mode": mode, "step": k, "score": float(v)}
                  for name, per_mode in result.curves.items() for mode, curve in per_mode.items()
                  for k, v in enumerate(curve)]
    paths["curves"] = write_csv(layout / "curves.csv", pd.DataFrame.from_records(curve_rows))
    arrays = {"rows": result.rows, "targets": result.targets}
    arrays.update({k: v for k, v in result.maps.items()})
    arrays.update({f"randomised_{k}": v for k, v in result.randomised_maps.items()})
    with atomic_path(layout / "maps.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    paths["maps"] = layout / "maps.npz"
    for name, frame in (("heads_attribution", result.heads), ("head_vs_ablation", result.head_vs_ablation),
                        ("change_clips", result.change_clips), ("change_regions", result.change_regions)):
        if frame is not None:
            paths[name] = write_csv(layout / f"{name}.csv", frame)
    paths.update({f"wav_{name}": path for name, path in result.wavs.items()})
    for name, fig in result.figures.items():
        paths[f"png_{name}"] = save_figure(fig, layout.figure(name))
    summary = {
        "fold": int(fold), "rows": result.rows.tolist(), "targets": result.targets.tolist(),
        "files": [ws.table.filenames[r] for r in result.rows], "methods": list(methods), **options,
        "score": "zero-shot logit of the clip's own class (logit scale × cosine)",
        "ig_max_relative_gap": _relative_gap(result.maps),
        "ig_steps_used": result.maps["ig_steps"].tolist() if "ig_steps" in result.maps else None,
        "provenance": ws.provenance(),
    }
    paths["summary"] = write_json(layout / "summary.json", summary)


def _relative_gap(maps: dict[str, np.ndarray]) -> float | None:
    """max over clips |Σ IG − (s(x) − s(b))| / |s(x) − s(b)|: how complete the IG attributions are."""
    if "ig_delta" not in maps:
        return None
    change = np.abs(maps["score"] - maps["baseline_score"])
    return float(np.max(np.abs(maps["ig_delta"]) / np.maximum(change, 1e-12)))
