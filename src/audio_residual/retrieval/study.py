"""The retrieval study: zero-shot and every adapted method, chosen on validation, reported on test.

    data = RetrievalData.open("data/clotho", model="laion/clap-htsat-unfused")
    outcome = run_retrieval_study(data, "runs/retrieval", RetrievalStudyConfig())

Writes `retrieval.csv` (one row per method × direction: r1, r5, r10, map10, ranks, random baseline,
trainable_params, seconds, kept epoch, validation mean R@1, and the key of what produced it),
`retention.csv` with `--retention`, the R@1-against-parameters figure, per-query examples and `report.md`.
Rows are keyed by the data as the model saw it and the method's options: a rerun reuses stored rows of
the same key and computes only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from audio_residual.clap.zeroshot import DEFAULT_TEMPLATES, class_prompts
from audio_residual.evaluation.retrieval import retrieval_ranks, top_captions
from audio_residual.io import save_figure, write_csv, write_json, write_text
from audio_residual.methods.base import REGISTRIES, Context
from audio_residual.methods.retrieval import RetrievalSplits
from audio_residual.retrieval.data import AudioSource, CaptionSplit, RetrievalData
from audio_residual.retrieval.methods import Fit, Fitted, TextCache, split_metrics
from audio_residual.retrieval.text_encoders import TextEncoder, load_text_encoder
from audio_residual.tasks.retrieval import RETRIEVAL
from audio_residual.training.tracking import RunTracker
from audio_residual.training.trainer import PRESETS

RETRIEVAL_METHODS = REGISTRIES[RETRIEVAL.name]
METHODS = tuple(RETRIEVAL_METHODS)  # registration order
DEFAULT_METHODS = tuple(name for name, method in RETRIEVAL_METHODS.items() if method.by_default)
DEFAULT_LR = {"residual": 1e-2, "projection": 1e-3, "tap": 1e-3, "lora": 1e-4, "finetune": 1e-5}
ROW_COLUMNS = ("method", "direction", "r1", "r5", "r10", "map10", "mean_rank", "median_rank", "random_r1",
               "random_r5", "random_r10", "trainable_params", "seconds", "best_epoch", "val_mean_r1", "n_audio",
               "n_text", "dataset", "model", "key")


@dataclass(frozen=True)
class RetrievalStudyConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    epochs: int = 5
    batch_size: int = 32
    patience: int | None = None
    seed: int = 0
    lr: dict = field(default_factory=lambda: dict(DEFAULT_LR))
    residual_grid: tuple[dict, ...] = ({"granularity": "head"},)  # ResiDual configurations, chosen on validation
    projection_source: str = "embedding"  # or "pooled": the encoder output before CLAP's projection
    text_model: str | None = None  # the projection's text side: None = CLAP's own tower
    learn_temperature: bool = False
    tap_dim: int = 64
    lora_rank: int = 8
    block: int = 256
    examples: int = 3
    wandb: str = "disabled"  # W&B mode of the training loop's per-epoch records (auto, online, offline)

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown retrieval method(s) {unknown}; known: {list(METHODS)}")

    def fit(self, method: str) -> Fit:
        return Fit(epochs=self.epochs, lr=self.lr.get(method, 1e-3), batch_size=self.batch_size,
                   patience=self.patience, seed=self.seed)

    def method_options(self, method: str) -> dict:
        """`method`'s own keyword arguments (what `fit_splits` takes besides data, splits, fit and text)."""
        return {"residual": {"grid": tuple(self.residual_grid)}, "residual-paper": {},
                "projection": {"source": self.projection_source, "learn_temperature": self.learn_temperature},
                "tap": {"attn_dim": self.tap_dim}, "lora": {"rank": self.lora_rank}}.get(method, {})

    def procedure(self, method: str) -> dict:
        """What `method`'s rows depend on besides the data: its options and the optimisation."""
        if method == "zero-shot":
            return {"method": method}
        extra = {"preset": PRESETS["paper"]} if method == "residual-paper" else {}
        extra |= {"text_model": self.text_model} if method == "projection" else {}
        return {"method": method, "options": {**self.method_options(method), **extra}, "fit": asdict(self.fit(method))}

    def context(self, method: str, data: RetrievalData, splits: RetrievalSplits, text: TextCache,
                encoder: TextEncoder | None, logger=None, out: Path | None = None) -> Context:
        """The registry's `Context` for `method`: data, official splits, seed, options (fit, text cache)."""
        fit = dataclasses.replace(self.fit(method), logger=logger)
        options = {**self.method_options(method), "fit": fit, "text": text}
        if method == "projection":
            options["encoder"] = encoder
        if method == "finetune":  # `pretrain` writes its checkpoints and the tuned model there
            options["out"] = Path(out or "runs/retrieval") / "finetune"
        return Context(data, splits, None, self.seed, options)


class KeyedRows:
    """A CSV of result rows, one set per (method, key): reruns reuse rows of the same key, writes are atomic."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path, self.columns = Path(path), columns
        self.frame = pd.read_csv(self.path, dtype={"key": str}) if self.path.is_file() else pd.DataFrame(
            columns=list(columns))

    def rows(self, method: str, key: str) -> pd.DataFrame:
        return self.frame[(self.frame["method"] == method) & (self.frame["key"] == key)]

    def put(self, method: str, key: str, rows: list[dict]) -> None:
        """Store `rows` under (method, key), in place of the rows stored there before (else appended)."""
        match = ((self.frame["method"] == method) & (self.frame["key"] == key)).to_numpy()
        at = int(np.argmax(match)) if match.any() else len(self.frame)
        parts = [self.frame[~match].iloc[:at], pd.DataFrame(rows, columns=list(self.columns)),
                 self.frame[~match].iloc[at:]]
        self.frame = pd.concat([p for p in parts if not p.empty], ignore_index=True)
        write_csv(self.path, self.frame)


@dataclass
class RetrievalOutcome:
    table: pd.DataFrame  # this run's test rows, one per method × direction
    retention: pd.DataFrame | None
    fitted: dict[str, Fitted]  # the methods fitted in this session (stored ones are not refitted)
    examples: list[dict]
    out: Path


def method_rows(fitted: Fitted, ctx: Context, key: str, block: int) -> list[dict]:
    """The test rows of a fitted method (one per direction), scored by the retrieval task."""
    test = ctx.split.test
    method = RETRIEVAL_METHODS[fitted.method]
    metrics, _ = RETRIEVAL.evaluate(method.scores(fitted, ctx, test.rows), test.caption_clip, block)
    val = max([fitted.start_score, *(h["val_mean_r1"] for h in fitted.history)])
    common = {"method": fitted.method, "trainable_params": method.trainable_params(fitted), "seconds": fitted.seconds,
              "best_epoch": fitted.best_epoch, "val_mean_r1": val, "n_audio": metrics["n_audio"],
              "n_text": metrics["n_text"], "dataset": ctx.ws.table.name, "model": ctx.ws.bundle.model_id, "key": key}
    return [{**common, **row} for row in RETRIEVAL.rows(metrics)]


def query_examples(fitted: Fitted, data: RetrievalData, test: CaptionSplit, n: int, k: int = 5) -> list[dict]:
    """For `n` test clips spread over the split: the top-k captions (✓ where the clip's own) and the rank of
    each of its true captions among all test captions."""
    scorer = fitted.score(data, test.rows, test.texts)
    ranks = retrieval_ranks(scorer, len(test.rows), test.caption_clip)
    clips = np.unique(np.linspace(0, len(test.rows) - 1, min(n, len(test.rows))).astype(int))
    indices, scores = top_captions(scorer, clips, len(test.texts), k)
    out = []
    for clip, top, values in zip(clips, indices, scores, strict=True):
        own = np.flatnonzero(test.caption_clip == clip)
        out.append({
            "method": fitted.method, "clip": data.table.filenames[test.rows[clip]],
            "top": [{"caption": test.texts[i], "score": float(v), "true": bool(test.caption_clip[i] == clip)}
                    for i, v in zip(top, values, strict=True)],
            "true_ranks": [{"caption": test.texts[i], "rank": int(ranks.a2t[i]) + 1} for i in own],
        })
    return out


def retention_rows(fitted: dict[str, Fitted], source: AudioSource, table, key_of: Callable[[str], str]) -> list[dict]:
    """Zero-shot classification accuracy on a labelled set of each fitted method's adapted model."""
    rows = np.flatnonzero(source.features.valid)
    prompts = class_prompts(table.class_names, DEFAULT_TEMPLATES[0])
    out = []
    for name, fit in fitted.items():
        scores = fit.score(source, rows, prompts)(slice(0, len(rows)), slice(0, len(prompts)))
        accuracy = float((scores.argmax(1).numpy() == table.labels[rows]).mean())
        out.append({"method": name, "accuracy": accuracy, "chance": 1 / len(table.class_names),
                    "dataset": table.name, "n_clips": len(rows), "key": key_of(name)})
    return out


def plot_r1_against_parameters(table: pd.DataFrame):
    """R@1 (both directions) of every method against its trainable parameters, log x; zero-shot and the
    random baseline as horizontal lines (they train nothing)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {"text_to_audio": "tab:blue", "audio_to_text": "tab:orange"}
    for direction, part in table.groupby("direction", sort=False):
        trained = part[part["trainable_params"] > 0]
        ax.scatter(trained["trainable_params"], trained["r1"], color=colors.get(direction), label=direction)
        for _, row in trained.iterrows():
            ax.annotate(row["method"], (row["trainable_params"], row["r1"]), fontsize=8, xytext=(3, 3),
                        textcoords="offset points")
        for _, row in part[part["trainable_params"] == 0].iterrows():
            ax.axhline(row["r1"], color=colors.get(direction), linestyle="--", linewidth=1,
                       label=f"{row['method']} ({direction})")
        ax.axhline(part["random_r1"].iloc[0], color=colors.get(direction), linestyle=":", linewidth=1,
                   label=f"random ({direction})")
    if (table["trainable_params"] > 0).any():
        ax.set_xscale("log")
    else:  # zero-shot only: no point to place on a log axis
        ax.set_xticks([])
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test R@1")
    ax.set_title("Retrieval R@1 against trainable parameters")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def markdown(frame: pd.DataFrame, columns: list[str], digits: int = 3) -> str:
    """A pipe table of `columns` (floats rounded)."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in frame.iterrows()]
    return "\n".join(lines)


TABLE_COLUMNS = ["method", "direction", "r1", "r5", "r10", "map10", "median_rank", "random_r1", "random_r10",
                 "trainable_params", "seconds", "best_epoch", "val_mean_r1"]


def examples_markdown(examples: list[dict]) -> str:
    lines = []
    for ex in examples:
        lines.append(f"**{ex['method']}**, clip `{ex['clip']}`: true captions ranked "
                     + ", ".join(str(t["rank"]) for t in ex["true_ranks"]))
        lines += [f"{i}. {'✓' if t['true'] else '·'} {t['caption']} ({t['score']:.3f})"
                  for i, t in enumerate(ex["top"], 1)]
        lines.append("")
    return "\n".join(lines)


def write_report(outcome: RetrievalOutcome, data: RetrievalData, config: RetrievalStudyConfig) -> Path:
    test = outcome.table
    parts = [
        f"# Audio-text retrieval on {data.table.name}",
        f"Model `{data.bundle.model_id}`; test split: {int(test['n_audio'].iloc[0])} clips, "
        f"{int(test['n_text'].iloc[0])} captions. Every method is chosen on the validation split (epoch 0 "
        "included, selection metric: mean R@1 of both directions) and reported once on test. "
        "R@k and mAP@10 as LAION-CLAP evaluates them; `random_r1` / `random_r10` are a random ranking's R@k.",
        "## Test", markdown(test, TABLE_COLUMNS),
        "![R@1 against trainable parameters](retrieval_r1_vs_params.png)",
    ]
    if outcome.retention is not None:
        parts += ["## Retention: zero-shot classification of the adapted encoders",
                  markdown(outcome.retention, ["method", "accuracy", "chance", "dataset", "n_clips"])]
    if outcome.examples:
        parts += ["## Per-query examples (top-5 captions; ✓ = the clip's own)", examples_markdown(outcome.examples)]
    return write_text(outcome.out / "report.md", "\n\n".join(parts) + "\n")


def run_retrieval_study(data: RetrievalData, out: str | Path, config: RetrievalStudyConfig = RetrievalStudyConfig(),
                        retention: tuple[AudioSource, object] | None = None) -> RetrievalOutcome:
    """Fit (or reuse) every method, write the tables, figure, examples and report under `out`.

    `retention`: (an `AudioSource` on the same model, its labelled `ClipTable`) for zero-shot classification.
    """
    out = Path(out)
    splits = RetrievalSplits.of(data)
    encoder = None  # loaded first: a --text-model that is not a text encoder stops the run before any training
    if config.text_model is not None and "projection" in config.methods:
        encoder = load_text_encoder(config.text_model, data.bundle.device)
    store = KeyedRows(out / "retrieval.csv", ROW_COLUMNS)
    text = TextCache(data.text_encoder())
    fitted: dict[str, Fitted] = {}
    rows = []
    tracker = RunTracker(config.wandb, config={"retrieval": asdict(config), "data": data.table.name},
                         wandb_dir=out, job_type="retrieval")
    for method in config.methods:
        key = data.key(config.procedure(method))
        stored = store.rows(method, key)
        needs_model = retention is not None or method in ("zero-shot",)
        if len(stored) and not needs_model:
            rows.append(stored)
            continue
        ctx = config.context(method, data, splits, text, encoder, tracker, out)
        fitted[method] = RETRIEVAL_METHODS[method].fit(ctx)
        if fitted[method].start_score is None:  # untrained (zero-shot): its validation score, for the table
            fitted[method].start_score = split_metrics(fitted[method], data, splits.validation, config.block)["mean_r1"]
        store.put(method, key, method_rows(fitted[method], ctx, key, config.block))
        rows.append(store.rows(method, key))
    tracker.finish()
    test = splits.test
    table = pd.concat(rows, ignore_index=True)
    save_figure(plot_r1_against_parameters(table), out / "retrieval_r1_vs_params.png")
    examples = [ex for name in ("zero-shot", _best_trained(table, fitted)) if name in fitted
                for ex in query_examples(fitted[name], data, test, config.examples)]
    write_json(out / "examples.json", examples)
    retained = None
    if retention is not None:
        source, labelled = retention
        retained = pd.DataFrame(retention_rows(fitted, source, labelled, lambda m: data.key(config.procedure(m))))
        write_csv(out / "retention.csv", retained)
    outcome = RetrievalOutcome(table, retained, fitted, examples, out)
    write_json(out / "run.json", {"config": asdict(config), "data": data.identity(), "dataset": data.table.name,
                                  "splits": data.table.counts(), "missing": len(data.table.missing),
                                  "skipped": [list(s) for s in data.features.skipped],
                                  "duplicates": [list(d) for d in data.duplicates]})
    write_report(outcome, data, config)
    return outcome


def _best_trained(table: pd.DataFrame, fitted: dict[str, Fitted]) -> str | None:
    """The trained method with the best validation mean R@1 among those fitted this session."""
    trained = table[(table["trainable_params"] > 0) & table["method"].isin(list(fitted))]
    if trained.empty:
        return None
    return str(trained.sort_values("val_mean_r1", ascending=False, kind="stable")["method"].iloc[0])


def describe_missing(data: RetrievalData) -> str:
    """One line on clips the metadata names but the folder lacks (AudioCaps) and audio skipped as bad."""
    return (f"{data.table.name}: {len(data.table)} clips ({json.dumps(data.table.counts())}); "
            f"{len(data.table.missing)} listed but missing, {len(data.features.skipped)} skipped as bad audio, "
            f"{len(data.duplicates)} duplicate audio file(s) within a split")

