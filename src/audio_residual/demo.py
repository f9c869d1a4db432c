"""The offline demo: the whole study (`audio_residual.study`) on generated data with the tiny random CLAP.

It needs no network and no GPU; on a 2-core CPU it takes a few minutes. The same steps run on the real
model and ESC-50 with `audio-residual experiment` (see README).
"""

from __future__ import annotations

from pathlib import Path

from audio_residual.data_processing import make_synthetic_esc50
from audio_residual.layout import RunLayout
from audio_residual.study import run_study
from audio_residual.workspace import Workspace

DEMO_GRID = {"granularity": ["layer", "head"], "lr": [0.1, 0.3], "epochs": [10], "fold": [1, 2, 3, 4, 5]}
DEMO_BASE = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"}


def run_demo(out: str | Path, n_classes: int = 5, clips_per_class: int = 10, seed: int = 0) -> Path:
    """Generate data, run every step, write `out/report.md` (+ results.csv, heads.csv, figures)."""
    out = Path(out)
    data = make_synthetic_esc50(out / "data", n_classes=n_classes, clips_per_class=clips_per_class, seed=seed)
    ws = Workspace.open(data, model="tiny", cache_dir=out / "cache", device="cpu")
    run_study(ws, out, DEMO_GRID, DEMO_BASE, finetune_epochs=1, analysis_options={"pattern_cap": 128})
    return RunLayout.of(out).report
