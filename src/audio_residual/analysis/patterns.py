"""PCA of each head's attention-probability patterns (the earlier project's view), in bounded memory.

A window's pattern for one head is a w²×w² probability matrix (64×64 in HTSAT), i.e. a 4096-dim vector;
a full 4096² covariance per head (184 heads in HTSAT-tiny) would not fit. Instead each block keeps a
uniform reservoir sample (Vitter's algorithm R, seeded) of at most `cap` windows, shared by its heads
(each head's sample is then uniform over windows too), and each head's spectrum is computed from the
n×n Gram matrix of its centred sample (n ≤ cap): the nonzero eigenvalues of X Xᵀ/n equal those of the
sample covariance XᵀX/n. The result is therefore EXACT for the subsample and APPROXIMATES the pattern
covariance spectrum of all windows by that of the subsample (rank ≤ n − 1; the leading, well-sampled
eigenvalues are the reliable part). Samples are stored as float16 (probabilities in [0, 1], relative
precision 5e-4): at cap 512 the whole HTSAT-tiny reservoir is ≈ 0.77 GB; lower `cap` or pick `stages`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from audio_residual.analysis.spectra import TABLE_COLUMNS, spectrum_summary
from audio_residual.clap.batches import batches
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks, HookPoint
from audio_residual.names import Unit, block_name, parse_block


def gram_eigenvalues(samples: torch.Tensor) -> torch.Tensor:
    """Descending eigenvalues of the (1/n) sample covariance of the rows, via the n×n Gram matrix."""
    x = samples.reshape(samples.shape[0], -1).double()
    x = x - x.mean(0)
    gram = x @ x.T / x.shape[0]
    return torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0).clamp(min=0)


class PatternReservoir:
    """Per block, a seeded uniform sample of at most `cap` windows' attention patterns (all heads).

    Use `reservoir.hook` on `*.attn.hook_pattern` during any forward passes; memory never exceeds
    cap × heads × w⁴ float16 per block however many batches pass.
    """

    def __init__(self, cap: int = 512, seed: int = 0, stages: Sequence[int] | None = None):
        if cap < 2:
            raise ValueError("a pattern spectrum needs a reservoir of at least 2 windows")
        self.cap = cap
        self.stages = None if stages is None else set(stages)
        self.rng = np.random.default_rng(seed)
        self.samples: dict[str, torch.Tensor] = {}  # block → (n ≤ cap, heads, w⁴) float16
        self.seen: dict[str, int] = {}  # block → windows offered so far
        self._buffers: dict[str, torch.Tensor] = {}  # block → storage that `samples` views

    def hook(self, tensor: torch.Tensor, point: HookPoint) -> None:
        if self.stages is None or point.stage in self.stages:
            self.add(block_name(point.stage, point.block), tensor)

    def add(self, block: str, patterns: torch.Tensor) -> None:
        """Offer a batch of windows (windows, heads, w², w²); keeps each seen window with probability cap/seen."""
        rows = patterns.detach().reshape(patterns.shape[0], patterns.shape[1], -1)
        seen = self.seen.get(block, 0)
        buffer = self._buffers.get(block)
        if buffer is None or (seen < self.cap and buffer.shape[0] < min(self.cap, seen + len(rows))):
            # Grow geometrically up to cap: no per-batch re-copy while the reservoir fills.
            size = min(self.cap, max(2 * (0 if buffer is None else buffer.shape[0]), seen + len(rows)))
            grown = torch.empty(size, *rows.shape[1:], dtype=torch.float16)
            if seen:
                grown[:seen] = buffer[:seen]
            buffer = self._buffers[block] = grown
        # Algorithm R: item t (0-based) fills slot t while t < cap, else replaces slot j ~ U{0..t} if j < cap.
        positions = seen + np.arange(len(rows))
        fill = positions < self.cap
        n_fill = int(fill.sum())
        if n_fill:  # the filling items are a leading run of the batch: one converting copy, no gather
            buffer[seen : seen + n_fill].copy_(rows[:n_fill])
        slots = self.rng.integers(0, positions[n_fill:] + 1) if n_fill < len(rows) else np.empty(0, np.int64)
        accepted = n_fill + np.flatnonzero(slots < self.cap)
        if len(accepted):
            # Later items overwrite earlier ones that drew the same slot, as the sequential algorithm would.
            targets = slots[accepted - n_fill]
            _, last = np.unique(targets[::-1], return_index=True)
            accepted, targets = accepted[::-1][last], targets[::-1][last]
            buffer[torch.from_numpy(targets)] = rows[torch.from_numpy(accepted).to(rows.device)].to("cpu", torch.float16)
        self.seen[block] = seen + len(rows)
        self.samples[block] = buffer[: min(self.cap, self.seen[block])]

    def eigenvalues(self) -> dict[str, torch.Tensor]:
        """Unit name (`layers.{s}.blocks.{b}.attn.head.{h}`) → descending pattern-covariance eigenvalues."""
        out = {}
        for block, store in self.samples.items():
            for h in range(store.shape[1]):
                out[Unit(*parse_block(block), head=h).name] = gram_eigenvalues(store[:, h])
        return out

    def table(self) -> pd.DataFrame:
        """Rows in `spectra.TABLE_COLUMNS` with view='pattern', dim = w⁴, samples = windows kept."""
        rows = []
        for name, values in self.eigenvalues().items():
            unit = Unit.parse(name)
            store = self.samples[unit.block_name]
            values = values[values > 1e-10 * max(float(values[0]), 1e-300)]  # the subsample's rank
            rows.append(
                {
                    "unit": name,
                    "view": "pattern",
                    "granularity": "head",
                    "kind": "attn",
                    "stage": unit.stage,
                    "block": float(unit.block),
                    "head": float(unit.head),
                    "dim": int(store.shape[2]),
                    **spectrum_summary(values),
                    "samples": int(store.shape[0]),
                }
            )
        return pd.DataFrame.from_records(rows, columns=TABLE_COLUMNS)


@torch.no_grad()
def collect_patterns(
    model,
    input_features: np.ndarray,
    indices: Sequence[int] | np.ndarray,
    cap: int = 512,
    batch_size: int = 16,
    seed: int = 0,
    stages: Sequence[int] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    device: torch.device | str = "cpu",
    is_longer: np.ndarray | None = None,
) -> PatternReservoir:
    """One forward pass over `input_features[indices]` filling a `PatternReservoir`."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("pattern statistics need at least one clip: the index set is empty")
    reservoir = PatternReservoir(cap, seed, stages)
    with ClapHooks(model).hooks([("*.attn.hook_pattern", reservoir.hook)]):
        for _, x, longer in batches(input_features, indices, batch_size, device, is_longer, desc="attention patterns"):
            with autocast():
                audio_embeddings(model, x, longer)
    return reservoir
