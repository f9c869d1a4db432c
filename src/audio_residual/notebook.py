"""The one setup the three notebooks share: real run or smoke run, data, model, output folder, options.

    from audio_residual.notebook import setup
    nb = setup()          # AUDIO_RESIDUAL_SMOKE=1: tiny pretrained CLAP on generated data, for CI
    ws = nb.open()        # the Workspace every cell works on
    targets = nb.open_transfer(ws)   # other datasets for zero-shot transfer (notebook 3)

All three notebooks write into the same output folder (`nb.layout`), so notebook 3 finds notebook 2's
sweep and runs there instead of silently recomputing them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.sweep import DEFAULT_GRID
from audio_residual.layout import RunLayout
from audio_residual.workspace import Workspace, resolve_dataset

SMOKE_ENV = "AUDIO_RESIDUAL_SMOKE"


@dataclass
class NotebookSetup:
    """Everything a notebook cell needs to know about where it runs."""

    smoke: bool
    data: str | Path
    model: str
    cache: Path
    layout: RunLayout
    config: StudyConfig  # grid (fold included), base training options, methods, k-shot protocols
    analysis_options: dict = field(default_factory=dict)
    transfer: dict[str, str | Path] = field(default_factory=dict)  # name → dataset, scored zero-shot
    peer_options: dict = field(default_factory=dict)  # keyword arguments of the peer methods' training

    def open(self) -> Workspace:
        """The study's workspace; the model also learns the transfer datasets' class names (the tiny
        offline model's tokenizer is built from them), in every notebook, so all three share one model."""
        others = tuple(name for data in self.transfer.values() for name in resolve_dataset(data).class_names)
        ws = Workspace.open(self.data, model=self.model, cache_dir=self.cache, other_class_names=others)
        print(f"{'SMOKE' if self.smoke else 'REAL'} run: {ws.table.name}, {len(ws.table)} clips, "
              f"{len(ws.table.class_names)} classes, folds {list(ws.table.fold_ids)}; model {self.model} on "
              f"{ws.bundle.device}; outputs in {self.layout.root}")
        return ws

    def open_transfer(self, ws: Workspace) -> dict[str, Workspace]:
        """Each transfer dataset on `ws`'s model (features cached like the study's)."""
        from audio_residual.evaluation.transfer import target_workspace

        return {name: target_workspace(ws, resolve_dataset(data), cache_dir=self.cache) for name, data in self.transfer.items()}


def setup(smoke: bool | None = None, root: str | Path = "runs") -> NotebookSetup:
    """The real study (ESC-50, `laion/clap-htsat-unfused`) or, with AUDIO_RESIDUAL_SMOKE=1, a smoke run."""
    smoke = os.environ.get(SMOKE_ENV) == "1" if smoke is None else smoke
    root = Path(root)
    if smoke:
        from audio_residual.data_processing.synthetic_captions import make_attribute_classes
        from audio_residual.demo import DEMO_CLASSES, DEMO_TRANSFER_CLASSES

        out = root / "smoke"
        data = make_attribute_classes(out / "data", DEMO_CLASSES[:4], clips_per_class=6, n_folds=3, seed=0)
        other = make_attribute_classes(out / "transfer_data", DEMO_TRANSFER_CLASSES[:2], clips_per_class=3, n_folds=3,
                                       seed=1)  # classes disjoint from the study's  # fmt: skip
        return NotebookSetup(
            smoke=True, data=data, model="tiny", cache=out / "cache", layout=RunLayout(out),
            config=StudyConfig(
                base={"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"},
                grid={"preset": ["default", "paper"], "granularity": ["layer", "head"], "lr": [0.1], "epochs": [2],
                      "fold": [1, 2, 3]},  # fmt: skip
                finetune_epochs=1, shots=(1, 2), seeds=1,
            ),
            analysis_options={"tokens_per_clip": 200, "batch_size": 8, "ablation_max_clips": 4, "pattern_cap": 64},
            transfer={"generated, 2 other classes": other},
            peer_options={"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 5}, "coop": {"epochs": 5}},
        )
    return NotebookSetup(
        smoke=False, data="esc50", model="laion/clap-htsat-unfused", cache=Path("cache"),
        layout=RunLayout(root / "esc50"),
        config=StudyConfig(
            base={"batch_size": 64, "val_fraction": 0.1, "schedule": "cosine", "optimizer": "adamw"},
            grid=DEFAULT_GRID,  # default unit: 2 × 2 × 3 × 2 options × 5 folds = 120 runs; paper preset: 30
            finetune_epochs=5 if torch.cuda.is_available() else 0,  # full fine-tuning only on a GPU
            shots=(1, 2, 4, 8, 16), seeds=3,  # k-shot protocols (notebook 3): 3 draws per k
        ),
        # Ablation costs one pass over the evaluated clips per head (184 heads): cap the clips.
        analysis_options={"batch_size": 16, "ablation_max_clips": 200, "pattern_cap": 512},
    )
