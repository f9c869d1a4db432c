"""Training: the one loop, ResiDual's λ training for any task, encoder training steps, ResiDual's grid, CLAP
pretraining, checkpoints and W&B tracking."""

from audio_residual.training.loop import TrainingDiverged
from audio_residual.training.tracking import RunTracker, wandb_available
from audio_residual.training.trainer import FoldResult, TrainConfig, train_residual_fold

__all__ = ["FoldResult", "RunTracker", "TrainConfig", "TrainingDiverged", "train_residual_fold", "wandb_available"]
