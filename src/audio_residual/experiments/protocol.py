"""Which training clips a method may see: the whole training folds, or k per class (a k-shot draw).

    for protocol in [FULL_DATA, *few_shot_protocols([1, 2, 4, 8, 16], seeds=3)]:
        Study(ws, out, config).methods([protocol])   # same code, other splits

Every protocol tests on the official test folds, so full-data and k-shot rows of one method are scored
on the same clips. A k-shot draw takes `shots` training clips per class from the training folds and
as many validation clips per class from the rest of them (`few_shot_splits`): model choice sees no
more labels than training does. Rows carry `shots` and `seed` (empty for full data) and their key
includes both, so full-data and k-shot rows never mix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from audio_residual.data_processing import Split
from audio_residual.data_processing.folds import few_shot_splits
from audio_residual.layout import RunLayout
from audio_residual.workspace import Workspace


@dataclass(frozen=True)
class Protocol:
    """Full data (`shots` None) or a k-shot draw (`shots` clips per class, drawn with `seed`)."""

    shots: int | None = None
    seed: int | None = None

    def __post_init__(self):
        if (self.shots is None) != (self.seed is None):
            raise ValueError(f"a k-shot protocol needs both shots and seed, full data neither; got {self}")
        if self.shots is not None and self.shots < 1:
            raise ValueError(f"shots must be ≥ 1, got {self.shots}")

    @property
    def full_data(self) -> bool:
        return self.shots is None

    @property
    def label(self) -> str:
        return "full data" if self.full_data else f"{self.shots}-shot, seed {self.seed}"

    def splits(self, ws: Workspace, val_fraction: float = 0.0, seed: int = 0) -> list[Split]:
        """Official splits (`Workspace.splits`) or this draw's k-shot splits."""
        if self.full_data:
            return ws.splits(val_fraction, seed)
        if ws.captioned:
            raise ValueError(f"{ws.table.name} is captioned audio: a k-shot draw needs classes")
        return few_shot_splits(ws.table, self.shots, self.seed, valid=ws.features.valid)

    def layout(self, out: RunLayout) -> RunLayout:
        """Where this protocol's runs live: the study's folder, or the draw's own (`RunLayout.few_shot`)."""
        return out if self.full_data else out.few_shot(self.shots, self.seed)

    def procedure(self) -> dict:
        """What keys a result besides the method: nothing for full data (keys of earlier runs stay valid)."""
        return {} if self.full_data else {"shots": self.shots, "shot_seed": self.seed}

    def rows(self, results: pd.DataFrame) -> pd.DataFrame:
        """The rows of a results table (with `shots` and `seed` columns) that this protocol produced."""
        if self.full_data:
            return results[results["shots"].isna()]
        return results[(results["shots"] == self.shots) & (results["seed"] == self.seed)]

    def columns(self) -> dict:
        """The `shots` and `seed` columns of a results row (empty for full data)."""
        return {"shots": self.shots, "seed": self.seed}


FULL_DATA = Protocol()


def few_shot_protocols(shots: Iterable[int], seeds: int) -> list[Protocol]:
    """Every k of `shots` drawn with seeds 0..seeds-1 (the same seeds for every k: draws nest in k)."""
    if seeds < 1:
        raise ValueError(f"seeds must be ≥ 1, got {seeds}")
    return [Protocol(int(k), seed) for k in shots for seed in range(seeds)]
