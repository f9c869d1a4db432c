"""The one setup the four notebooks share: real run or smoke run, data, model, output folder, study options.

    from audio_residual.notebook import setup
    nb = setup()          # AUDIO_RESIDUAL_SMOKE=1: tiny pretrained CLAP on generated data, for CI
    ws = nb.open()        # the Workspace every cell works on
    study = nb.study(ws)  # the study's steps: sweep, methods, transfer, report (notebooks 3 and 4)
    nb = setup(task="retrieval")   # notebook 4: captioned audio (Clotho; generated captions in smoke mode)

Notebooks 1–3 write into the same output folder (`nb.layout`), so notebook 3 finds notebook 2's sweep and
runs there instead of silently recomputing them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from audio_residual.clap.loading import ModelSource
from audio_residual.data_processing.sources import resolve_dataset
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import Study
from audio_residual.layout import RunLayout
from audio_residual.methods import default_methods
from audio_residual.training.grid import DEFAULT_GRID
from audio_residual.workspace import Workspace

SMOKE_ENV = "AUDIO_RESIDUAL_SMOKE"


@dataclass
class NotebookSetup:
    """Everything a notebook cell needs to know about where it runs."""

    smoke: bool
    data: str | Path
    model: str
    cache: Path
    layout: RunLayout
    config: StudyConfig  # the task, methods and their options, ResiDual's grid and base, k-shot protocols
    analysis_options: dict = field(default_factory=dict)
    transfer: dict[str, str | Path] = field(default_factory=dict)  # name → labelled dataset, scored zero-shot

    @property
    def captioned(self) -> bool:
        return self.config.task == "retrieval"

    def open(self) -> Workspace:
        """The study's workspace; the model also learns the transfer datasets' class names (the tiny
        offline model's tokenizer is built from them), in every notebook, so all of them share one model."""
        others = tuple(name for data in self.transfer.values() for name in resolve_dataset(data).class_names)
        ws = Workspace.open(self.data, ModelSource(self.model), cache_dir=self.cache, captions=self.captioned,
                            other_class_names=others)
        shape = (f"clips per split {ws.table.counts()}" if ws.captioned else
                 f"{len(ws.table.class_names)} classes, folds {list(ws.table.fold_ids)}")
        print(f"{'SMOKE' if self.smoke else 'REAL'} run: {ws.table.name}, {len(ws.table)} clips, {shape}; model "
              f"{self.model} on {ws.bundle.device}; outputs in {self.layout.root}")
        return ws

    def open_transfer(self, ws: Workspace) -> dict[str, Workspace]:
        """Each transfer dataset on `ws`'s model and audio configuration (features cached like the study's)."""
        return {name: ws.on(data) for name, data in self.transfer.items()}

    def study(self, ws: Workspace) -> Study:
        """The study's steps on `ws`, into the notebooks' output folder (W&B when logged in)."""
        return Study(ws, self.layout, self.config, wandb="auto")


def setup(smoke: bool | None = None, root: str | Path = "runs", task: str = "classification") -> NotebookSetup:
    """The real study (ESC-50 or Clotho, `laion/clap-htsat-unfused`) or, with AUDIO_RESIDUAL_SMOKE=1, a smoke run."""
    smoke = os.environ.get(SMOKE_ENV) == "1" if smoke is None else smoke
    root = Path(root)
    if task == "retrieval":
        return _retrieval_setup(smoke, root)
    if smoke:
        from audio_residual.data_processing.synthetic_captions import make_attribute_classes
        from audio_residual.demo import DEMO_CLASSES, DEMO_METHODS, DEMO_OPTIONS, DEMO_TRANSFER_CLASSES

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
                methods=DEMO_METHODS, options=DEMO_OPTIONS, shots=(1, 2), seeds=1,
            ),
            analysis_options={"tokens_per_clip": 200, "batch_size": 8, "ablation_max_clips": 4, "pattern_cap": 64},
            transfer={"generated, 2 other classes": other},
        )
    return NotebookSetup(
        smoke=False, data="esc50", model="laion/clap-htsat-unfused", cache=Path("cache"),
        layout=RunLayout(root / "esc50"),
        config=StudyConfig(
            base={"batch_size": 64, "val_fraction": 0.1, "schedule": "cosine", "optimizer": "adamw"},
            grid=DEFAULT_GRID,  # default unit: 2 × 2 × 3 × 2 options × 5 folds = 120 runs; paper preset: 30
            # full fine-tuning only on a GPU
            methods=(*default_methods("classification"), *(("finetune",) if torch.cuda.is_available() else ())),
            shots=(1, 2, 4, 8, 16), seeds=3,  # k-shot protocols (notebook 3): 3 draws per k
        ),
        # Ablation costs one pass over the evaluated clips per head (184 heads): cap the clips.
        analysis_options={"batch_size": 16, "ablation_max_clips": 200, "pattern_cap": 512},
    )


def _retrieval_setup(smoke: bool, root: Path) -> NotebookSetup:
    """Clotho (`data/clotho`, official layout) with `laion/clap-htsat-unfused`, ESC-50 for retention; or the
    smoke run: the tiny CLAP on generated captioned audio, offline."""
    if smoke:
        from audio_residual.data_processing import make_synthetic_esc50
        from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

        out = root / "smoke_retrieval"
        data = make_synthetic_captions(out / "data", n_clips=24, captions_per_clip=3, seconds=1.0, seed=0,
                                       split_fractions=(0.5, 0.25, 0.25))
        labelled = make_synthetic_esc50(out / "labelled", n_classes=2, clips_per_class=3, n_folds=3, seconds=1.0)
        config = StudyConfig(task="retrieval", shared={"epochs": 1, "batch_size": 4},
                             base={"epochs": 1, "batch_size": 4}, options={"lora": {"ranks": (2,)}}, examples=2)
        return NotebookSetup(True, data, "tiny", out / "cache", RunLayout(out / "study"), config,
                             transfer={"generated labelled": labelled})
    return NotebookSetup(False, Path("data") / "clotho", "laion/clap-htsat-unfused", Path("cache"),
                         RunLayout(root / "clotho_retrieval"), StudyConfig(task="retrieval"), transfer={"esc50": "esc50"})
