"""Linear probe by CLIP's protocol: scikit-learn L-BFGS logistic regression on frozen embeddings, C on validation.

The baseline every parameter-efficient method is measured against (it is tied to the dataset's classes).

CLIP (Radford et al. 2021, appendix A.3) fits an L2-regularised multinomial `LogisticRegression`
(L-BFGS) per dataset and sweeps its inverse regularisation C on a log grid, choosing it on a validation
split. Here the sweep fits on the training split only, scores each C on the
validation split, and keeps the fit of the chosen C (trained on the training split, never on test).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from audio_residual.methods.base import Method, keyword_defaults, register

DEFAULT_PROBE_CS = tuple(float(c) for c in np.logspace(-4, 4, 17))


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class LogisticProbe:
    """logits = emb @ weight.T + bias on raw embeddings; the standardisation is folded into the weights."""

    weight: torch.Tensor  # (n_classes, D)
    bias: torch.Tensor  # (n_classes,)
    C: float
    val_accuracy: float | None
    val_accuracies: dict[float, float]  # C → validation accuracy, the whole sweep

    @torch.no_grad()
    def logits(self, emb) -> torch.Tensor:
        return torch.as_tensor(_numpy(emb), dtype=torch.float32) @ self.weight.T + self.bias

    @property
    def num_parameters(self) -> int:
        return self.weight.numel() + self.bias.numel()


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int) -> LogisticRegression:
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed).fit(x, y)


def train_logistic_probe(
    train_emb,
    train_labels,
    n_classes: int,
    val_emb=None,
    val_labels=None,
    Cs: float | Sequence[float] = DEFAULT_PROBE_CS,
    standardize: bool = True,
    max_iter: int = 1000,
    seed: int = 0,
) -> LogisticProbe:
    """Multinomial L-BFGS logistic regression, C chosen by validation accuracy (ties: the smaller C).

    Features are standardised with training statistics (unit-norm CLAP embeddings have tiny per-dimension
    spread, which would make the useful C range depend on the embedding width); the scaling is folded
    back into the weights, so the probe has exactly D·C + C parameters. Every class must occur in the
    training labels. Without a validation split the first C is used.
    """
    x, y = _numpy(train_emb).astype(np.float64), _numpy(train_labels).astype(np.int64)
    missing = sorted(set(range(n_classes)) - set(y.tolist()))
    if missing:
        raise ValueError(f"linear probe: classes {missing} have no training example")
    Cs = [float(Cs)] if np.isscalar(Cs) else [float(c) for c in Cs]
    has_val = val_emb is not None and val_labels is not None and len(val_labels) > 0
    if not has_val:
        Cs = Cs[:1]
    scaler = StandardScaler(with_mean=standardize, with_std=standardize).fit(x)
    x = scaler.transform(x)
    best, accuracies = None, {}
    for C in sorted(Cs):
        model = _fit(x, y, C, seed, max_iter)
        if has_val:
            predicted = model.predict(scaler.transform(_numpy(val_emb).astype(np.float64)))
            accuracies[C] = float((predicted == _numpy(val_labels)).mean())
        if best is None or (has_val and accuracies[C] > accuracies[best[0]]):
            best = (C, model)
    C, model = best
    if model.coef_.shape[0] == 1:  # binary: sklearn keeps one row of scores s; use the rows -s/2, s/2
        coef, intercept = np.concatenate([-model.coef_, model.coef_]) / 2, np.array([-1, 1]) * model.intercept_ / 2
    else:
        coef, intercept = model.coef_, model.intercept_
    scale = scaler.scale_ if standardize else np.ones(x.shape[1])
    mean = scaler.mean_ if standardize else np.zeros(x.shape[1])
    weight = coef / scale  # W·((e - μ)/σ) + b  =  (W/σ)·e + (b - (W/σ)·μ)
    bias = intercept - weight @ mean
    return LogisticProbe(
        torch.as_tensor(weight, dtype=torch.float32),
        torch.as_tensor(bias, dtype=torch.float32),
        C,
        accuracies.get(C),
        accuracies,
    )


@register
class LinearProbe(Method):
    name = "linear_probe"
    by_default = ("classification",)
    defaults = keyword_defaults(train_logistic_probe, "seed")

    def fit(self, ctx):
        train, val = ctx.split.train, ctx.split.val
        return train_logistic_probe(ctx.embed(train), ctx.labels(train), len(ctx.ws.table.class_names), ctx.embed(val),
                                    ctx.labels(val), seed=ctx.seed, **ctx.options)  # fmt: skip

    def scores(self, model, ctx, rows):
        return model.logits(ctx.embed(rows))
