"""How many directions each residual unit really uses: explained-variance spectra and intrinsic dimension.

From a unit's PCA eigenvalues λ₁ ≥ λ₂ ≥ … (over the total variance, so dropped null directions count):
  * EVR spectrum λ_i / Σλ and its cumulative sum;
  * intrinsic dimension id_p = the fewest components whose cumulative EVR reaches p (p = 90/95/99 %),
    the rank ResiDual's fine variant keeps when it prunes at p;
  * participation ratio (Σλ)² / Σλ², a threshold-free effective dimension (1 for a single direction,
    k for k equal ones).
`spectra_table` puts every unit of every granularity into ONE tidy frame, so units of different views
(contribution PCA here, attention-pattern PCA in `patterns.py`) can be compared column by column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from audio_residual.analysis.stats import PCABasis, ResidualStatistics
from audio_residual.names import Unit

ID_THRESHOLDS = {"id90": 0.90, "id95": 0.95, "id99": 0.99}
TABLE_COLUMNS = [
    "unit",
    "view",
    "granularity",
    "kind",
    "stage",
    "block",
    "head",
    "dim",
    "rank",
    *ID_THRESHOLDS,
    "participation_ratio",
    "total_variance",
    "top_evr",
    "samples",
]
_TOLERANCE = 1e-12  # cumulative sums of float64 ratios may miss an exactly reached threshold by an ulp


def _as_float64(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def explained_variance_ratio(eigenvalues, total_variance: float | None = None) -> np.ndarray:
    """λ_i / total; the total defaults to Σλ (pass the covariance trace when small directions were dropped)."""
    values = np.clip(_as_float64(eigenvalues), 0.0, None)
    total = float(values.sum()) if total_variance is None else float(total_variance)
    if total <= 0:
        return np.zeros_like(values)
    return values / total


def intrinsic_dimension(evr: np.ndarray, threshold: float) -> int:
    """The fewest leading components whose cumulative EVR reaches `threshold` (all of them if none does)."""
    cumulative = np.cumsum(_as_float64(evr))
    reached = np.flatnonzero(cumulative >= threshold - _TOLERANCE)
    return int(reached[0]) + 1 if len(reached) else len(cumulative)


def participation_ratio(eigenvalues) -> float:
    """(Σλ)² / Σλ²: the number of equally strong directions that would give the same spread."""
    values = np.clip(_as_float64(eigenvalues), 0.0, None)
    squares = float(np.sum(values**2))
    return float(values.sum() ** 2 / squares) if squares > 0 else float("nan")


def spectrum_summary(eigenvalues, total_variance: float | None = None) -> dict[str, float | int]:
    """The per-unit numbers every view reports: rank, id90/95/99, participation ratio, total and top EVR."""
    values = _as_float64(eigenvalues)
    total = float(np.clip(values, 0, None).sum()) if total_variance is None else float(total_variance)
    evr = explained_variance_ratio(values, total)
    summary: dict[str, float | int] = {"rank": len(values)}
    summary.update({name: intrinsic_dimension(evr, p) for name, p in ID_THRESHOLDS.items()})
    summary["participation_ratio"] = participation_ratio(values)
    summary["total_variance"] = total
    summary["top_evr"] = float(evr[0]) if len(evr) else float("nan")
    return summary


def parse_unit(name: str) -> tuple[int, float, float]:
    """(stage, block, head) of a unit name as table columns: block and head are NaN where the unit spans more."""
    unit = Unit.parse(name)
    return unit.stage, math.nan if unit.block is None else float(unit.block), math.nan if unit.head is None else float(unit.head)


def basis_row(basis: PCABasis, granularity: str, kind: str, samples: int | None = None) -> dict:
    """One tidy row for one unit's contribution PCA."""
    stage, block, head = parse_unit(basis.name)
    return {
        "unit": basis.name,
        "view": "contribution",
        "granularity": granularity,
        "kind": kind,
        "stage": stage,
        "block": block,
        "head": head,
        "dim": int(basis.mean.shape[0]),
        **spectrum_summary(basis.eigenvalues, basis.total_variance),
        "samples": samples,
    }


def _tokens(stats: ResidualStatistics, name: str, kind: str) -> int:
    """Tokens behind a unit's moments: its block's count, or the sum over a stage's blocks for layers."""
    unit = Unit.parse(name)
    blocks = stats.blocks_of(unit.stage) if unit.block is None else [unit.block_name]
    return sum(stats.blocks[b][kind].count for b in blocks)


def _combinations(granularities: Sequence[str], kinds: Sequence[str]):
    # MLPs have no heads: that combination is skipped, not an error, so defaults cover everything.
    return [(g, k) for g in granularities for k in kinds if not (g == "head" and k == "mlp")]


def spectra_table(
    stats: ResidualStatistics,
    granularities: Sequence[str] = ("head", "block", "layer"),
    kinds: Sequence[str] = ("attn", "mlp"),
) -> pd.DataFrame:
    """One row per unit (every granularity × kind), columns `TABLE_COLUMNS`; `samples` = tokens seen."""
    rows = []
    for granularity, kind in _combinations(granularities, kinds):
        for name, basis in stats.pca(granularity, kind).items():
            rows.append(basis_row(basis, granularity, kind, _tokens(stats, name, kind)))
    return pd.DataFrame.from_records(rows, columns=TABLE_COLUMNS)


def evr_curves(stats: ResidualStatistics, granularity: str = "head", kind: str = "attn") -> dict[str, np.ndarray]:
    """Cumulative EVR per unit (index i = first i+1 components), for plotting spectra side by side."""
    return {
        name: np.cumsum(explained_variance_ratio(b.eigenvalues, b.total_variance))
        for name, b in stats.pca(granularity, kind).items()
    }
