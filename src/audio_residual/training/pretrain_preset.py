"""Named pretraining runs: `--preset tiny` is the run whose result ships as `--model tiny`.

It generates captioned audio (`synthetic_captions`), trains the tiny configuration from scratch on one torch
thread (toy-sized ops: more threads only contend, several times slower on a loaded CPU) and writes OUT/model.
`ship` copies a result into the package with the command, seed and training log beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.training.pretrain import PretrainConfig

PRESETS = {
    "tiny": {
        "clips": 400,
        "captions_per_clip": 5,
        "seconds": 2.0,
        "split_fractions": (0.9, 0.05, 0.05),
        "config": PretrainConfig(epochs=24, batch_size=16, lr=2e-3, weight_decay=0.01, warmup=0.05, all_captions=True),
    }
}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "clap" / "pretrained_tiny"


def run_preset(name: str, out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Generate the preset's data (seeded by `seed`), pretrain, return OUT/model."""
    from audio_residual.data_processing.captions import load_captions
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
    from audio_residual.training.pretrain_run import PretrainRun, PretrainSource, pretrain

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
        )  # fmt: skip
        extra = {"preset": name, "command": f"audio-residual pretrain --preset {name} --seed {seed} --out {out}",
                 "generated_data": {k: v for k, v in preset.items() if k != "config"} | {"seed": seed}}  # fmt: skip
        run = PretrainRun(out, cache_dir=out / "cache", audio=AudioConfig(workers=2), device=device, wandb="disabled",
                          extra_provenance=extra)
        return pretrain(load_captions(data), PretrainSource("tiny"), config, run)
    finally:
        torch.set_num_threads(threads)


def ship(run_out: str | Path, dest: str | Path = SHIPPED_DIR, log: str | Path | None = None) -> Path:
    """Copy OUT/model (+ history.csv as training_log.csv, and a console log) into the package folder."""
    run_out, dest = Path(run_out), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run_out / "model", dest)
    shutil.copy(run_out / "history.csv", dest / "training_log.csv")
    if log is not None:
        shutil.copy(log, dest / "training_console.log")
    return dest
