"""The saliency analysis of one fold's test clips: maps, faithfulness, listenable explanations, head
attribution against the mean ablation, and (with an adapter) what the adaptation changed.

    OUT/
      faithfulness.csv          one row per method: raw and normalised deletion/insertion AUCs vs a random
                                order and vs a randomised model, the baseline, mean s(x) and s(b)
      clips.csv                 one row per clip: prediction, s(x), s(b), how the model reads the baseline,
                                whether s(x) − s(b) is large enough to explain, IG's steps and gap, AUCs
      curves.csv                mean deletion/insertion curves (raw and normalised) of every ordering
      maps.npz                  maps[method] (clips, frames, mels), rows, targets, scores (no pickle)
      baseline.npz              the run's baseline spectrum (`neutral`, `train_mean`), kept for a resume
      clips/clip{row}.npz       each clip's results: a killed run resumes from them (`saliency_clip`)
      figures/                  saliency_clip{row}.png (log-mel + one overlay per method), curves.png, change.png
      wavs/                     clip{row}_original.wav (the log-mel inverted) and clip{row}_{method}_top{q}.wav
      heads_attribution.csv     gradient × head output per head (with `analysis`: on the ablation's clips)
      head_vs_ablation.csv      Spearman ρ between the attribution and the ablation deltas (or why there is none)
      change_clips.csv, change_regions.csv   zero-shot vs adapted maps (with an adapter)
      summary.json              what produced all of the above
"""

from __future__ import annotations

import dataclasses
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
from audio_residual.analysis.saliency import (
    METHODS,
    RANDOMISED_SEED,
    UNITS,
    AttributionOptions,
    randomised_scorer,
    zero_shot_scorer,
)
from audio_residual.analysis.saliency_baselines import BASELINES, DEFAULT_BASELINE, Baseline
from audio_residual.analysis.saliency_change import mel_centres, saliency_change
from audio_residual.analysis.saliency_clip import MODES, ClipJob, explain_clip, module_digest
from audio_residual.analysis.saliency_report import (
    baseline_for_run,
    baseline_readings,
    check_adapter,
    clip_table,
    clip_title,
    padding_of,
    summary,
)
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.io import digest, save_figure, write_csv, write_json, write_npz
from audio_residual.layout import AnalysisLayout

SCORE_LABEL = "zero-shot logit of the clip's class (scale × cos)"


@dataclass(frozen=True)
class SaliencyConfig:
    """What `run_saliency` explains and how. `clips`: test clips (seeded choice); `baseline`: one of
    `saliency_baselines.BASELINES`; IG starts at `steps` and doubles them, up to `max_steps`, for clips whose
    attributions miss s(x) − s(b) by more than `ig_tolerance` · |s(x) − s(b)|; `curve_steps`: points of each
    deletion/insertion curve; `min_change`: clips with s(x) − s(b) below it are flagged as too small to
    explain; `listen`: the methods whose top `keep_fraction` cells are inverted to audio."""

    clips: int = 4
    methods: tuple[str, ...] = METHODS
    baseline: str = DEFAULT_BASELINE
    steps: int = 64
    ig_tolerance: float | None = 0.01
    max_steps: int = 1024
    noise_samples: int = 16
    curve_steps: int = faith.DEFAULT_STEPS
    min_change: float = faith.MIN_CHANGE
    listen: tuple[str, ...] = ("integrated_gradients",)
    keep_fraction: float = 0.1
    griffin_lim_iters: int = 32
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "listen", tuple(self.listen))
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.listen) - set(self.methods))
        if unknown or not self.methods:
            raise ValueError(f"unknown or unselected saliency method(s) {unknown}: choose from {list(self.methods)}")
        if self.baseline not in BASELINES:
            raise ValueError(f"unknown saliency baseline {self.baseline!r}: choose from {', '.join(BASELINES)}")
        if not 0 < self.keep_fraction <= 1:
            raise ValueError(f"fraction of salient cells to keep must be in (0, 1], got {self.keep_fraction}")

    def options(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SaliencyResult:
    rows: np.ndarray  # dataset rows of the explained clips
    targets: np.ndarray  # class index explained per clip (its label)
    maps: dict[str, np.ndarray]  # method → (clips, frames, mels); "score", "baseline_score", "ig_*"
    randomised_maps: dict[str, np.ndarray]
    faithfulness: pd.DataFrame
    curves: faith.Curves
    clips: pd.DataFrame | None = None  # one row per clip (`clips.csv`)
    baseline: Baseline | None = None
    heads: pd.DataFrame | None = None
    head_vs_ablation: pd.DataFrame | None = None
    change_clips: pd.DataFrame | None = None
    change_regions: pd.DataFrame | None = None
    figures: dict[str, Figure] = field(default_factory=dict)
    wavs: dict[str, Path] = field(default_factory=dict)  # "clip{row}_original" etc. → path
    paths: dict[str, Path] = field(default_factory=dict)
    resumed: list[int] = field(default_factory=list)  # rows read back from an earlier, interrupted run


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


def _job(ws, fold: int, root: Path, config: SaliencyConfig, adapter: nn.Module | None) -> ClipJob:
    zero_shot = zero_shot_scorer(ws.classifier)
    scorer = zero_shot_scorer(ws.classifier, adapter) if adapter is not None else zero_shot
    check_adapter(scorer, ws, adapter)
    baseline = baseline_for_run(ws, fold, scorer, config.baseline, root, module_digest(adapter))
    attribution = AttributionOptions(baseline, config.steps, config.ig_tolerance, config.max_steps,
                                     config.noise_samples, batch_size=config.batch_size, seed=config.seed)
    faithfulness = faith.FaithfulnessOptions(baseline, steps=config.curve_steps, batch_size=4 * config.batch_size,
                                             seed=config.seed, min_change=config.min_change)
    per_clip = {k: v for k, v in config.options().items() if k not in ("clips", "batch_size", "baseline")}
    key = digest([ws.provenance(), list(ws.table.class_names), per_clip, baseline.digest(), module_digest(adapter)])
    return ClipJob(ws, scorer, randomised_scorer(zero_shot, RANDOMISED_SEED + config.seed),
                   zero_shot if adapter is not None else None, config.methods, attribution, faithfulness,
                   config.listen, (config.keep_fraction, config.griffin_lim_iters), root, key)


def run_saliency(
    ws,
    fold: int,
    out_dir: str | Path,
    config: SaliencyConfig | None = None,
    adapter: nn.Module | None = None,
    analysis=None,
) -> SaliencyResult:
    """Explain the (adapted, if `adapter`) zero-shot score of each clip's own class on `config.clips` test
    clips of `fold`, judge the maps, write everything under `out_dir` (see the module docstring).

    Each clip is stored as soon as it is done; a rerun with the same inputs reads those back and computes
    the rest (`result.resumed`). `analysis`: an `AnalysisResult` of the same fold (notebook 1's
    `run_analysis`), or the folder `analyze` wrote, for head attribution on the ablation's clips.
    """
    from tqdm.auto import tqdm

    config = config or SaliencyConfig()
    root = Path(out_dir)
    heads_from = None if analysis is None else _ablation_and_stats(analysis, fold)  # fail before the long part
    rows = select_clips(ws.split(fold).test, config.clips, config.seed)
    if len(rows) == 0:
        raise ValueError(f"fold {fold} has no usable test clips to explain")
    targets = ws.table.labels[rows]
    job = _job(ws, fold, root, config, adapter)
    records, resumed = [], []
    for row, target in zip(tqdm(rows, desc="saliency (clips)"), targets, strict=True):
        record, was_read = explain_clip(job, int(row), int(target))
        records.append(record)
        if was_read:
            resumed.append(int(row))
    result = _assemble(rows, targets, records, config, job.faithfulness.baseline)
    result.resumed = resumed
    result.wavs = {name: job.wav(name) for row in rows for name in job.wav_names(int(row))}
    if adapter is not None:
        _change(result, ws, records, config.methods)
    if heads_from is not None:
        _heads(result, ws, fold, *heads_from, config.batch_size)
    result.clips = clip_table(result, ws, records, config)
    _figures(result, ws, config)
    readings = baseline_readings(job.scorer, ws, fold, rows, job.faithfulness.baseline, config.batch_size)
    _write(result, ws, fold, root, config, summary(result, ws, fold, config, readings))
    return result


def _assemble(rows, targets, records: list[dict], config: SaliencyConfig, baseline: Baseline) -> SaliencyResult:
    """The run's arrays and faithfulness table from its clips' records."""
    methods = config.methods
    maps = {m: np.stack([r["maps"][j] for r in records]) for j, m in enumerate(methods)}
    randomised = {m: np.stack([r["randomised"][j] for r in records]) for j, m in enumerate(methods)}
    for name in ("score", "baseline_score", "ig_delta", "ig_steps", "ig_converged"):
        if name in records[0]:
            maps[name] = np.concatenate([r[name] for r in records])
    names = [str(n) for n in records[0]["curve_names"]]
    curves = faith.Curves({name: {mode: np.stack([r["curves"][i][k] for r in records]) for k, mode in enumerate(MODES)}
                           for i, name in enumerate(names)})  # fmt: skip
    similarity = {m: faith.map_rank_correlation(maps[m], randomised[m]) for m in methods}
    table = faith.faithfulness_table(curves, methods, similarity, config.min_change)
    table.insert(1, "baseline", config.baseline)
    return SaliencyResult(np.asarray(rows), np.asarray(targets), maps, randomised, table, curves, baseline=baseline)


def _change(result: SaliencyResult, ws, records: list[dict], methods: Sequence[str]) -> None:
    log_mels = np.asarray(ws.features.input_features[result.rows], dtype=np.float32)[:, 0]
    changes = [saliency_change(np.stack([r["before"][j] for r in records]), result.maps[m], log_mels,
                               ws.bundle.feature_extractor) for j, m in enumerate(methods)]
    result.change_clips = pd.concat([c.assign(method=m) for m, (c, _) in zip(methods, changes, strict=True)])
    result.change_regions = pd.concat([r.assign(method=m) for m, (_, r) in zip(methods, changes, strict=True)])


def _figures(result: SaliencyResult, ws, config: SaliencyConfig) -> None:
    extractor, methods = ws.bundle.feature_extractor, config.methods
    hop_seconds = extractor.hop_length / extractor.sampling_rate
    mel_hz = mel_centres(extractor)
    for i, row in enumerate(result.rows):
        log_mel = np.asarray(ws.features.input_features[row], dtype=np.float32)[0]
        maps = {m: result.maps[m][i] for m in methods}
        padding = padding_of(ws, int(row))
        result.figures[f"saliency_clip{row}"] = plots.saliency_figure(
            log_mel, maps, hop_seconds, mel_hz, clip_title(result, ws, i, padding), UNITS, padding.copies_at)
    clips = (len(result.rows), int(result.curves.explainable(config.min_change).sum()))
    result.figures["curves"] = plots.curves_figure(result.curves.means(config.min_change), methods, SCORE_LABEL, clips)
    if result.change_regions is not None:
        first = methods[-1]
        result.figures["change"] = plots.change_figure(
            result.change_regions[result.change_regions["method"] == first],
            result.change_clips[result.change_clips["method"] == first],
        )


def _write(result: SaliencyResult, ws, fold: int, root: Path, config: SaliencyConfig, record: dict) -> None:
    paths = result.paths
    paths["faithfulness"] = write_csv(root / "faithfulness.csv", result.faithfulness)
    paths["clips"] = write_csv(root / "clips.csv", result.clips)
    means = result.curves.means(config.min_change)
    curve_rows = [{"ordering": name, "mode": mode, "step": k, "score": float(raw[k]), "normalised": float(norm[k])}
                  for name, per_mode in means.items() for mode, (raw, norm) in per_mode.items()
                  for k in range(len(raw))]  # fmt: skip
    paths["curves"] = write_csv(root / "curves.csv", pd.DataFrame.from_records(curve_rows))
    arrays = {"rows": result.rows, "targets": result.targets, **result.maps}
    arrays.update({f"randomised_{k}": v for k, v in result.randomised_maps.items()})
    paths["maps"] = write_npz(root / "maps.npz", arrays, compressed=True)
    for name, frame in (("heads_attribution", result.heads), ("head_vs_ablation", result.head_vs_ablation),
                        ("change_clips", result.change_clips), ("change_regions", result.change_regions)):
        if frame is not None:
            paths[name] = write_csv(root / f"{name}.csv", frame)
    paths.update({f"wav_{name}": path for name, path in result.wavs.items()})
    for name, fig in result.figures.items():
        paths[f"png_{name}"] = save_figure(fig, root / "figures" / f"{name}.png")
    paths["summary"] = write_json(root / "summary.json", {**record, "provenance": ws.provenance()})
