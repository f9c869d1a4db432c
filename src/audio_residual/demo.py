"""The offline demo: the whole study (`audio_residual.experiments.study`) on generated data with the tiny pretrained CLAP.

The classes are attribute combinations of the captioned-audio generator (`synthetic_captions`) named by the
words the tiny CLAP was pretrained on, so zero-shot means something; they are chosen close to each other
(same family, one attribute apart, the others drawn per clip) so that the methods do not all saturate.

It needs no network and no GPU; on a 2-core CPU it takes a few minutes. Besides the full-data comparison
it runs a small few-shot sweep (k = 1, 2; one draw each) and zero-shot transfer to a second generated
dataset whose classes are disjoint from the first's. The same steps run on the real model and ESC-50
with `audio-residual experiment` (see README).
"""

from __future__ import annotations

from pathlib import Path

import torch

from audio_residual.data_processing import load_dataset
from audio_residual.data_processing.synthetic_captions import make_attribute_classes
from audio_residual.evaluation.transfer import target_workspace
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import dataset_labels, run_study
from audio_residual.layout import RunLayout
from audio_residual.retrieval.demo import append_section, run_retrieval_demo
from audio_residual.workspace import Workspace

DEMO_GRID = {
    "preset": ["default", "paper"],
    "granularity": ["layer", "head"],
    "lr": [0.3],
    "epochs": [10],
    "stages": [[2, 3]],  # λ on the last two stages: their input is cached once per clip (frozen prefix)
    "fold": [1, 2, 3, 4, 5],
}
DEMO_BASE = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"}
DEMO_SHOTS = (1, 2)
# Pairs one attribute apart: pitch within a family, rate, band, direction.
DEMO_CLASSES = (
    {"pitch": "low", "family": "hum"},
    {"pitch": "high", "family": "hum"},
    {"rate": "slow", "family": "clicks"},
    {"rate": "fast", "family": "clicks"},
    {"band": "narrow", "family": "noise"},
    {"band": "wide", "family": "noise"},
)
DEMO_TRANSFER_CLASSES = ({"pitch": "low", "family": "tone"}, {"pitch": "high", "family": "tone"},
                         {"direction": "rising", "family": "chirp"})  # fmt: skip
DEMO_PEER_OPTIONS = {"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 5}, "coop": {"epochs": 5}}


def run_demo(out: str | Path, n_classes: int = 6, clips_per_class: int = 10, seed: int = 0) -> Path:
    """Generate data, run every step, write `out/report.md` (+ results.csv, heads.csv, transfer.csv, figures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are toy-sized: more threads only hand off (15× slower under load)
    try:
        return _run_demo(Path(out), n_classes, clips_per_class, seed)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, n_classes: int, clips_per_class: int, seed: int) -> Path:
    if not 2 <= n_classes <= len(DEMO_CLASSES):
        raise ValueError(f"the demo has 2..{len(DEMO_CLASSES)} classes, got {n_classes}")
    data = make_attribute_classes(out / "data", DEMO_CLASSES[:n_classes], clips_per_class=clips_per_class, seed=seed)
    other = make_attribute_classes(out / "transfer_data", DEMO_TRANSFER_CLASSES, clips_per_class=5, seed=seed + 1)
    source, target = dataset_labels([data, other])
    other_table = load_dataset(other)
    ws = Workspace.open(data, model="tiny", cache_dir=out / "cache", device="cpu",
                        other_class_names=other_table.class_names)  # fmt: skip
    transfer = {target: target_workspace(ws, other_table, cache_dir=out / "cache")}
    config = StudyConfig(grid=DEMO_GRID, base=DEMO_BASE, finetune_epochs=1, shots=DEMO_SHOTS, seeds=1)
    run_study(
        ws, out, config, analysis_options={"pattern_cap": 128}, peer_options=DEMO_PEER_OPTIONS,
        transfer=transfer, name=source,
    )
    return append_section(RunLayout.of(out).report, run_retrieval_demo(out, data, seed=seed))
