"""The one study runner, for every task: analysis → sweep → every method on every split and protocol → transfer →
saliency → report, each a step a notebook can call on its own.

    ws = Workspace.open("esc50", ModelSource("laion/clap-htsat-unfused"))
    study = Study(ws, "runs/esc50", StudyConfig(shots=(1, 2, 4, 8, 16), seeds=3))
    study.sweep()                      # ResiDual's grid points (W&B agents when online)
    store = study.methods()            # every registered method of the task, nested choices included
    study.transfer({"us8k": ws.on("data/UrbanSound8K")})
    study.report()
    # or all of it: run_study(ws, "runs/esc50", config, transfer=...)

Every method, ResiDual included, runs through the task's registry (`methods`), keyed by everything that produced
its rows (`Workspace.key`), into the locked results store of the task, and is reported by the one report writer:
a killed run continues where it stopped, and a rerun with other options computes only what changed.
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
from tqdm.auto import tqdm

from audio_residual.data_processing.synthetic import GENERATOR_JSON
from audio_residual.evaluation.report import write_report
from audio_residual.evaluation.store import ResultsStore
from audio_residual.evaluation.transfer import transfer_table
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.experiments.sweep import finished_sweep, mean_ranking, run_sweep
from audio_residual.io import update_csv, write_json
from audio_residual.layout import RunLayout
from audio_residual.methods import Context, Method
from audio_residual.methods.base import release_memory
from audio_residual.tasks import get_task
from audio_residual.training.tracking import RunTracker
from audio_residual.workspace import Workspace


@dataclass
class StudyOutcome:
    """What a study produced, beside the files under its output folder."""

    store: ResultsStore  # this run's rows (full data in `frame`, k-shot rows too in `all_regimes`)
    table: str  # the comparison, markdown
    sweep: pd.DataFrame | None = None  # one row per grid point (fold included)
    analysis: Any = None  # the analysis fold's `AnalysisResult` (labelled data)
    transfer: pd.DataFrame | None = None  # zero-shot retention on other datasets (`transfer_table`)
    saliency: pd.DataFrame | None = None  # faithfulness of the saliency maps (`config.saliency_clips` > 0)
    timings: dict[str, float] = field(default_factory=dict)


class Study:
    """One study's steps on one dataset and model; `config.task` decides the methods, columns and metrics."""

    def __init__(self, ws: Workspace, out: str | Path | RunLayout, config: StudyConfig, wandb: str = "disabled",
                 name: str | None = None):
        self.ws, self.layout, self.config, self.wandb = ws, RunLayout.of(out), config, wandb
        self.task = get_task(config.task)
        if ws.captioned != self.task.captioned:
            kind = "captioned audio" if self.task.captioned else "a labelled dataset"
            raise ValueError(f"the {self.task.name} task reads {kind}; {ws.table.name} is not one")
        self.name = name or ws.table.name
        self.store = ResultsStore(self.layout.results_for(self.task.name), self.task)
        self.fitted: dict[tuple[str, int], tuple[Method, Any]] = {}  # (label, fold) → this session's full-data fit
        self.sweep_frame: pd.DataFrame | None = None
        self.analysis_result = None
        self.transfer_frame: pd.DataFrame | None = None
        self.saliency_frame: pd.DataFrame | None = None
        self.examples: list[dict] = []
        self.timings: dict[str, float] = {}
        self._methods_checked = False

    # --- steps -----------------------------------------------------------------------------------------------
    def analyze(self, **options):
        """Unit spectra, attention-pattern PCA and head ablation of the analysis fold (labelled data)."""
        from audio_residual.analysis.run import run_analysis

        self.analysis_result = run_analysis(self.ws, fold=self.config.analysis_fold, out_dir=self.layout.analysis,
                                            **options)
        shutil.copyfile(self.analysis_result.paths["heads"], self.layout.heads)
        return self.analysis_result

    def sweep(self, protocol: Protocol = FULL_DATA) -> pd.DataFrame | None:
        """Train every ResiDual grid point on every fold of `protocol` (W&B agents when online), so the ResiDual
        methods' nested choice reads them instead of training them; None when no method has a grid."""
        if not any("grid" in self.config.method(name).defaults for name in self.config.methods):
            return None
        config = self.config if protocol.full_data else self.config.few_shot()
        wandb = self.wandb if protocol.full_data else "disabled"
        frame = run_sweep(self.ws, protocol.layout(self.layout), config, use_wandb=wandb, protocol=protocol,
                          task=self.task)
        if protocol.full_data:
            self.sweep_frame = frame
        return frame

    def finished_sweep(self) -> pd.DataFrame:
        """The sweep an earlier step (notebook 2, `audio-residual sweep`) finished into this folder; it is never
        trained by surprise: a missing point stops with the cell and the command to run."""
        self.sweep_frame = finished_sweep(self.ws, self.layout, self.config)
        return self.sweep_frame

    def methods(self, protocols: Sequence[Protocol] | None = None, force: bool = False,
                folds: Sequence[int] | None = None) -> ResultsStore:
        """Every method of `config.methods` on every split (of `folds`, default all) of every protocol (default:
        full data and the k-shot draws), skipping rows the store holds under the same key unless `force`."""
        protocols = [FULL_DATA, *self.config.protocols()] if protocols is None else list(protocols)
        self._check_methods()
        todo = [(protocol, split, name) for protocol in protocols
                for split in protocol.splits(self.ws, self.config.val_fraction, self.config.seed)
                if folds is None or split.fold in folds
                for name in self.config.methods if self._runs_on(name, split.fold)
                and (force or not self._stored(name, split.fold, protocol))]
        tracker = RunTracker(self.wandb, config={"study": _jsonable(self.config)}, wandb_dir=self.layout.root,
                             job_type=f"{self.task.name}-methods") if todo else None
        for protocol, split, name in tqdm(todo, desc=f"{self.task.name} methods", disable=not todo):
            self._run(name, split, protocol, tracker)
        if tracker is not None:
            tracker.finish()
        return self.store

    def _check_methods(self) -> None:
        """Bad method options stop the study before anything trains; checked once (a check may load a model)."""
        if not self._methods_checked:
            for name in self.config.methods:
                self.config.method(name).check(self.config.method_options(name), self.ws)
            self._methods_checked = True

    def transfer(self, targets: Mapping[str, Workspace]) -> pd.DataFrame:
        """Zero-shot retention of this study's adapted encoders (full data, every fold) on each target dataset,
        opened on this model and audio configuration (`Workspace.on`) → `transfer.csv`."""
        encoders = {}
        for name in self.config.methods:
            method, options = self.config.method(name), self.config.method_options(name)
            label = method.label(options)
            rows = self.store.frame[self.store.frame["method"] == label]
            if method.transferable and len(rows):
                encoders[(self.name, label)] = [(method, self._model(name, int(fold))) for fold in sorted(rows["fold"])]
        self.transfer_frame = transfer_table(targets, encoders)
        update_csv(self.layout.transfer, self.transfer_frame, ("source", "method", "target"))  # others' rows kept
        return self.transfer_frame

    def saliency(self) -> pd.DataFrame:
        """Saliency maps of `config.saliency_clips` test clips of the analysis fold, and their faithfulness."""
        from audio_residual.analysis.saliency_run import SaliencyConfig, run_saliency

        result = run_saliency(self.ws, self.config.analysis_fold, self.layout / "saliency",
                              SaliencyConfig(clips=self.config.saliency_clips), analysis=self.analysis_result)
        self.saliency_frame = result.faithfulness
        return self.saliency_frame

    def report(self, sections: Sequence[str] = ()) -> str:
        """report.md (and summary.csv, table.md, figures) of this session's rows, with the study's sections."""
        self._examples()
        return write_report(self.store, self.layout, None if self.ws.captioned else self.ws.table.class_names,
                            title=_title(self.ws), intro=describe(self.ws), transfer=self.transfer_frame,
                            sections=[*self.sections(), *sections])

    def run(self, transfer: Mapping[str, Workspace] | None = None, analysis_options: dict | None = None
            ) -> StudyOutcome:
        """Every step the data allows, timed; the report last."""
        self._check_methods()  # before the analysis or the sweep trains
        steps = [("sweep", lambda: [self.sweep(p) for p in [FULL_DATA, *self.config.protocols()]]),
                 ("methods", self.methods)]
        if not self.ws.captioned:
            steps.insert(0, ("analysis", lambda: self.analyze(**(analysis_options or {}))))
        if transfer:
            steps.append(("transfer", lambda: self.transfer(transfer)))
        if self.config.saliency_clips and not self.ws.captioned:
            steps.append(("saliency", self.saliency))
        for step, run in steps:
            started = time.perf_counter()
            run()
            self.timings[step] = time.perf_counter() - started
        table = self.report()
        return StudyOutcome(self.store, table, self.sweep_frame, self.analysis_result, self.transfer_frame,
                            self.saliency_frame, self.timings)

    # --- one method on one split -----------------------------------------------------------------------------
    def key(self, name: str, protocol: Protocol) -> str:
        """What `name`'s rows depend on besides the data: its procedure, the split, the protocol."""
        method, options = self.config.method(name), self.config.method_options(name)
        split = {"val_fraction": self.config.val_fraction, "seed": self.config.seed}
        return self.ws.key({**method.procedure(options), "split": split, **protocol.procedure()})

    def _runs_on(self, name: str, fold: int) -> bool:
        """Whether `name` has anything to run on `fold` (ResiDual: only the folds its grid names)."""
        return self.config.method(name).runs_on(self.config.method_options(name), fold)

    def _stored(self, name: str, fold: int, protocol: Protocol) -> bool:
        method = self.config.method(name)
        label, key = method.label(self.config.method_options(name)), self.key(name, protocol)
        stored = self.store.reuse(label, fold, key, protocol.shots, protocol.seed)
        if stored and method.transferable and method.saves and protocol.full_data:
            stored = self.layout.adapter(label, key, fold).is_file()  # transfer reloads it
        return stored

    def _context(self, name: str, split, protocol: Protocol, tracker=None) -> Context:
        return Context(self.ws, split, self.task, self.config.seed, self.config.method_options(name),
                       protocol.layout(self.layout), tracker, protocol.shots, self.key(name, protocol))

    def _run(self, name: str, split, protocol: Protocol, tracker) -> None:
        method, ctx = self.config.method(name), self._context(name, split, protocol, tracker)
        label, key = method.label(ctx.options), self.key(name, protocol)
        started = time.perf_counter()
        model = method.fit(ctx)
        scores, params = method.scores(model, ctx, split.test), method.trainable_params(model)
        seconds = time.perf_counter() - started
        if protocol.full_data and method.transferable:
            self.fitted[(label, split.fold)] = (method, model)
            if method.saves:
                method.save(model, self.layout.adapter(label, key, split.fold))
        details = method.details(model)
        seconds = details.pop("seconds", seconds)  # a method that read back runs trained earlier says their cost
        self.store.add_evaluation(label, split.fold, key, scores, self.task.targets(self.ws, split.test), params,
                                  seconds, **details, **protocol.columns())
        if not (protocol.full_data and method.transferable):
            del model
            release_memory(self.ws)

    def _model(self, name: str, fold: int):
        """`name`'s full-data fit on `fold`: this session's, else saved by an earlier run, else fitted again."""
        method = self.config.method(name)
        label = method.label(self.config.method_options(name))
        if (label, fold) not in self.fitted:
            path = self.layout.adapter(label, self.key(name, FULL_DATA), fold)
            if method.saves and path.is_file():
                self.fitted[(label, fold)] = (method, method.load(path, self.ws))
            else:
                split = self.ws.split(fold, self.config.val_fraction, self.config.seed)
                self.fitted[(label, fold)] = (method, method.fit(self._context(name, split, FULL_DATA)))
        return self.fitted[(label, fold)][1]

    # --- the report's study sections -------------------------------------------------------------------------
    def _examples(self) -> None:
        """Per-query examples of the task (retrieval): of the baseline, and of the trained method with the best
        validation score among those fitted this session (a reused row's model is not refitted for this)."""
        if not (self.config.examples and self.task.has_examples):
            return
        frame = self.store.frame
        fitted = {label for label, _ in self.fitted}
        trained = frame[(frame["trainable_params"] > 0) & frame["method"].isin(fitted)]
        wanted = [self.task.baseline, *trained.sort_values("val_score", ascending=False, kind="stable")["method"][:1]]
        self.examples = []
        for name in self.config.methods:
            method = self.config.method(name)
            label = method.label(self.config.method_options(name))
            folds = sorted(frame.loc[frame["method"] == label, "fold"])
            if label not in wanted or not folds:
                continue
            model = self._model(name, int(folds[0]))
            split = self.ws.split(int(folds[0]), self.config.val_fraction, self.config.seed)
            scores = method.scores(model, self._context(name, split, FULL_DATA), split.test)
            self.examples += [{"method": label, **example}
                              for example in self.task.examples(self.ws, scores, split.test, self.config.examples)]
        if self.examples:
            write_json(self.layout.examples, self.examples)

    def sections(self) -> list[str]:
        """Nested choices, the sweep, heads when analysed, examples, saliency when run, time when measured."""
        heads = None if self.analysis_result is None else self.analysis_result.spectra
        if heads is None and self.layout.analysis.heads.is_file():  # notebook 1's analysis of the same folder
            heads = pd.read_csv(self.layout.analysis.heads)
        return study_sections(self.store.frame, self.sweep_frame, heads, self.config.analysis_fold, self.timings,
                              self.saliency_frame, self.task, self.examples)


def run_study(ws: Workspace, out: str | Path, config: StudyConfig, use_wandb: str = "disabled",
              analysis_options: dict | None = None, transfer: Mapping[str, Workspace] | None = None,
              name: str | None = None) -> StudyOutcome:
    """Every step of the study (`Study.run`); writes the results table, report.md and figures under `out`."""
    return Study(ws, out, config, use_wandb, name).run(transfer, analysis_options)


def _jsonable(config: StudyConfig) -> dict:
    return json.loads(json.dumps(config.__dict__, default=str))


def dataset_labels(sources: Sequence[str | Path]) -> list[str]:
    """Short distinct names for datasets given as paths or ids: the last path part, more parts on a clash."""
    parts = [Path(str(s)).parts or (str(s),) for s in sources]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def _data_root(ws: Workspace) -> Path:
    table = ws.table
    return table.audio_dir if ws.captioned or table.name == "csv" else table.audio_dir.parent


def _generated(ws: Workspace) -> bool:
    return (_data_root(ws) / GENERATOR_JSON).is_file()


def _title(ws: Workspace) -> str:
    offline = ws.bundle.model_id in ("tiny", "tiny-random")
    return "Audio-ResiDual " + ("offline demo" if offline and _generated(ws) else "study")


def describe(ws: Workspace) -> list[str]:
    """What was actually used: the data's layout and origin (generated or recorded), and the model."""
    table, generated = ws.table, _generated(ws)
    tiny, tiny_pretrained = ws.bundle.model_id == "tiny-random", ws.bundle.model_id == "tiny"
    layouts = {"esc50": "ESC-50 layout", "urbansound8k": "UrbanSound8K layout", "csv": "clips listed in a CSV",
               "clotho": "Clotho layout", "audiocaps": "AudioCaps layout", "captions": "captions.csv"}
    origin = "generated" if generated else "audio recordings"
    model = "the tiny random-initialised CLAP (offline test model)" if tiny else f"`{ws.bundle.model_id}`"
    if tiny_pretrained:
        model = "the tiny CLAP pretrained on generated captioned audio (`--model tiny`, shipped offline)"
    shape = (f"{len(table)} clips in splits {table.counts()}" if ws.captioned else
             f"{len(table)} clips, {len(table.class_names)} classes, {len(table.fold_ids)} folds")
    caveats = [
        "The model is random-initialised: its figures say the pipeline works, not how CLAP behaves." if tiny else "",
        "The model is a toy CLAP trained for minutes on generated sounds, not LAION's." if tiny_pretrained else "",
        "The data is generated (tones, noise bands, clicks, chirps), not recorded sound." if generated else "",
    ]
    return [
        f"Data: {layouts.get(table.name, table.name)} at `{_data_root(ws)}`, {origin}: {shape}; model: {model}.",
        " ".join(c for c in caveats if c),
    ]


def study_sections(frame: pd.DataFrame, sweep: pd.DataFrame | None, heads: pd.DataFrame | None, analysis_fold: int,
                   timings: Mapping[str, float], saliency: pd.DataFrame | None = None, task=None,
                   examples: Sequence[dict] = ()) -> list[str]:
    """The report's study sections (`Study.report` and notebook 3 write the same report)."""
    task = task or get_task("classification")
    lines = [*choices_section(frame)]
    if sweep is not None and not sweep.empty:
        lines += ["", f"## Sweep (mean over folds, ranked by validation {task.selection_metric}; for reading only, "
                  "not used to choose)", "", "```", mean_ranking(sweep, task.selection_metric).head(6).to_string(index=False),
                  "```"]  # fmt: skip
    if heads is not None:
        lines += heads_section(heads, analysis_fold)
    if examples:
        lines += ["", "## Per-query examples (top-5 texts; ✓ = the clip's own)", "", task.examples_markdown(list(examples))]
    if saliency is not None:
        lines += saliency_section(saliency, analysis_fold)
    if timings:
        lines += ["", "## Time (s)", "", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    return [*lines, ""]


def choices_section(frame: pd.DataFrame) -> list[str]:
    """What each choosing method chose on each fold, by that fold's own validation split."""
    if "chosen" not in frame or frame["chosen"].isna().all():
        return []
    lines = ["", "## Choices made on validation", "",
             "Each fold's configuration, chosen by that fold's validation split (clips of the training folds; the test "
             "fold takes no part):", ""]
    chosen = frame.dropna(subset=["chosen"])
    chosen = chosen.iloc[chosen["method"].map(list(dict.fromkeys(chosen["method"])).index).argsort(kind="stable")]
    lines += [f"- {row.method}, fold {int(row.fold)}: `{row.chosen}`" for row in chosen.itertuples(index=False)]
    return lines


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
