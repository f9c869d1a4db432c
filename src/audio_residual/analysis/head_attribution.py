"""Which heads drive a score, by gradients: gradient × head output, summed over tokens, per head.

Head h writes W_O,h z_h into its block's stream, so ∂s/∂(W_O,h z_h) · W_O,h z_h = ∂s/∂z_h · z_h: the
attribution is read on `attn.hook_z` (no per-head output tensor is materialised). Relative to the head's
training mean m_h, −∂s/∂z_h · (z_h − m_h) is the first-order estimate of what mean ablation (notebook 1,
`analysis.ablation`) does to the score, so its ranking of heads can be set against the ablation's
(Spearman rank correlation, `compare_with_ablation`). One forward and one backward pass per batch give
every head at once, where ablation needs one forward pass per head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from audio_residual.analysis.saliency import Scorer
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.hooks import ClapHooks, HookPoint
from audio_residual.names import Unit, hook_name, parse_block, parse_hook


def _per_clip(values: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch·windows, w², heads) → (batch, heads), summed over every token of a clip (windows are batch-major)."""
    return values.reshape(batch, -1, values.shape[-1]).sum(1)


def _batch_attribution(scorer: Scorer, x, target, is_longer, means: dict[str, torch.Tensor]) -> dict:
    """{hook name: (plain (batch, heads), centred (batch, heads) or None)} for one batch."""
    hooks = ClapHooks(scorer.encoder)
    captured: dict[str, torch.Tensor] = {}

    def keep(z: torch.Tensor, point: HookPoint) -> None:
        captured[point.name] = z

    x = x.detach().float().requires_grad_(True)  # frozen weights: gradients must start somewhere
    with scorer.attached(), hooks.hooks([("*.attn.hook_z", keep)]):
        score = scorer.score(x, target, is_longer)
    names = list(captured)
    grads = torch.autograd.grad(score.sum(), [captured[n] for n in names])
    out = {}
    batch = x.shape[0]
    for name, z, grad in zip(names, (captured[n] for n in names), grads, strict=True):
        z, grad = z.float(), grad.float()
        plain = _per_clip((grad * z).sum(-1), batch)
        centred = None
        if name in means:
            centred = _per_clip((grad * (z - means[name].to(z.device).view(z.shape[-2], -1))).sum(-1), batch)
        out[name] = (plain.detach().cpu(), None if centred is None else centred.detach().cpu())
    return out


def head_attribution(
    scorer: Scorer,
    input_features: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    targets: Sequence[int] | np.ndarray,
    stats: ResidualStatistics | None = None,
    is_longer: np.ndarray | None = None,
    batch_size: int = 8,
    device="cpu",
) -> pd.DataFrame:
    """One row per head: `grad_x_output` (mean over clips of ∂s/∂z_h · z_h summed over tokens), its mean
    |·| per clip, and with `stats` the centred `grad_x_centred` (∂s/∂z_h · (z_h − m_h)) and its mean |·|."""
    rows, targets = np.asarray(rows), np.asarray(targets)
    if len(rows) == 0:
        raise ValueError("head attribution needs at least one clip")
    means = {}
    if stats is not None:
        for block in stats.blocks:
            means[hook_name(*parse_block(block), "attn.hook_z")] = stats.blocks[block]["z"].mean.float()
    parts: dict[str, list] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        x = torch.from_numpy(np.array(input_features[chunk], dtype=np.float32)).to(device)
        longer = None if is_longer is None else torch.as_tensor(np.asarray(is_longer)[chunk]).reshape(-1, 1).to(device)
        target = torch.as_tensor(targets[start : start + batch_size]).long().to(device)
        for name, value in _batch_attribution(scorer, x, target, longer, means).items():
            parts.setdefault(name, []).append(value)
    records = []
    for name, values in parts.items():
        stage, block, _ = parse_hook(name)
        plain = torch.cat([v[0] for v in values])
        centred = torch.cat([v[1] for v in values]) if values[0][1] is not None else None
        for head in range(plain.shape[1]):
            record = {
                "unit": Unit(stage, block, head=head).name, "stage": stage, "block": block, "head": head,
                "clips": len(rows),
                "grad_x_output": float(plain[:, head].mean()),
                "abs_grad_x_output": float(plain[:, head].abs().mean()),
            }
            if centred is not None:
                record["grad_x_centred"] = float(centred[:, head].mean())
                record["abs_grad_x_centred"] = float(centred[:, head].abs().mean())
            records.append(record)
    return pd.DataFrame.from_records(records)


PAIRS = (
    ("grad_x_output", "delta"),
    ("grad_x_centred", "delta"),
    ("abs_grad_x_output", "logit_shift"),
    ("abs_grad_x_centred", "logit_shift"),
)


ABLATION_MEANING = {"delta": "changed a prediction (accuracy change 0 for every head)",
                    "logit_shift": "moved a logit (logit shift the same for every head)"}


def _constant_note(merged: pd.DataFrame, column: str, versus: str) -> str:
    """Why a Spearman ρ cannot be computed (a column with one value ranks nothing), or "" when it can."""
    if merged[versus].nunique(dropna=True) <= 1:
        return f"no single-head ablation {ABLATION_MEANING[versus]}: nothing to rank against"
    if merged[column].nunique(dropna=True) <= 1:
        return f"{column} is the same for every head: nothing to rank"
    return ""


def compare_with_ablation(attribution: pd.DataFrame, ablation: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ over heads between each attribution column and the ablation's `delta` / `logit_shift`.

    Mean ablation lowers the score by ≈ ∂s/∂z_h · (z_h − m_h): where the rankings agree, expect ρ < 0 for
    the signed columns against the accuracy change `delta` and ρ > 0 for the magnitudes against `logit_shift`.
    When a column holds one value for every head (typically: no single-head ablation flips a prediction, so
    `delta` is 0 throughout), there is no ranking: ρ and p are left empty and `note` says why.
    """
    merged = attribution.merge(ablation[["unit", "delta", "logit_shift"]], on="unit", how="inner")
    if merged.empty:
        raise ValueError("no head in common between the attribution and the ablation (other model or stages?)")
    rows = []
    for column, versus in PAIRS:
        if column not in merged:
            continue
        note = _constant_note(merged, column, versus)
        rho, p = (np.nan, np.nan) if note else stats.spearmanr(merged[column], merged[versus])
        rows.append({"attribution": column, "ablation": versus, "heads": len(merged),
                     "spearman": float(rho), "p_value": float(p), "note": note})
    return pd.DataFrame.from_records(rows)
