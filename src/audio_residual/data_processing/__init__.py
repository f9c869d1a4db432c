"""Data layer: dataset tables, audio loading, the CLAP feature cache, folds, download and synthetic data."""

from audio_residual.data_processing.audio import (
    BAD_FILE_POLICIES,
    MODEL_SAMPLE_RATE,
    BadAudioError,
    load_audio,
    load_many,
)
from audio_residual.data_processing.datasets import (
    ClipTable,
    DatasetError,
    check_esc50_complete,
    load_csv_dataset,
    load_dataset,
    load_esc50,
    load_gtzan,
    load_urbansound8k,
    stratified_folds,
)
from audio_residual.data_processing.download import (
    ESC50_URL,
    DownloadError,
    download_file,
    ensure_esc50,
    safe_extract,
)
from audio_residual.data_processing.features import CachedFeatures, FeatureCache
from audio_residual.data_processing.folds import Split, carve_validation, few_shot_splits, official_splits
from audio_residual.data_processing.synthetic import make_synthetic_esc50

__all__ = [
    "BAD_FILE_POLICIES",
    "ESC50_URL",
    "MODEL_SAMPLE_RATE",
    "BadAudioError",
    "CachedFeatures",
    "ClipTable",
    "DatasetError",
    "DownloadError",
    "FeatureCache",
    "Split",
    "carve_validation",
    "check_esc50_complete",
    "download_file",
    "ensure_esc50",
    "few_shot_splits",
    "load_audio",
    "load_csv_dataset",
    "load_dataset",
    "load_esc50",
    "load_gtzan",
    "load_many",
    "load_urbansound8k",
    "make_synthetic_esc50",
    "official_splits",
    "safe_extract",
    "stratified_folds",
]
