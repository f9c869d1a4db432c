"""The one report writer: summary.csv, table.md, figures and report.md of an output folder.

Every command that produces results ends here; the whole study (`audio_residual.study`) adds its own
sections (nested choices, sweep, heads, time) and the data description, a single `train-residual` run
only the comparison. Everything is built from this session's rows of the store, so a report never shows
a row that other options produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from audio_residual.evaluation import plots
from audio_residual.evaluation.compare import (
    BASELINE_METHOD,
    ResultsStore,
    markdown_table,
    per_class_deltas,
    summary_table,
    summed_confusion,
)
from audio_residual.io import save_figure, write_csv, write_text
from audio_residual.layout import RunLayout


def write_report(
    store: ResultsStore,
    out: str | Path | RunLayout,
    class_names: Sequence[str] | None = None,
    baseline: str = BASELINE_METHOD,
    title: str = "Audio-ResiDual results",
    intro: Sequence[str] = (),
    sections: Sequence[str] = (),
) -> str:
    """Write summary.csv, table.md, the comparison figures and report.md; return the markdown table.

    `intro` lines go under the title (what data and model); `sections` (markdown) follow the comparison.
    Per-class and confusion figures are drawn for methods whose rows were stored with arrays.
    """
    layout = RunLayout.of(out)
    summary = summary_table(store, baseline=baseline)
    write_csv(layout.summary, summary)
    table = markdown_table(summary, baseline=baseline, n_classes=None if class_names is None else len(class_names))
    write_text(layout.table, table)
    figures = [save_figure(plots.fold_accuracy(store.frame), layout.figures / "fold_accuracy.png")]
    with_arrays = [m for m in store.methods() if store.has_arrays(m)]
    for method in with_arrays:
        matrix = summed_confusion(store, method)
        title_ = f"{method}: confusion summed over folds"
        figures.append(save_figure(plots.confusion_heatmap(matrix, class_names, title_), layout.figures / f"confusion_{method}.png"))
    if baseline in with_arrays:
        deltas = per_class_deltas(store, class_names, baseline=baseline, methods=with_arrays)
        for method in dict.fromkeys(deltas["method"]):
            figures.append(save_figure(plots.class_deltas(deltas, method, baseline), layout.figures / f"class_deltas_{method}.png"))
    lines = [f"# {title}", "", *intro, "", "## Comparison on the test folds", "", table, *sections, "## Figures", ""]
    lines += [f"- ![{p.stem}]({p.relative_to(layout.root).as_posix()})" for p in figures] + [""]
    write_text(layout.report, "\n".join(lines))
    return table
