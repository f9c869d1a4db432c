"""How a command's clips become CLAP inputs, as one frozen value that reaches every clip the command embeds.

    audio = AudioConfig(recipe="laion-filelist", min_seconds=0.5)
    ws = Workspace.open("esc50", model, audio)      # the study's clips
    target = ws.on("data/us8k")                     # transfer targets and retention sets: the same audio path

Options are never passed field by field from one cache to the next, so none can be dropped on the way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from audio_residual.data_processing.audio import check_bad_file_policy
from audio_residual.data_processing.recipes import LAION_TRAINING, check_recipe

CHECK_MODES = ("content", "mtime")


@dataclass(frozen=True)
class AudioConfig:
    """`recipe`: LAION's training-data audio path or its filelist helper's (`recipes.py`); `int16_roundtrip`:
    LAION's quantisation; `min_seconds`: shorter clips are bad files; `cache_check`: how the feature cache
    recognises an unchanged file (content hash or size + mtime); `workers`: extraction processes;
    `on_bad_file`: stop the run ("error") or leave the clip out, counted and listed ("skip")."""

    recipe: str = LAION_TRAINING
    int16_roundtrip: bool = True
    min_seconds: float = 1.0
    cache_check: str = "content"
    workers: int = 1
    on_bad_file: str = "error"

    def __post_init__(self) -> None:
        check_recipe(self.recipe)
        check_bad_file_policy(self.on_bad_file)
        if self.cache_check not in CHECK_MODES:
            raise ValueError(f"cache check must be one of {CHECK_MODES}, got {self.cache_check!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")
        if not self.min_seconds >= 0:
            raise ValueError(f"min_seconds must be ≥ 0, got {self.min_seconds}")

    def describe(self) -> dict:
        """Every field, for provenance (`workers` and `cache_check` do not change a feature, but say how)."""
        return asdict(self)
