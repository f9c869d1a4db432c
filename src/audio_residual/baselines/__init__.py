"""Baselines against which ResiDual is compared: linear probe, contrastive adapter, full fine-tuning."""

from audio_residual.baselines.finetune import AudioClassifier, FineTuned, finetune_audio_encoder
from audio_residual.baselines.linear import (
    ContrastiveAdapter,
    LinearProbe,
    symmetric_infonce,
    train_contrastive_adapter,
    train_linear_probe,
)

__all__ = [
    "AudioClassifier",
    "ContrastiveAdapter",
    "FineTuned",
    "LinearProbe",
    "finetune_audio_encoder",
    "symmetric_infonce",
    "train_contrastive_adapter",
    "train_linear_probe",
]
