"""Is a saliency map faithful to the model? Deletion and insertion curves over time-frequency cells.

The log-mel is cut into cells (`cell` = frames × mel bins). Deletion replaces cells with the baseline in
the map's order, most salient first, and scores the clip after each step; insertion starts from the
baseline and puts the clip's cells back in the same order (Petsiuk et al. 2018, RISE; the L-MAC papers
use them for audio). The area under the score curve over the fraction of cells changed is low for a good
deletion order and high for a good insertion order. Every method is compared on the same clips with

* a random order (several draws, averaged per clip): a map must beat it to say anything, and
* the map of the same method on a model with randomised weights (Adebayo et al. 2018): a map that
  explains the trained model must order cells better for it than a map computed without its training.

Both comparisons are paired over clips (one-sided Wilcoxon signed-rank test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from audio_residual.analysis.saliency import Scorer, baseline

DEFAULT_CELL = (10, 4)  # 0.1 s × 4 mel bins at CLAP's 10 ms hop
DEFAULT_STEPS = 20
ALPHA = 0.05


def cell_scores(saliency: np.ndarray, cell: tuple[int, int] = DEFAULT_CELL) -> np.ndarray:
    """Sum of a (frames, mels) map over each cell: (frames/ct, mels/cf), edge cells partial."""
    ct, cf = cell
    frames, mels = saliency.shape
    padded = np.zeros((-(-frames // ct) * ct, -(-mels // cf) * cf), dtype=np.float64)
    padded[:frames, :mels] = saliency
    return padded.reshape(padded.shape[0] // ct, ct, padded.shape[1] // cf, cf).sum(axis=(1, 3))


def cell_order(saliency: np.ndarray, cell: tuple[int, int] = DEFAULT_CELL, rng=None) -> np.ndarray:
    """Flat cell indices, most salient first; ties (flat regions) broken at random."""
    scores = cell_scores(saliency, cell).ravel()
    rng = rng or np.random.default_rng(0)
    jitter = rng.permutation(scores.size)  # lexsort: primary key last
    return np.lexsort((jitter, -scores))


def _masks(order: np.ndarray, grid: tuple[int, int], shape: tuple[int, int], cell, steps: int) -> torch.Tensor:
    """(steps + 1, frames, mels) bool: step k marks the first round(k/steps · cells) cells of `order`."""
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    counts = np.round(np.linspace(0, order.size, steps + 1)).astype(np.int64)
    cells = rank.reshape(grid)[None] < counts[:, None, None]
    full = np.repeat(np.repeat(cells, cell[0], axis=1), cell[1], axis=2)[:, : shape[0], : shape[1]]
    return torch.from_numpy(np.ascontiguousarray(full))


@torch.no_grad()
def perturbation_curves(
    scorer: Scorer,
    x: torch.Tensor,
    target: int,
    orders: Sequence[np.ndarray],
    is_longer: torch.Tensor | None = None,
    baseline_kind: str = "floor",
    cell: tuple[int, int] = DEFAULT_CELL,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves of one clip `x` (channels, frames, mels) for each cell order.

    Returns {"deletion": (orders, steps + 1), "insertion": (orders, steps + 1)} scores; step k has
    k/steps of the cells removed (deletion) or restored (insertion).
    """
    x = x.float()
    base = baseline(x[None], baseline_kind)[0]
    frames, mels = x.shape[-2:]
    grid = (-(-frames // cell[0]), -(-mels // cell[1]))
    jobs = [(o, mode, k) for o in range(len(orders)) for mode in ("deletion", "insertion") for k in range(steps + 1)]
    masks = [_masks(order, grid, (frames, mels), cell, steps).to(x.device) for order in orders]
    curves = {mode: np.zeros((len(orders), steps + 1)) for mode in ("deletion", "insertion")}
    target_row = torch.tensor([int(target)], device=x.device)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        inputs = torch.stack([
            torch.where(masks[o][k], base, x) if mode == "deletion" else torch.where(masks[o][k], x, base)
            for o, mode, k in chunk
        ])
        longer = None if is_longer is None else is_longer.reshape(1, -1).expand(len(chunk), -1)
        scores = scorer(inputs, target_row.expand(len(chunk)), longer).float().cpu().numpy()
        for (o, mode, k), score in zip(chunk, scores, strict=True):
            curves[mode][o, k] = score
    return curves


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under score curves sampled at equal fractions of cells in [0, 1] (trapezoid), along the last axis."""
    steps = curve.shape[-1] - 1
    return (curve[..., 1:] + curve[..., :-1]).sum(-1) / (2 * steps)


def one_sided_p(better: np.ndarray, worse: np.ndarray) -> float:
    """Wilcoxon signed-rank p-value that `better` − `worse` > 0 across clips (1.0 when all equal)."""
    diff = np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)
    if not np.any(diff != 0):
        return 1.0
    return float(stats.wilcoxon(diff, alternative="greater").pvalue)


def map_rank_correlation(a: np.ndarray, b: np.ndarray, cell: tuple[int, int] = DEFAULT_CELL) -> np.ndarray:
    """Spearman correlation per clip between two stacks of maps (clips, frames, mels), compared per cell."""
    return np.array([
        stats.spearmanr(cell_scores(m1, cell).ravel(), cell_scores(m2, cell).ravel()).statistic
        for m1, m2 in zip(a, b, strict=True)
    ])


def top_share_inside(saliency: np.ndarray, region: np.ndarray, quantile: float = 0.9) -> float:
    """Share of the top (1 − quantile) cells of a (frames, mels) map that lie in the bool `region`."""
    threshold = np.quantile(saliency, quantile)
    top = saliency >= threshold
    return float((top & region).sum() / max(int(top.sum()), 1))


def faithfulness_table(
    aucs: dict[str, dict[str, np.ndarray]],
    methods: Sequence[str],
    similarity: dict[str, np.ndarray] | None = None,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """One row per method from per-clip AUCs.

    `aucs[name]["deletion" | "insertion"]`: (clips,) AUCs for name = a method, "random", or
    "randomised:{method}" (the randomised model's map, scored on the trained model). `similarity[method]`:
    per-clip rank correlation of the trained and randomised maps. `beats_random`: both curves better than
    random (p < alpha); `differs_from_randomised`: both better than the randomised model's map.
    """
    rows = []
    random = aucs["random"]
    for method in methods:
        own, other = aucs[method], aucs.get(f"randomised:{method}")
        row = {
            "method": method,
            "clips": len(own["deletion"]),
            "deletion_auc": float(np.mean(own["deletion"])),
            "deletion_auc_random": float(np.mean(random["deletion"])),
            "insertion_auc": float(np.mean(own["insertion"])),
            "insertion_auc_random": float(np.mean(random["insertion"])),
            "p_deletion_vs_random": one_sided_p(random["deletion"], own["deletion"]),
            "p_insertion_vs_random": one_sided_p(own["insertion"], random["insertion"]),
        }
        row["beats_random"] = bool(row["p_deletion_vs_random"] < alpha and row["p_insertion_vs_random"] < alpha)
        if other is not None:
            row.update({
                "deletion_auc_randomised": float(np.mean(other["deletion"])),
                "insertion_auc_randomised": float(np.mean(other["insertion"])),
                "p_deletion_vs_randomised": one_sided_p(other["deletion"], own["deletion"]),
                "p_insertion_vs_randomised": one_sided_p(own["insertion"], other["insertion"]),
            })
            row["differs_from_randomised"] = bool(
                row["p_deletion_vs_randomised"] < alpha and row["p_insertion_vs_randomised"] < alpha
            )
        if similarity is not None and method in similarity:
            row["rank_corr_randomised"] = float(np.nanmean(similarity[method]))
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def evaluate_faithfulness(
    scorer: Scorer,
    input_features: np.ndarray,
    rows: np.ndarray,
    targets: np.ndarray,
    maps: dict[str, np.ndarray],
    methods: Sequence[str],
    is_longer: np.ndarray | None = None,
    random_draws: int = 3,
    seed: int = 0,
    device="cpu",
    **options,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Per-clip deletion/insertion AUCs of every map in `maps` (keys: methods and "randomised:{method}")
    and of `random_draws` random orders; returns (aucs, mean curves) for `faithfulness_table` and plots."""
    from tqdm.auto import tqdm

    cell = options.get("cell", DEFAULT_CELL)
    names = [name for name in maps if name in methods or name.removeprefix("randomised:") in methods]
    aucs = {name: {"deletion": [], "insertion": []} for name in [*names, "random"]}
    curves = {name: {"deletion": [], "insertion": []} for name in aucs}
    rng = np.random.default_rng(seed)
    for i, row in enumerate(tqdm(np.asarray(rows), desc="faithfulness", leave=False)):
        x = torch.from_numpy(np.array(input_features[row], dtype=np.float32)).to(device)
        longer = None if is_longer is None else torch.as_tensor(np.asarray(is_longer)[row]).reshape(1).to(device)
        orders = [cell_order(maps[name][i], cell, rng) for name in names]
        size = cell_scores(maps[names[0]][i], cell).size
        orders += [rng.permutation(size) for _ in range(random_draws)]
        result = perturbation_curves(scorer, x, int(targets[i]), orders, longer, **options)
        for mode, values in result.items():
            per_name = [*values[: len(names)], values[len(names):].mean(0)]  # AUC is linear: mean of draws
            for name, curve in zip([*names, "random"], per_name, strict=True):
                curves[name][mode].append(curve)
                aucs[name][mode].append(float(auc(curve)))
    aucs = {n: {m: np.asarray(v) for m, v in d.items()} for n, d in aucs.items()}
    mean_curves = {n: {m: np.mean(v, axis=0) for m, v in d.items()} for n, d in curves.items()}
    return aucs, mean_curves
