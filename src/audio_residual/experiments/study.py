"""The whole study on one dataset and model: analysis → sweep (nested choice) → ResiDual → baselines →
k-shot protocols → zero-shot transfer → report.

    ws = Workspace.open("esc50", model="laion/clap-htsat-unfused")
    config = StudyConfig(grid=DEFAULT_GRID, base={"val_fraction": 0.1}, shots=(1, 2, 4, 8, 16), seeds=3)
    outcome = run_study(ws, "runs/esc50", config, transfer={"us8k": target_workspace(ws, us8k_table)})

Each step resumes from what the output folder already holds under the same key (see `RunLayout`), so a
killed run continues where it stopped and a rerun with other options computes only what changed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from audio_residual.analysis.run import AnalysisResult, run_analysis
from audio_residual.analysis.saliency_run import run_saliency
from audio_residual.data_processing.synthetic import GENERATOR_JSON
from audio_residual.evaluation.report import write_report
from audio_residual.evaluation.store import ResultsStore
from audio_residual.experiments.baselines import run_baselines, saved_encoders
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.experiments.residual import (
    chosen_configs,
    fold_lambdas,
    method_name,
    train_chosen_per_fold,
)
from audio_residual.experiments.sweep import (
    DEFAULT_PRESET,
    choose_per_fold,
    mean_ranking,
    presets,
    run_sweep,
)
from audio_residual.experiments.transfer import transfer_table
from audio_residual.io import update_csv
from audio_residual.layout import RunLayout
from audio_residual.methods import REGISTRY
from audio_residual.workspace import Workspace


@dataclass
class StudyOutcome:
    """What a study produced, beside the files under its output folder."""

    analysis: AnalysisResult
    analysis_fold: int
    sweep: pd.DataFrame  # one row per grid point (fold included)
    chosen: dict[int, dict]  # test fold → options chosen on that fold's own validation split (default preset)
    store: ResultsStore  # this run's rows (full data in `frame`, k-shot rows too in `all_regimes`)
    table: str  # the comparison, markdown
    timings: dict[str, float] = field(default_factory=dict)
    transfer: pd.DataFrame | None = None  # zero-shot retention on other datasets (`transfer_table`)
    saliency: pd.DataFrame | None = None  # faithfulness of the saliency maps (`config.saliency_clips` > 0)


def run_study(
    ws: Workspace,
    out: str | Path,
    config: StudyConfig,
    use_wandb: str | bool = False,
    analysis_options: dict | None = None,
    peer_options: Mapping[str, Mapping[str, Any]] | None = None,
    transfer: Mapping[str, Workspace] | None = None,
    name: str | None = None,
) -> StudyOutcome:
    """Every step of the study; writes results.csv, report.md and figures under `out`.

    `config.methods` are the baselines (fine-tuning joins with `config.finetune_epochs > 0`); ResiDual always
    runs, one method per preset of the grid plus the coarse twin. With `config.shots`, every method runs again
    on each k-shot draw (`config.seeds` draws per k), ResiDual with its configuration chosen per fold on the
    draw's own validation clips from `config.few_shot()`. `transfer` maps dataset names to workspaces on this model
    (`evaluation.transfer.target_workspace`): each fold's adapted encoders are scored zero-shot on all of
    their clips, next to the plain model, into `transfer.csv`; `name` names this dataset there.
    """
    layout = RunLayout.of(out)
    timings = {}
    started = time.perf_counter()
    analysis = run_analysis(ws, fold=config.analysis_fold, out_dir=layout.analysis, **(analysis_options or {}))
    shutil.copyfile(analysis.paths["heads"], layout.heads)
    timings["analysis"] = time.perf_counter() - started

    started = time.perf_counter()
    sweep = run_sweep(ws, layout, config, use_wandb=use_wandb)
    timings["sweep"] = time.perf_counter() - started

    started = time.perf_counter()
    few_shot = config.protocols()
    store = run_baselines(
        ws, layout, methods=config.methods, val_fraction=config.val_fraction,
        finetune_epochs=config.finetune_epochs, peer_options=peer_options, protocols=[FULL_DATA, *few_shot],
    )
    chosen = train_chosen_per_fold(ws, sweep, config, layout, store)  # nested: fold k chooses without k
    timings["comparison"] = time.perf_counter() - started

    if few_shot:
        started = time.perf_counter()
        few_shot_residual(ws, layout, config, store, few_shot)
        timings["few-shot"] = time.perf_counter() - started

    table = None
    if transfer:
        started = time.perf_counter()
        table = run_transfer(ws, layout, sweep, config, store, transfer, name or ws.table.name)
        timings["transfer"] = time.perf_counter() - started

    saliency = None
    if config.saliency_clips:
        started = time.perf_counter()
        saliency = run_saliency(
            ws, config.analysis_fold, layout / "saliency", clips=config.saliency_clips, analysis=analysis
        ).faithfulness
        timings["saliency"] = time.perf_counter() - started

    outcome = StudyOutcome(analysis, config.analysis_fold, sweep, chosen, store, "", timings, table, saliency)
    outcome.table = write_report(
        store, layout, ws.table.class_names, title=_title(ws), intro=describe(ws), sections=_sections(outcome),
        transfer=table,
    )
    return outcome


def few_shot_residual(
    ws: Workspace, out: str | Path | RunLayout, config: StudyConfig, store: ResultsStore, protocols: Sequence[Protocol]
) -> None:
    """ResiDual on each k-shot draw, into `store`: the draw's own sweep over `config.few_shot()`'s grid (in the
    draw's layout) and each fold's configuration chosen on that draw's validation clips (nested)."""
    layout = RunLayout.of(out)
    small = config.few_shot()
    for protocol in protocols:
        draw = layout.few_shot(protocol.shots, protocol.seed)
        draw_sweep = run_sweep(ws, draw, small, use_wandb=False, protocol=protocol)
        train_chosen_per_fold(ws, draw_sweep, small, draw, store, protocol=protocol)


def run_transfer(
    ws: Workspace,
    out: str | Path | RunLayout,
    sweep: pd.DataFrame,
    config: StudyConfig,
    store: ResultsStore,
    targets: Mapping[str, Workspace],
    source: str,
) -> pd.DataFrame:
    """Zero-shot retention of this study's adapted encoders on each target dataset → `transfer.csv`."""
    table = transfer_table(targets, adapted_encoders(ws, sweep, config, out, store, source))
    update_csv(RunLayout.of(out).transfer, table, ("source", "method", "target"))  # other writers' rows kept
    return table


def adapted_encoders(
    ws: Workspace, sweep: pd.DataFrame, config: StudyConfig, out: str | Path | RunLayout, store: ResultsStore,
    source: str,
) -> dict[tuple[str, str], list]:
    """(source, method) → the encoder adapted on each full-data fold: every ResiDual method of the study
    (λ as trained, selected epoch) and every transferable registered method (the contrastive adapter's map),
    those of them `store` holds rows of: the methods that keep CLAP's text side."""
    trained = store.methods()  # this session's full-data methods
    encoders = {
        (source, method_name(configs.values())): fold_lambdas(ws, configs, out)
        for configs in chosen_configs(sweep, config).values()
        if method_name(configs.values()) in trained
    }
    for name, method in REGISTRY.items():
        if method.transferable and name in trained:
            encoders[(source, name)] = saved_encoders(store, out, name)
    return encoders


def dataset_labels(sources: Sequence[str | Path]) -> list[str]:
    """Short distinct names for datasets given as paths or ids: the last path part, more parts on a clash."""
    parts = [Path(str(s)).parts or (str(s),) for s in sources]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def _generated(ws: Workspace) -> bool:
    return (_data_root(ws) / GENERATOR_JSON).is_file()


def _data_root(ws: Workspace) -> Path:
    return ws.table.audio_dir if ws.table.name == "csv" else ws.table.audio_dir.parent


def _title(ws: Workspace) -> str:
    offline = ws.bundle.model_id in ("tiny", "tiny-random")
    return "Audio-ResiDual " + ("offline demo" if offline and _generated(ws) else "study")


def describe(ws: Workspace) -> list[str]:
    """What was actually used: the data's layout and origin (generated or recorded), and the model."""
    table, generated = ws.table, _generated(ws)
    tiny, tiny_pretrained = ws.bundle.model_id == "tiny-random", ws.bundle.model_id == "tiny"
    layouts = {"esc50": "ESC-50 layout", "urbansound8k": "UrbanSound8K layout", "csv": "clips listed in a CSV"}
    origin = "generated by `make_synthetic_esc50`" if generated else "audio recordings"
    model = "the tiny random-initialised CLAP (offline test model)" if tiny else f"`{ws.bundle.model_id}`"
    if tiny_pretrained:
        model = "the tiny CLAP pretrained on generated captioned audio (`--model tiny`, shipped offline)"
    caveats = [
        "The model is random-initialised: its figures say the pipeline works, not how CLAP behaves." if tiny else "",
        "The model is a toy CLAP trained for minutes on generated sounds, not LAION's." if tiny_pretrained else "",
        "The data is generated (tones, noise bands, clicks, chirps), not recorded sound." if generated else "",
    ]
    return [
        f"Data: {layouts.get(table.name, table.name)} at `{_data_root(ws)}`, {origin}: {len(table)} clips, "
        f"{len(table.class_names)} classes, {len(table.fold_ids)} folds; model: {model}.",
        " ".join(c for c in caveats if c),
    ]


def _sections(outcome: StudyOutcome) -> list[str]:
    return study_sections(
        outcome.chosen, outcome.sweep, outcome.analysis.spectra, outcome.analysis_fold, outcome.timings,
        outcome.saliency,
    )


def study_sections(
    chosen: Mapping[int, dict],
    sweep: pd.DataFrame,
    heads: pd.DataFrame | None,
    analysis_fold: int,
    timings: Mapping[str, float],
    saliency: pd.DataFrame | None = None,
) -> list[str]:
    """The report's study sections (nested choices, sweep, heads when analysed, saliency when run, time when
    measured): `run_study` and notebook 3, which assembles the same study cell by cell, write the same report."""
    return [
        "",
        "ResiDual configuration of each fold, chosen by that fold's validation split (clips of the other folds;"
        " the test fold takes no part):",
        "",
        *[f"- fold {fold}: `{json.dumps(options)}`" for fold, options in chosen.items()],
        *[
            f"- fold {fold} ({preset} preset): `{json.dumps(options)}`"
            for preset in presets(sweep)
            if preset != DEFAULT_PRESET
            for fold, options in choose_per_fold(sweep, preset).items()
        ],
        "",
        "## Sweep (mean over folds, ranked by validation accuracy; for reading only, not used to choose)",
        "",
        "```",
        mean_ranking(sweep).head(6).to_string(index=False),
        "```",
        *([] if heads is None else heads_section(heads, analysis_fold)),
        "",
        "Per-fold metrics in `results.csv`; λ per fold under `runs/`.",
        *([] if saliency is None else saliency_section(saliency, analysis_fold)),
        *(["", "## Time (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())] if timings else []),
        "",
    ]


def heads_section(heads: pd.DataFrame, fold: int) -> list[str]:
    """Mean intrinsic dimension and participation ratio of the head contributions, per stage."""
    contribution = heads[(heads["view"] == "contribution") & (heads["granularity"] == "head")]
    per_stage = contribution.groupby("stage")[["id90", "participation_ratio"]].mean().round(2)
    return [
        "",
        f"## Attention heads (fold {fold} training clips): mean intrinsic dimension (90 % EVR) and participation"
        " ratio",
        "",
        "```",
        per_stage.to_string(),
        "```",
        "",
        "One row per unit in `heads.csv`.",
    ]


def saliency_section(faithfulness: pd.DataFrame, fold: int) -> list[str]:
    """Faithfulness of each attribution (deletion/insertion AUC against a random order and a randomised
    model); maps, curves and wavs are under `saliency/`."""
    return [
        "",
        f"## Saliency (fold {fold} test clips): faithfulness of each attribution",
        "",
        "```",
        faithfulness.to_string(index=False),
        "```",
        "",
        "Deletion AUC: lower is better; insertion AUC: higher is better. Maps, curves and listenable wavs are in"
        " `saliency/` (`saliency/figures/`, `saliency/wavs/`).",
    ]
