"""Setup of notebook 4 (retrieval): the real study on Clotho, or a smoke run on generated captions (CI).

    from audio_residual.retrieval.notebook import retrieval_setup
    nb = retrieval_setup()   # AUDIO_RESIDUAL_SMOKE=1: tiny CLAP on generated captioned audio, offline
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from audio_residual.notebook import SMOKE_ENV
from audio_residual.retrieval.study import RetrievalStudyConfig


@dataclass
class RetrievalSetup:
    smoke: bool
    data: str | Path
    model: str
    cache: Path
    out: Path
    config: RetrievalStudyConfig
    retention: str | Path | None  # a labelled dataset for the retention check


def retrieval_setup(smoke: bool | None = None, root: str | Path = "runs") -> RetrievalSetup:
    """Clotho (`data/clotho`, official layout) with `laion/clap-htsat-unfused`, or the smoke run."""
    smoke = os.environ.get(SMOKE_ENV) == "1" if smoke is None else smoke
    root = Path(root)
    if smoke:
        from audio_residual.data_processing import make_synthetic_esc50
        from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

        out = root / "smoke_retrieval"
        data = make_synthetic_captions(out / "data", n_clips=24, captions_per_clip=3, seconds=1.0, seed=0,
                                       split_fractions=(0.5, 0.25, 0.25))
        labelled = make_synthetic_esc50(out / "labelled", n_classes=2, clips_per_class=3, n_folds=3, seconds=1.0)
        config = RetrievalStudyConfig(epochs=1, batch_size=4, examples=2)
        return RetrievalSetup(True, data, "tiny", out / "cache", out / "study", config, labelled)
    return RetrievalSetup(False, Path("data") / "clotho", "laion/clap-htsat-unfused", Path("cache"),
                          root / "clotho_retrieval", RetrievalStudyConfig(), "esc50")
