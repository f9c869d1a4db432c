"""Per-fold metrics, a resumable results store, and the paired comparison of every method with zero-shot.

The store is the one place results go, whichever code produced them:

    store = ResultsStore(out_dir / "results.csv")
    key = ws.key({"method": "residual", "config": ...})   # everything that produces the row
    if not store.reuse("residual", fold, key):
        store.add_evaluation("residual", fold, key, test_logits, test_labels, trainable_params=96, seconds=t)

`results.csv` is rewritten atomically after every row, so a crash loses at most the row being computed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from audio_residual.io import update_csv, write_npz
from audio_residual.tasks import CLASSIFICATION, Task


def result_columns(task: Task) -> tuple[str, ...]:
    """The store's columns for a task: the row's identity, the task's metrics, cost, protocol, and how the
    method chose (its kept epoch, validation score and chosen options, where it chooses)."""
    return ("method", "fold", "key", *task.metrics, "trainable_params", "seconds", "shots", "seed", "best_epoch",
            "val_score", "chosen")


RESULT_COLUMNS = result_columns(CLASSIFICATION)
RESULT_KEY = ("method", "fold", "key")  # what identifies a stored row
BASELINE_METHOD = "zeroshot"


def _array_name(method: str, key: str, fold: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', method)}__{key}__fold{int(fold)}.npz"


class ResultsStore:
    """A tidy results table on disk (`results.csv`, arrays as npz), keyed by what produced each row.

    A row is identified by (method, fold, key), where `key` digests everything that produced it: the data
    as the model saw it, the model, the preprocessing, the templates and the method's own options (see
    `Workspace.key`). `reuse` finds a stored row only under the same key, so a rerun with other options
    computes new rows instead of returning old ones. Rows found by `reuse` or written by `add` form this
    session's selection, one key per (method, shots, seed): `shots` and `seed` are empty for full data
    and name the k-shot draw otherwise (`audio_residual.experiments.protocol`). `frame` — what the comparison table,
    its figures and tests read — holds the selected full-data rows; `all_regimes` adds the selected
    k-shot rows (few-shot table and figures); `all_rows` is everything on disk. Arrays of a row go to
    `<csv dir>/arrays/<method>__<key>__fold<k>.npz`, written before the CSV row.
    """

    def __init__(self, path_csv: str | Path, task: Task = CLASSIFICATION):
        self.path = Path(path_csv)
        self.task = task
        self.columns = result_columns(task)
        self.arrays_dir = self.path.parent / "arrays"
        self._reload()
        # (method, shots, seed) → key of this session's rows; shots and seed are None for full data
        self.selected: dict[tuple[str, int | None, int | None], str] = {}

    def _reload(self) -> None:
        """Read the table again: rows other processes added to the same file since are reused, not recomputed."""
        if self.path.is_file():
            self.all_rows = pd.read_csv(self.path, dtype={"key": str})
        else:
            self.all_rows = pd.DataFrame(columns=list(self.columns))
        for column in ("shots", "seed"):  # tables written before k-shot rows existed
            if column not in self.all_rows:
                self.all_rows[column] = np.nan

    def _selected_rows(self, full_data_only: bool) -> pd.DataFrame:
        rows = self.all_rows
        mask = np.zeros(len(rows), dtype=bool)
        for (method, shots, _), key in self.selected.items():
            if shots is None or not full_data_only:
                mask |= ((rows["method"] == method) & (rows["key"] == key)).to_numpy()
        return rows[mask].reset_index(drop=True)

    @property
    def frame(self) -> pd.DataFrame:
        """This session's full-data rows: for each selected method, the rows stored under its selected key."""
        return self._selected_rows(full_data_only=True)

    @property
    def all_regimes(self) -> pd.DataFrame:
        """This session's rows of every protocol: full data (`shots` NaN) and each k-shot draw."""
        return self._selected_rows(full_data_only=False)

    def __len__(self) -> int:
        return len(self.frame)

    def _match(self, method: str, fold: int, key: str) -> pd.Series:
        rows = self.all_rows
        return (rows["method"] == method) & (rows["fold"] == int(fold)) & (rows["key"] == key)

    def select(self, method: str, key: str, shots: int | None = None, seed: int | None = None) -> None:
        """Make `method`'s rows under `key` part of this session's results (one key per method and protocol)."""
        self.selected[(method, _optional_int(shots), _optional_int(seed))] = key

    def reuse(self, method: str, fold: int, key: str, shots: int | None = None, seed: int | None = None) -> bool:
        """Whether (method, fold) is stored under `key`; the method joins this session's results either way."""
        self.select(method, key, shots, seed)
        self._reload()
        return bool(self._match(method, fold, key).any())

    def methods(self) -> list[str]:
        """Method names of this session's rows, in the order they were first stored."""
        return list(dict.fromkeys(self.frame["method"]))

    def add(self, row: Mapping, arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Insert or replace the (method, fold, key) row, save its arrays, and rewrite the CSV atomically.

        `row` needs `method`, `fold`, `key` and the task's headline metric; missing columns are left empty (NaN).
        """
        missing = {"method", "fold", "key", self.task.headline} - set(row)
        if missing:
            raise ValueError(f"a results row needs {sorted(missing)}")
        record = {column: row.get(column, np.nan) for column in self.columns} | dict(row)
        record["method"], record["fold"], record["key"] = str(record["method"]), int(record["fold"]), str(record["key"])
        for column in ("shots", "seed"):  # empty (NaN) for full data, whichever way the caller said so
            value = _optional_int(record[column])
            record[column] = np.nan if value is None else value
        if arrays:
            write_npz(self.arrays_dir / _array_name(record["method"], record["key"], record["fold"]),
                      {k: np.asarray(v) for k, v in arrays.items()})
        # re-read and merged under a lock: rows other processes wrote into this file meanwhile are kept
        self.all_rows = update_csv(self.path, pd.DataFrame([record]), RESULT_KEY, dtype={"key": str})
        self.select(record["method"], record["key"], record["shots"], record["seed"])

    def add_evaluation(
        self, method: str, fold: int, key: str, scores, targets, trainable_params: int, seconds: float, **extra
    ) -> dict:
        """The task's metrics of test scores (`Task.evaluate`), `add`ed with the arrays it returns."""
        metrics, arrays = self.task.evaluate(scores, targets)
        row = {"method": method, "fold": int(fold), "key": key, **metrics}
        row |= {"trainable_params": int(trainable_params), "seconds": float(seconds), **extra}
        self.add(row, arrays)
        return row

    def has_arrays(self, method: str, name: str | None = None) -> bool:
        """Whether every fold of this session's method rows was added with its arrays (holding `name`, if given)."""
        folds = self.frame.loc[self.frame["method"] == method, "fold"]
        if not (len(folds) > 0 and all(self._array_path(method, f).is_file() for f in folds)):
            return False
        return name is None or all(name in self.arrays(method, f) for f in folds)

    def _array_path(self, method: str, fold: int) -> Path:
        """The arrays of the full-data row (k-shot rows keep theirs too, but no figure reads them)."""
        return self.arrays_dir / _array_name(method, self.selected.get((method, None, None), ""), fold)

    def arrays(self, method: str, fold: int) -> dict[str, np.ndarray]:
        """The arrays saved with this session's (method, fold) row; empty if none were saved."""
        path = self._array_path(method, fold)
        if not path.is_file():
            return {}
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}


def _optional_int(value) -> int | None:
    """None for an empty cell (NaN, None), else the integer: the protocol part of a selection key."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)


def _frame(results: ResultsStore | pd.DataFrame) -> pd.DataFrame:
    return results.frame if isinstance(results, ResultsStore) else results


def paired_tests(values: np.ndarray, baseline: np.ndarray) -> dict:
    """Paired t-test and Wilcoxon signed-rank of per-fold `values` against `baseline` (two-sided).

    Degenerate cases give NaN with a note instead of an exception or a misleading p: fewer than two
    pairs, all differences zero (the methods agree on every fold), or constant differences (the t
    statistic is infinite). With 5 folds the smallest possible Wilcoxon p is 0.0625.
    """
    values, baseline = np.asarray(values, dtype=float), np.asarray(baseline, dtype=float)
    diff = values - baseline
    out = {"n_pairs": len(diff), "mean_delta": float(diff.mean()) if len(diff) else float("nan")}
    out |= {"ttest_p": float("nan"), "wilcoxon_p": float("nan"), "note": ""}
    tolerance = 1e-12 * max(1.0, float(np.abs(values).max(initial=0.0)))
    if len(diff) < 2:
        out["note"] = "fewer than 2 paired folds"
    elif np.all(np.abs(diff) <= tolerance):
        out["note"] = "identical on every fold"
    else:
        if np.ptp(diff) <= tolerance:
            out["note"] = "constant difference: t-test undefined"
        else:
            out["ttest_p"] = float(stats.ttest_rel(values, baseline).pvalue)
        out["wilcoxon_p"] = float(stats.wilcoxon(values, baseline).pvalue)
    return out


def summary_table(
    results: ResultsStore | pd.DataFrame, baseline: str = BASELINE_METHOD, task: Task = CLASSIFICATION
) -> pd.DataFrame:
    """Per method: mean and std (ddof=1) of each metric over folds, params, total seconds, tests vs baseline.

    Tests pair folds that both the method and the baseline have; the task's headline metric is tested.
    """
    frame = _frame(results)
    headline = task.headline
    base = frame[frame["method"] == baseline].set_index("fold")[headline]
    records = []
    for method in dict.fromkeys(frame["method"]):
        rows = frame[frame["method"] == method].sort_values("fold")
        record = {"method": method, "n_folds": len(rows)}
        for metric in task.metrics:
            values = rows[metric].to_numpy(dtype=float)
            record[f"{metric}_mean"] = float(np.mean(values))
            record[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        params = rows["trainable_params"].max()
        record["trainable_params"] = float("nan") if pd.isna(params) else int(params)
        record["seconds_total"] = float(rows["seconds"].sum())
        if method == baseline:
            record |= {"n_pairs": len(rows), "mean_delta": 0.0, "ttest_p": np.nan, "wilcoxon_p": np.nan}
            record["note"] = "baseline"
        elif base.empty:
            record |= {"n_pairs": 0, "mean_delta": np.nan, "ttest_p": np.nan, "wilcoxon_p": np.nan}
            record["note"] = f"no {baseline} rows"
        else:
            paired = rows[rows["fold"].isin(base.index)]
            record |= paired_tests(paired[headline].to_numpy(), base.loc[paired["fold"]].to_numpy())
        records.append(record)
    return pd.DataFrame.from_records(records)


def _format_p(p: float) -> str:
    return "—" if p is None or math.isnan(p) else f"{p:.3g}"


def _format_params(count: float) -> str:
    return "—" if pd.isna(count) else f"{int(count):,}"


def markdown_table(
    summary: pd.DataFrame, baseline: str = BASELINE_METHOD, n_classes: int | None = None, task: Task = CLASSIFICATION
) -> str:
    """method | headline mean ± std | the task's report columns | params | p vs baseline.

    A cell the task calls uninformative on this data (top-5 of ≤ 5 classes) shows "—".
    """
    headers = [f"{task.headline} (mean ± std)", *(header for header, _ in task.report_columns)]
    lines = [
        f"| method | {' | '.join(headers)} | trainable params | p vs {baseline} (t-test / Wilcoxon) |",
        "|---|" + "---|" * (len(headers) + 2),
    ]
    for row in summary.to_dict("records"):
        p = "—" if row["method"] == baseline else f"{_format_p(row['ttest_p'])} / {_format_p(row['wilcoxon_p'])}"
        if isinstance(row["note"], str) and row["note"] and row["method"] != baseline:
            p += f" ({row['note']})"
        std = row[task.headline + "_std"]
        cells = [f"{row[task.headline + '_mean']:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")]
        cells += [f"{row[m + '_mean']:.4f}" if task.informative(m, n_classes) else "—" for _, m in task.report_columns]
        lines.append(f"| {row['method']} | {' | '.join(cells)} | {_format_params(row['trainable_params'])} | {p} |")
    return "\n".join(lines) + "\n"


def per_class_accuracy(results: ResultsStore, method: str) -> np.ndarray:
    """Per-class accuracy averaged over the method's folds (folds without a class are skipped for it)."""
    folds = results.frame.loc[results.frame["method"] == method, "fold"]
    stacked = [results.arrays(method, fold)["per_class_accuracy"] for fold in folds]
    return np.nanmean(np.stack(stacked), axis=0)


def per_class_deltas(
    results: ResultsStore, class_names=None, baseline: str = BASELINE_METHOD, methods=None
) -> pd.DataFrame:
    """Long table (method, class, class_name, accuracy, baseline_accuracy, delta) for each non-baseline method.

    `methods` defaults to every method in the store; each needs its per-class arrays.
    """
    reference = per_class_accuracy(results, baseline)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(reference))]
    parts = []
    for method in results.methods() if methods is None else methods:
        if method == baseline:
            continue
        accuracy = per_class_accuracy(results, method)
        parts.append(
            pd.DataFrame(
                {
                    "method": method,
                    "class": np.arange(len(reference)),
                    "class_name": names,
                    "accuracy": accuracy,
                    "baseline_accuracy": reference,
                    "delta": accuracy - reference,
                }
            )
        )
    columns = ["method", "class", "class_name", "accuracy", "baseline_accuracy", "delta"]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def summed_confusion(results: ResultsStore, method: str) -> np.ndarray:
    """The method's confusion matrices summed over its folds (every clip counted once)."""
    folds = results.frame.loc[results.frame["method"] == method, "fold"]
    return np.sum([results.arrays(method, fold)["confusion"] for fold in folds], axis=0)
