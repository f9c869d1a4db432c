"""Named pretraining runs: `--preset tiny` is the run whose result ships as `--model tiny`.

It generates captioned audio (`synthetic_captions`) without the held-out attribute combinations, trains the
tiny configuration from scratch on one torch thread (toy-sized ops: more threads only contend, several times
slower on a loaded CPU), writes OUT/model, then scores the result zero-shot on generated data it never saw
(`held_out_figures`: the held-out combinations in the held-out phrasings, and in-distribution data beside)
and records those figures in OUT/model/pretraining.json. Floats differ across CPUs and BLAS builds, so a
rerun trains to other weights: docs/pretraining.md gives the range of figures reruns get.
`ship` copies a result into the package with its training log beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.training.pretrain import PretrainConfig

PRESETS = {
    "tiny": {
        "clips": 400,
        "captions_per_clip": 5,
        "seconds": 2.0,
        "split_fractions": (0.9, 0.05, 0.05),
        "combinations": "seen",  # the held-out combinations never occur in pretraining
        # lr 1e-3 over 32 epochs: at 2e-3 over 24, reruns of one seed on two CPUs, or of three seeds on one, ended
        # anywhere from validation mean R@1 0.21 to 0.60 (a loss plateau at 2.45 on one of them)
        "config": PretrainConfig(epochs=32, batch_size=16, lr=1e-3, weight_decay=0.01, warmup=0.05, all_captions=True),
    }
}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "clap" / "pretrained_tiny"
# The evaluation data: one seed for every run (whatever its training seed), so reruns are compared on the same clips.
EVALUATION_SEED = 9_999
EVALUATION_SIZE = {"clips_per_class": 12, "captioned_clips": 60, "seconds": 2.0}


def run_preset(name: str, out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Generate the preset's data (seeded by `seed`), pretrain, score the result on held-out data, return OUT/model."""
    from audio_residual.data_processing.captions import load_captions
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
    from audio_residual.io import write_json
    from audio_residual.training.pretrain_run import PROVENANCE_FILE, PretrainRun, PretrainSource, pretrain

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {sorted(PRESETS)}")
    preset, out = PRESETS[name], Path(out)
    config = PretrainConfig(**{**preset["config"].__dict__, "seed": seed})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = make_synthetic_captions(
            out / "data", n_clips=preset["clips"], captions_per_clip=preset["captions_per_clip"],
            seconds=preset["seconds"], seed=seed, split_fractions=preset["split_fractions"],
            combinations=preset["combinations"],
        )  # fmt: skip
        extra = {"preset": name, "command": f"audio-residual pretrain --preset {name} --seed {seed} --out OUT",
                 "generated_data": {k: v for k, v in preset.items() if k != "config"} | {"seed": seed}}  # fmt: skip
        run = PretrainRun(out, cache_dir=out / "cache", audio=AudioConfig(workers=2), device=device, wandb="disabled",
                          extra_provenance=extra)
        model = pretrain(load_captions(data), PretrainSource("tiny"), config, run)
        figures = held_out_figures(model, out / "evaluation", device=device)
        provenance = json.loads((model / PROVENANCE_FILE).read_text(encoding="utf-8"))
        write_json(model / PROVENANCE_FILE, {**provenance, "evaluation": figures})
        return model
    finally:
        torch.set_num_threads(threads)


def held_out_figures(model, work: str | Path, device: str = "cpu", seed: int = EVALUATION_SEED,
                     size: dict = EVALUATION_SIZE) -> dict:
    """Zero-shot figures of a tiny CLAP (`model`: a folder or "tiny") on generated data of seed `seed` and `size`.

    Classification: clips of the 10 family × pitch classes, each scored against all 10 prompts ("This is a
    sound of high hum."); accuracy over the clips of the held-out classes (compositional: the model never
    heard or read that family at that pitch) and over the other classes' clips (in-distribution).
    Retrieval: all clips of a held-out set (held-out combinations and phrasings) against all their captions,
    and of an in-distribution set; R@1 both directions beside the random R@1.
    """
    from audio_residual.clap.loading import ModelSource
    from audio_residual.data_processing.captions import load_captions
    from audio_residual.data_processing.synthetic_captions import (
        FAMILY_PITCH_CLASSES,
        held_out_combination,
        make_attribute_classes,
        make_synthetic_captions,
    )
    from audio_residual.tasks import RETRIEVAL
    from audio_residual.tasks.classification import topk_accuracy
    from audio_residual.workspace import Workspace

    work = Path(work)
    classes = make_attribute_classes(work / "classes", FAMILY_PITCH_CLASSES, clips_per_class=size["clips_per_class"],
                                     seconds=size["seconds"], seed=seed)  # fmt: skip
    ws = Workspace.open(classes, ModelSource(str(model), device=device), cache_dir=work / "cache")
    rows = ws.valid_indices()
    logits, labels = ws.classifier.logits(ws.embeddings(rows)), ws.table.labels[rows]
    held = np.array([held_out_combination(FAMILY_PITCH_CLASSES[label]) is not None for label in labels])
    figures = {
        "seed": seed, "classes": len(FAMILY_PITCH_CLASSES), "chance": 1 / len(FAMILY_PITCH_CLASSES),
        "zero_shot_held_out": topk_accuracy(logits[held], labels[held], 1), "held_out_clips": int(held.sum()),
        "zero_shot_seen": topk_accuracy(logits[~held], labels[~held], 1), "seen_clips": int((~held).sum()),
    }  # fmt: skip
    for combinations in ("held_out", "seen"):
        root = make_synthetic_captions(work / f"captions_{combinations}", n_clips=size["captioned_clips"],
                                       seconds=size["seconds"], seed=seed, combinations=combinations)  # fmt: skip
        captioned = ws.on(load_captions(root))
        every = np.arange(len(captioned.table))  # every clip, whatever its split
        metrics, _ = RETRIEVAL.evaluate(RETRIEVAL.scores(captioned, captioned.embeddings(every), every),
                                        RETRIEVAL.targets(captioned, every))  # fmt: skip
        for key in ("t2a_r1", "a2t_r1", "t2a_random_r1", "a2t_random_r1"):
            figures[f"{combinations}_{key}"] = metrics[key]
    return figures


def ship(run_out: str | Path, dest: str | Path = SHIPPED_DIR) -> Path:
    """Copy OUT/model (+ history.csv as training_log.csv) into the package folder; refuse if a file names the
    run's folder (a path of the machine that trained it)."""
    run_out, dest = Path(run_out), Path(dest)
    for path in (run_out / "model").iterdir():
        if path.suffix in (".json", ".txt") and str(run_out.resolve()) in path.read_text(encoding="utf-8"):
            raise ValueError(f"{path} names the run's folder {run_out.resolve()}: not shipped")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run_out / "model", dest)
    shutil.copy(run_out / "history.csv", dest / "training_log.csv")
    return dest
