"""Protocol figures: the data drawn (points, spreads, labels), not pixels."""

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer

from audio_residual.evaluation import plots
from audio_residual.io import save_figure


@pytest.fixture
def results() -> pd.DataFrame:
    """Full-data rows (no shots) and k-shot rows over folds × seeds; accuracies differ per row."""
    rng = np.random.default_rng(0)
    rows = [{"method": "zeroshot", "fold": f, "accuracy": 0.5 + 0.01 * f, "trainable_params": 0} for f in (1, 2, 3)]
    for method, params in (("linear_probe", 30), ("residual", 400)):
        rows += [{"method": method, "fold": f, "accuracy": rng.uniform(0.6, 1), "trainable_params": params}
                 for f in (1, 2, 3)]  # fmt: skip
        rows += [{"method": method, "fold": f, "seed": s, "shots": k, "accuracy": rng.uniform(0.3, 0.9),
                  "trainable_params": params} for k in (4, 1) for s in (0, 1) for f in (1, 2)]  # fmt: skip
    return pd.DataFrame(rows)


def stats(results, method, shots=None):
    rows = results[(results["method"] == method) & (results["shots"].isna() if shots is None else results["shots"] == shots)]
    return rows["accuracy"].mean(), rows["accuracy"].std(ddof=1)


def errorbar(ax, label) -> ErrorbarContainer:
    (container,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.get_label() == label]
    return container


def test_accuracy_vs_parameters_points_spreads_and_panels(results, tmp_path):
    fig = plots.accuracy_vs_parameters(results)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["full data", "1-shot", "4-shot"]
    assert all(ax.get_xscale() == "log" for ax in axes)
    for ax, shots in zip(axes, (None, 1, 4), strict=True):
        mean, std = stats(results, "residual", shots)
        container = errorbar(ax, "residual")
        np.testing.assert_allclose(container.lines[0].get_xydata(), [[400, mean]])
        np.testing.assert_allclose(container.lines[2][0].get_segments()[0], [[400, mean - std], [400, mean + std]])
        assert errorbar(ax, "linear_probe").lines[0].get_xydata()[0, 0] == 30
    for ax in axes:  # trains nothing: a line, not a log-x point; no k-shot rows, so its full-data level
        (zero_line,) = [line for line in ax.get_lines() if line.get_label() == "zeroshot (0 params)"]
        assert zero_line.get_ydata()[0] == pytest.approx(0.52)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["zeroshot (0 params)", "linear_probe", "residual"]
    save_figure(fig, tmp_path / "params.png")


def test_accuracy_vs_parameters_without_shots_column(results):
    full = results[results["shots"].isna()].drop(columns=["shots", "seed"])
    assert [ax.get_title() for ax in plots.accuracy_vs_parameters(full).axes] == ["full data"]


def test_few_shot_curves_lines_per_method_and_full_data_levels(results, tmp_path):
    fig = plots.few_shot_curves(results)
    ax = fig.axes[0]
    for method in ("linear_probe", "residual"):
        (m1, s1), (m4, s4) = stats(results, method, 1), stats(results, method, 4)
        container = errorbar(ax, method)
        np.testing.assert_allclose(container.lines[0].get_xydata(), [[1, m1], [4, m4]])
        np.testing.assert_allclose([seg[:, 1] for seg in container.lines[2][0].get_segments()],
                                   [[m1 - s1, m1 + s1], [m4 - s4, m4 + s4]])  # fmt: skip
        (level,) = [line for line in ax.get_lines() if line.get_label() == f"{method} (full data)"]
        assert level.get_ydata()[0] == pytest.approx(stats(results, method)[0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4"] and ax.get_xscale() == "log"
    save_figure(fig, tmp_path / "few.png")


def test_transfer_heatmap_cells_and_labels(tmp_path):
    matrix = pd.DataFrame([[0.4, 0.7], [np.nan, 0.65], [0.3, np.nan]], index=["plain zero-shot", "esc50", "us8k"],
                          columns=["esc50", "us8k"])  # fmt: skip
    fig = plots.transfer_heatmap(matrix)
    ax = fig.axes[0]
    shown = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(shown.mask, np.isnan(matrix.to_numpy()))
    np.testing.assert_allclose(shown.filled(np.nan), matrix.to_numpy())
    assert sorted(t.get_text() for t in ax.texts) == ["0.30", "0.40", "0.65", "0.70"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["plain zero-shot", "esc50", "us8k"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["esc50", "us8k"]
    save_figure(fig, tmp_path / "transfer.png")
