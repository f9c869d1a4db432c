"""Is a saliency map faithful to the model? Deletion and insertion curves over time-frequency cells.

The log-mel is cut into cells (`cell` = frames × mel bins). Deletion replaces cells with the baseline in
the map's order, most salient first, and scores the clip after each step; insertion starts from the
baseline and puts the clip's cells back in the same order (Petsiuk et al. 2018, RISE; the L-MAC papers
use them for audio). The area under the score curve over the fraction of cells changed is low for a good
deletion order and high for a good insertion order. Every method is compared on the same clips with

* a random order (several draws, averaged per clip): a map must beat it to say anything, and
* the map of the same method on a model with randomised weights (Adebayo et al. 2018): a map that
  explains the trained model must order cells better for it than a map computed without its training.

Raw curves are in logits, whose range differs from clip to clip (s(x) − s(b) from under 1 to over 10), so
each curve is also normalised, (s − s(b)) / (s(x) − s(b)): 1 with the whole clip, 0 at the baseline. Its
area is comparable across clips, and both comparisons are paired over clips on it (one-sided Wilcoxon
signed-rank test). A clip whose s(x) − s(b) is under `min_change` has nothing the normalisation could
scale up without magnifying noise: it is flagged and left out of the normalised means and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from audio_residual.analysis.saliency import Scorer
from audio_residual.analysis.saliency_baselines import Baseline

DEFAULT_CELL = (10, 4)  # 0.1 s × 4 mel bins at CLAP's 10 ms hop
DEFAULT_STEPS = 20
ALPHA = 0.05
MIN_CHANGE = 1.0  # logits: below it, s(x) − s(b) is too small for a normalised curve to mean anything


@dataclass(frozen=True)
class FaithfulnessOptions:
    """How deletion and insertion run: the `baseline` replacing cells, `cell` (frames, mel bins), `steps`
    along each curve, `batch_size` inputs per pass, `random_draws` random orders per clip (seeded by `seed`
    and the clip's row), and `min_change`: clips with s(x) − s(b) below it are flagged, and left out of the
    normalised curves and of the tests."""

    baseline: Baseline = Baseline()
    cell: tuple[int, int] = DEFAULT_CELL
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    random_draws: int = 3
    seed: int = 0
    min_change: float = MIN_CHANGE


@dataclass
class Curves:
    """Per-clip deletion and insertion curves: `curves[name][mode]` (clips, steps + 1) raw scores, for name =
    a method, "random" or "randomised:{method}"; step 0 of deletion is s(x), its last step s(b)."""

    curves: dict[str, dict[str, np.ndarray]]

    @property
    def score(self) -> np.ndarray:
        return self.curves["random"]["deletion"][:, 0]

    @property
    def baseline_score(self) -> np.ndarray:
        return self.curves["random"]["deletion"][:, -1]

    def explainable(self, min_change: float = MIN_CHANGE) -> np.ndarray:
        """Clips whose s(x) − s(b) is at least `min_change`: the others have (almost) nothing to explain."""
        return self.score - self.baseline_score >= min_change

    def normalised(self, name: str, mode: str) -> np.ndarray:
        """(s − s(b)) / (s(x) − s(b)): 1 with the whole clip, 0 at the baseline (NaN where they are equal)."""
        change = self.score - self.baseline_score
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.curves[name][mode] - self.baseline_score[:, None]) / np.where(change != 0, change, np.nan)[:, None]

    def means(self, min_change: float = MIN_CHANGE) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """{name: {mode: (mean raw curve over all clips, mean normalised curve over the explainable ones)}}."""
        keep = self.explainable(min_change)
        steps = next(iter(self.curves["random"].values())).shape[1]
        return {name: {mode: (curve.mean(0), self.normalised(name, mode)[keep].mean(0) if keep.any()
                              else np.full(steps, np.nan))
                       for mode, curve in per_mode.items()}
                for name, per_mode in self.curves.items()}  # fmt: skip


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
    options: FaithfulnessOptions | None = None,
) -> dict[str, np.ndarray]:
    """Deletion and insertion curves of one clip `x` (channels, frames, mels) for each cell order.

    Returns {"deletion": (orders, steps + 1), "insertion": (orders, steps + 1)} scores; step k has
    k/steps of the cells replaced by the baseline's (deletion) or restored into it (insertion).
    """
    options = options or FaithfulnessOptions()
    cell, steps = options.cell, options.steps
    x = x.float()
    base = options.baseline(x[None])[0]
    frames, mels = x.shape[-2:]
    grid = (-(-frames // cell[0]), -(-mels // cell[1]))
    jobs = [(o, mode, k) for o in range(len(orders)) for mode in ("deletion", "insertion") for k in range(steps + 1)]
    masks = [_masks(order, grid, (frames, mels), cell, steps).to(x.device) for order in orders]
    curves = {mode: np.zeros((len(orders), steps + 1)) for mode in ("deletion", "insertion")}
    target_row = torch.tensor([int(target)], device=x.device)
    for start in range(0, len(jobs), options.batch_size):
        chunk = jobs[start : start + options.batch_size]
        inputs = torch.stack([
            torch.where(masks[o][k], base, x) if mode == "deletion" else torch.where(masks[o][k], x, base)
            for o, mode, k in chunk
        ])
        longer = None if is_longer is None else is_longer.reshape(1, -1).expand(len(chunk), -1)
        scores = scorer(inputs, target_row.expand(len(chunk)), longer).float().cpu().numpy()
        for (o, mode, k), score in zip(chunk, scores, strict=True):
            curves[mode][o, k] = score
    return curves


def clip_curves(
    scorer: Scorer,
    x: torch.Tensor,
    target: int,
    maps: dict[str, np.ndarray],
    is_longer: torch.Tensor | None = None,
    options: FaithfulnessOptions | None = None,
    row: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """{name: {mode: (steps + 1,) curve}} of one clip for each (frames, mels) map of `maps` and "random" (the
    mean of `random_draws` random orders, drawn from (seed, `row`): a clip's curves do not depend on the others)."""
    options = options or FaithfulnessOptions()
    rng = np.random.default_rng([options.seed, int(row)])
    names = list(maps)
    orders = [cell_order(maps[name], options.cell, rng) for name in names]
    size = cell_scores(next(iter(maps.values())) if maps else np.zeros(x.shape[-2:]), options.cell).size
    orders += [rng.permutation(size) for _ in range(options.random_draws)]
    result = perturbation_curves(scorer, x, target, orders, is_longer, options)
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in [*names, "random"]}
    for mode, values in result.items():
        for name, curve in zip(names, values[: len(names)], strict=True):
            out[name][mode] = curve
        out["random"][mode] = values[len(names) :].mean(0)  # AUC is linear: the mean of the draws' AUCs
    return out


def stack_curves(per_clip: Sequence[dict[str, dict[str, np.ndarray]]]) -> Curves:
    """`Curves` of clips from their `clip_curves`."""
    names = per_clip[0].keys()
    return Curves({name: {mode: np.stack([clip[name][mode] for clip in per_clip]) for mode in per_clip[0][name]}
                   for name in names})


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under score curves sampled at equal fractions of cells in [0, 1] (trapezoid), along the last axis."""
    curve = np.asarray(curve)
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


def _comparison(curves: Curves, own: str, other: str, suffix: str, keep: np.ndarray, alpha: float) -> dict:
    """Mean raw and normalised AUCs of `other` and the paired one-sided tests of `own` against it."""
    row = {}
    for mode in ("deletion", "insertion"):
        row[f"{mode}_auc_{suffix}"] = float(np.mean(auc(curves.curves[other][mode])))
        row[f"{mode}_nauc_{suffix}"] = float(np.mean(auc(curves.normalised(other, mode)[keep]))) if keep.any() else np.nan
    own_deletion, other_deletion = (auc(curves.normalised(n, "deletion")[keep]) for n in (own, other))
    own_insertion, other_insertion = (auc(curves.normalised(n, "insertion")[keep]) for n in (own, other))
    row[f"p_deletion_vs_{suffix}"] = one_sided_p(other_deletion, own_deletion)
    row[f"p_insertion_vs_{suffix}"] = one_sided_p(own_insertion, other_insertion)
    row["beats_random" if suffix == "random" else "differs_from_randomised"] = bool(
        row[f"p_deletion_vs_{suffix}"] < alpha and row[f"p_insertion_vs_{suffix}"] < alpha
    )
    return row


def faithfulness_table(
    curves: Curves,
    methods: Sequence[str],
    similarity: dict[str, np.ndarray] | None = None,
    min_change: float = MIN_CHANGE,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """One row per method from per-clip curves.

    `*_auc*`: mean area under the raw score curves (logits) over all clips; `*_nauc*`: under the normalised
    curves (s − s(b)) / (s(x) − s(b)), over the `clips_normalised` clips whose s(x) − s(b) ≥ `min_change`.
    The paired one-sided Wilcoxon tests use the normalised AUCs of those clips. `beats_random`: both curves
    better than a random order (p < alpha); `differs_from_randomised`: both better than the same method's
    map on a randomised model. `similarity[method]`: per-clip rank correlation of the trained and randomised
    maps. `mean_score` and `mean_baseline_score`: s(x) and s(b) averaged over all clips.
    """
    keep = curves.explainable(min_change)
    rows = []
    for method in methods:
        row = {"method": method, "clips": len(curves.score), "clips_normalised": int(keep.sum()),
               "mean_score": float(np.mean(curves.score)), "mean_baseline_score": float(np.mean(curves.baseline_score))}
        for mode in ("deletion", "insertion"):
            row[f"{mode}_auc"] = float(np.mean(auc(curves.curves[method][mode])))
            row[f"{mode}_nauc"] = float(np.mean(auc(curves.normalised(method, mode)[keep]))) if keep.any() else np.nan
        row.update(_comparison(curves, method, "random", "random", keep, alpha))
        if f"randomised:{method}" in curves.curves:
            row.update(_comparison(curves, method, f"randomised:{method}", "randomised", keep, alpha))
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
    options: FaithfulnessOptions | None = None,
    device="cpu",
) -> Curves:
    """Per-clip deletion/insertion curves of every map in `maps` (keys: methods and "randomised:{method}")
    and of random orders, for `faithfulness_table` and the plots."""
    from tqdm.auto import tqdm

    names = [name for name in maps if name in methods or name.removeprefix("randomised:") in methods]
    per_clip = []
    for i, row in enumerate(tqdm(np.asarray(rows), desc="faithfulness", leave=False)):
        x = torch.from_numpy(np.array(input_features[row], dtype=np.float32)).to(device)
        longer = None if is_longer is None else torch.as_tensor(np.asarray(is_longer)[row]).reshape(1).to(device)
        per_clip.append(clip_curves(scorer, x, int(targets[i]), {n: maps[n][i] for n in names}, longer, options, row))
    return stack_curves(per_clip)
