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

from audio_residual.clap.loading import ModelSource
from audio_residual.data_processing.synthetic_captions import make_attribute_classes, make_synthetic_captions
from audio_residual.evaluation.store import markdown_table, summary_table
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import Study, dataset_labels
from audio_residual.io import write_text
from audio_residual.layout import RunLayout
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
DEMO_METHODS = ("zeroshot", "linear_probe", "contrastive_adapter", "tip_adapter", "tip_adapter_f", "coop", "lora",
                "finetune", "residual", "residual-paper", "residual_coarse")
DEMO_OPTIONS = {"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 5}, "coop": {"epochs": 5},
                "finetune": {"epochs": 1}}
DEMO_RETRIEVAL = StudyConfig(
    task="retrieval", shared={"epochs": 5, "batch_size": 8}, base={"epochs": 5, "batch_size": 8, "lr": 0.1},
    options={"lora": {"lr": 1e-3, "ranks": (8,)}, "finetune": {"lr": 1e-4}}, examples=2,
)


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
    ws = Workspace.open(data, ModelSource("tiny", device="cpu"), cache_dir=out / "cache")
    config = StudyConfig(grid=DEMO_GRID, base=DEMO_BASE, methods=DEMO_METHODS, options=DEMO_OPTIONS,
                         shots=DEMO_SHOTS, seeds=1)
    Study(ws, out, config, name=source).run({target: ws.on(other)}, {"pattern_cap": 128})
    return append_section(RunLayout.of(out).report, run_retrieval_demo(out, ws, seed=seed))


def run_retrieval_demo(out: Path, labelled: Workspace, seed: int = 0, n_clips: int = 80) -> str:
    """The retrieval study under `out/retrieval` (retention on the labelled demo data); its report section.

    A fifth of the clips each for validation and test, so that R@1 and R@5 of the test table can differ."""
    captions = make_synthetic_captions(out / "captions_data", n_clips=n_clips, captions_per_clip=5, seed=seed,
                                       split_fractions=(0.6, 0.2, 0.2))
    ws = Workspace.open(captions, ModelSource("tiny", device="cpu"), cache_dir=out / "cache", captions=True)
    ws.batch_size = 8
    study = Study(ws, out / "retrieval", DEMO_RETRIEVAL)
    outcome = study.run({"demo classes": ws.on(labelled.table)})
    summary = summary_table(outcome.store, task=study.task)
    return "\n\n".join([
        "## Retrieval (generated captioned audio, tiny CLAP)",
        f"{n_clips} generated clips with 5 captions each, official-style splits {ws.table.counts()}; every "
        "method chosen on validation (epoch 0 included) and scored on test. Full study: `retrieval/report.md`.",
        markdown_table(summary, task=study.task),
        "Retention (zero-shot classification of the demo's labelled clips by each adapted encoder):",
        "\n".join(["| method | accuracy | plain zero-shot | retention |", "|---|---|---|---|",
                   *(f"| {r.method} | {r.accuracy:.3f} | {r.zeroshot:.3f} | {r.retention:+.3f} |"
                     for r in outcome.transfer.itertuples())]),
    ])


def append_section(report: Path, section: str) -> Path:
    return write_text(report, report.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + section + "\n")
