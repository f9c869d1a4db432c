"""The algorithms of the baselines against which ResiDual is compared: linear probe, contrastive adapter,
Tip-Adapter(-F), CoOp, LoRA and full fine-tuning (each wrapped as a registered method in `methods`)."""

from audio_residual.baselines.contrastive_adapter import (
    ContrastiveAdapter,
    symmetric_infonce,
    train_contrastive_adapter,
)
from audio_residual.baselines.finetune import AudioClassifier, FineTuned, finetune_audio_encoder
from audio_residual.baselines.lora import LoraAudioClassifier, LoraTuned, train_lora
from audio_residual.baselines.probe import LogisticProbe, train_logistic_probe
from audio_residual.baselines.prompt_learning import CoOp, PromptLearner, train_coop
from audio_residual.baselines.tip_adapter import TipAdapter, train_tip_adapter, train_tip_adapter_f

__all__ = [
    "AudioClassifier",
    "CoOp",
    "ContrastiveAdapter",
    "FineTuned",
    "LogisticProbe",
    "LoraAudioClassifier",
    "LoraTuned",
    "PromptLearner",
    "TipAdapter",
    "finetune_audio_encoder",
    "symmetric_infonce",
    "train_contrastive_adapter",
    "train_coop",
    "train_logistic_probe",
    "train_lora",
    "train_tip_adapter",
    "train_tip_adapter_f",
]
