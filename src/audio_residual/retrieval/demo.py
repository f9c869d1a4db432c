"""The offline demo's retrieval section: the retrieval study on generated captioned audio with the tiny CLAP."""

from __future__ import annotations

from pathlib import Path

from audio_residual.data_processing import load_dataset
from audio_residual.data_processing.features import FeatureCache
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
from audio_residual.io import write_text
from audio_residual.retrieval.data import AudioSource, RetrievalData
from audio_residual.retrieval.study import RetrievalStudyConfig, markdown, run_retrieval_study

DEMO_RETRIEVAL = RetrievalStudyConfig(
    epochs=5, batch_size=8, examples=2,
    lr={"residual": 0.1, "projection": 1e-3, "tap": 1e-3, "lora": 1e-3, "finetune": 1e-4},
)
DEMO_COLUMNS = ["method", "direction", "r1", "r5", "map10", "random_r1", "trainable_params", "seconds", "best_epoch"]


def run_retrieval_demo(out: Path, labelled: Path, seed: int = 0, n_clips: int = 80) -> str:
    """Run the retrieval study under `out/retrieval` (retention on the labelled demo data); its report section.

    A fifth of the clips each for validation and test, so that R@1 and R@5 of the test table can differ."""
    captions = make_synthetic_captions(out / "captions_data", n_clips=n_clips, captions_per_clip=5, seed=seed,
                                       split_fractions=(0.6, 0.2, 0.2))
    data = RetrievalData.open(captions, "tiny", cache_dir=out / "cache", device="cpu", batch_size=8)
    table = load_dataset(labelled)
    features = FeatureCache(out / "cache", data.bundle.feature_extractor).compute(table)
    outcome = run_retrieval_study(data, out / "retrieval", DEMO_RETRIEVAL, (AudioSource(data.bundle, features), table))
    return "\n\n".join([
        "## Retrieval (generated captioned audio, tiny CLAP)",
        f"{n_clips} generated clips with 5 captions each, official-style splits {data.table.counts()}; every "
        "method chosen on validation (epoch 0 included) and scored on test. Full study: `retrieval/report.md`.",
        markdown(outcome.table, DEMO_COLUMNS),
        "Retention (zero-shot classification of the demo's labelled clips by each adapted encoder):",
        markdown(outcome.retention, ["method", "accuracy", "chance"]),
    ])


def append_section(report: Path, section: str) -> Path:
    return write_text(report, report.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + section + "\n")
