"""The one report writer: summary.csv, table.md, few_shot.csv, figures and report.md of an output folder.

Every command that produces results ends here; the whole study (`audio_residual.experiments.study`) adds its own
sections (nested choices, sweep, heads, time), the transfer table and the data description, a single
`train-residual` run only the comparison. Everything is built from this session's rows of the store, so
a report never shows a row that other options produced. The comparison table reads the full-data rows
only; k-shot rows (the store's `all_regimes`) get the few-shot section, and both the headline figure
(accuracy against trainable parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from audio_residual.evaluation import plots
from audio_residual.evaluation.store import (
    ResultsStore,
    markdown_table,
    per_class_deltas,
    summary_table,
    summed_confusion,
)
from audio_residual.evaluation.transfer import transfer_matrix
from audio_residual.io import save_figure, write_csv, write_text
from audio_residual.layout import RunLayout


def write_report(
    store: ResultsStore,
    out: str | Path | RunLayout,
    class_names: Sequence[str] | None = None,
    title: str = "Audio-ResiDual results",
    intro: Sequence[str] = (),
    sections: Sequence[str] = (),
    transfer: pd.DataFrame | None = None,
) -> str:
    """Write summary.csv, table.md, the comparison figures and report.md; return the markdown table.

    The store's task decides the columns, the headline metric and the baseline. `intro` lines go under the
    title (what data and model); the few-shot section (when the store holds k-shot rows), the transfer section
    (`transfer`: rows of `experiments.transfer.transfer_table`) and then `sections` (markdown) follow the
    comparison. Per-class and confusion figures are drawn for methods whose rows were stored with them.
    """
    layout, task = RunLayout.of(out), store.task
    baseline, headline = task.baseline, task.headline
    summary = summary_table(store, baseline=baseline, task=task)
    write_csv(layout.summary, summary)
    n_classes = None if class_names is None else len(class_names)
    table = markdown_table(summary, baseline=baseline, n_classes=n_classes, task=task)
    write_text(layout.table, table)
    figures = []
    if store.frame["fold"].nunique() > 1:
        figures.append(save_figure(plots.fold_accuracy(store.frame, headline), layout.figures / f"fold_{headline}.png"))
    with_arrays = [m for m in store.methods() if store.has_arrays(m, "confusion")]
    for method in with_arrays:
        matrix = summed_confusion(store, method)
        title_ = f"{method}: confusion summed over folds"
        figures.append(save_figure(plots.confusion_heatmap(matrix, class_names, title_), layout.figures / f"confusion_{method}.png"))
    if baseline in with_arrays:
        deltas = per_class_deltas(store, class_names, baseline=baseline, methods=with_arrays)
        for method in dict.fromkeys(deltas["method"]):
            figures.append(save_figure(plots.class_deltas(deltas, method, baseline), layout.figures / f"class_deltas_{method}.png"))
    every = store.all_regimes
    if not every.empty:
        figure = plots.accuracy_vs_parameters(every, headline)
        figures.append(save_figure(figure, layout.figures / f"{headline}_vs_parameters.png"))
    if task.figure_metrics and not store.frame.empty:
        figure = plots.metrics_vs_parameters(store.frame, task.figure_metrics)
        figures.append(save_figure(figure, layout.figures / f"{'_'.join(task.figure_metrics)}_vs_parameters.png"))
    protocol_sections = []
    if every["shots"].notna().any():
        few = few_shot_summary(every, headline)
        write_csv(layout.few_shot_summary, few)
        figures.append(save_figure(plots.few_shot_curves(every, headline), layout.figures / "few_shot_curves.png"))
        protocol_sections += few_shot_section(few, headline)
    if transfer is not None and not transfer.empty:
        for method in dict.fromkeys(transfer["method"]):
            heatmap = plots.transfer_heatmap(transfer_matrix(transfer, method), title=f"{method}: zero-shot accuracy on the target")
            figures.append(save_figure(heatmap, layout.figures / f"transfer_{method}.png"))
        protocol_sections += transfer_section(transfer)
    where = "the test folds" if store.frame["fold"].nunique() > 1 else "the test split"
    lines = [f"# {title}", "", *intro, "", f"## Comparison on {where}", "", table, *protocol_sections, *sections]
    lines += ["## Figures", ""]
    lines += [f"- ![{p.stem}]({p.relative_to(layout.root).as_posix()})" for p in figures] + [""]
    write_text(layout.report, "\n".join(lines))
    return table


def few_shot_summary(results: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Per (method, k) of the k-shot rows: runs (folds × seeds), seeds, mean and sample std of `metric`,
    trainable parameters (their mean: a probe's count does not depend on k, LoRA's chosen rank may)."""
    few = results.dropna(subset=["shots"]).astype({"shots": int})
    grouped = few.groupby(["method", "shots"], sort=False)
    summary = grouped.agg(
        runs=(metric, "size"), seeds=("seed", "nunique"), mean=(metric, "mean"), std=(metric, "std"),
        trainable_params=("trainable_params", "mean"),
    )
    return summary.reset_index().sort_values(["shots"], kind="stable").rename(
        columns={"mean": f"{metric}_mean", "std": f"{metric}_std"}
    )


def few_shot_section(summary: pd.DataFrame, metric: str = "accuracy") -> list[str]:
    """Markdown: one row per method, one column per k, mean ± std over folds × seeds."""
    ks = sorted(summary["shots"].unique())
    seeds = int(summary["seeds"].max())
    lines = [
        "## Few-shot: k training clips per class",
        "",
        f"Each method trained on k clips per class drawn from the training folds ({seeds} seed(s), class-balanced),"
        " chose what it chooses on k further clips per class of the training folds, and was tested on the official"
        f" test folds; {metric} mean ± std over folds × seeds. ResiDual's configuration is chosen per fold on"
        " each draw's own validation clips, from a smaller grid (learning rate and preset swept).",
        "",
        "| method | " + " | ".join(f"k = {k}" for k in ks) + " | trainable params |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for method, rows in summary.groupby("method", sort=False):
        by_k = rows.set_index("shots")
        cells = [
            f"{by_k.at[k, f'{metric}_mean']:.4f} ± {np.nan_to_num(by_k.at[k, f'{metric}_std']):.4f}" if k in by_k.index else "—"
            for k in ks
        ]
        params = rows["trainable_params"]
        count = "—" if params.isna().all() else f"{int(round(params.max())):,}"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {count} |")
    return [*lines, "", "Per (method, k) figures in `few_shot.csv`; every row in `results.csv` (`shots`, `seed`).", ""]


def transfer_section(transfer: pd.DataFrame) -> list[str]:
    """Markdown: zero-shot accuracy on each other dataset with each fold's adapted encoder, and without."""
    lines = [
        "## Zero-shot retention: adapted on the source, scored zero-shot on the target's classes",
        "",
        "The encoder adapted on each training fold of the source (ResiDual's λ attached, the contrastive"
        " adapter's map applied) classifies every clip of the target against the target's own class prompts;"
        " `zeroshot` is the plain model on the same clips, retention = accuracy − zeroshot.",
        "",
        "| source → target | method | accuracy (mean ± std over folds) | plain zero-shot | retention |",
        "|---|---|---|---|---|",
    ]
    for row in transfer.itertuples(index=False):
        lines.append(
            f"| {row.source} → {row.target} | {row.method} | {row.accuracy:.4f} ± {row.accuracy_std:.4f} "
            f"| {row.zeroshot:.4f} | {row.retention:+.4f} |"
        )
    return [*lines, "", "Rows in `transfer.csv`.", ""]
