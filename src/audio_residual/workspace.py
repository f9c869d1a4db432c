"""The workspace: a dataset, the CLAP model and the cached features of its clips — what every step works on.

    ws = Workspace.open("data/ESC-50-master", model="laion/clap-htsat-unfused")
    ws.features.input_features[ws.valid_indices()]   # memory-mapped log-mels
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from audio_residual.clap.batches import Batch, batches, model_inputs
from audio_residual.clap.encode import AudioEncoding, encode_audio
from audio_residual.clap.loading import DEFAULT_MODEL, ClapBundle, load_clap
from audio_residual.clap.zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier, check_template
from audio_residual.data_processing import (
    CachedFeatures,
    ClipTable,
    FeatureCache,
    Split,
    ensure_esc50,
    load_csv_dataset,
    load_dataset,
    official_splits,
)
from audio_residual.data_processing.hf import is_hf_source, load_hf_dataset
from audio_residual.data_processing.recipes import LAION_TRAINING
from audio_residual.io import digest
from audio_residual.layout import CacheLayout

DEFAULT_CACHE = Path("cache")


def resolve_dataset(
    data: str | Path, download_dir: Path = Path("data"), csv: str | Path | None = None
) -> ClipTable:
    """`esc50` means the official ESC-50 (downloaded into `download_dir` once); `hf:OWNER/NAME[:config]` or a
    `save_to_disk` folder is a Hugging Face dataset (audio exported under `download_dir/hf`); else a folder.

    With `csv`, the folder holds the audio and `csv` lists it as `filename,label,fold` (filenames
    relative to the folder).
    """
    if csv is not None:
        if not Path(data).is_dir():
            raise FileNotFoundError(f"audio folder not found: {data} (--data with --csv names the audio folder)")
        return load_csv_dataset(Path(data), csv)
    if str(data).lower() in ("esc50", "esc-50"):
        return load_dataset(ensure_esc50(cache_dir=download_dir))
    if is_hf_source(data):
        return load_hf_dataset(data, export_root=download_dir / "hf")
    return load_dataset(Path(data))


def check_folds_usable(table: ClipTable, features: CachedFeatures) -> None:
    """Refuse a fold left without clips by skipped files: its metrics would be NaN and training would see nothing."""
    for fold in table.fold_ids:
        rows = table.folds == fold
        if not features.valid[rows].any():
            raise ValueError(
                f"fold {fold} of {table.name!r} has no usable clips: all {int(rows.sum())} were skipped as bad "
                f"files (first: {features.skipped[0][0]}: {features.skipped[0][1]}); fix them or drop the fold"
            )


@dataclass
class Workspace:
    table: ClipTable
    bundle: ClapBundle
    features: CachedFeatures
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    _classifier: ZeroShotClassifier | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        data: str | Path,
        model: str | Path = DEFAULT_MODEL,
        cache_dir: str | Path = DEFAULT_CACHE,
        device: str = "auto",
        amp: str = "auto",
        on_bad_file: str = "error",
        int16_roundtrip: bool = True,
        templates: tuple[str, ...] = DEFAULT_TEMPLATES,
        csv: str | Path | None = None,
        cache_check: str = "content",
        revision: str | None = None,
        min_seconds: float = 1.0,
        feature_workers: int = 1,
        other_class_names: tuple[str, ...] = (),
        text_config: str | Path | None = None,
        recipe: str = LAION_TRAINING,
    ) -> Workspace:
        """`other_class_names`: classes of other datasets the model will also score (zero-shot transfer);
        the offline tiny model builds its tokenizer from every name it will see, a real model ignores them.
        `text_config`: the RoBERTa-base folder a LAION `.pt` needs offline (converted into cache_dir/models);
        `recipe`: LAION's training-data audio path or its filelist helper's (`data_processing/recipes.py`)."""
        templates = tuple(check_template(t) for t in templates)  # before any slow step
        table = resolve_dataset(data, csv=csv)
        names = tuple(dict.fromkeys((*table.class_names, *other_class_names)))
        bundle = load_clap(model, device=device, amp=amp, class_names=names, revision=revision,
                           text_config=text_config, cache_dir=CacheLayout.of(cache_dir).converted_models)
        cache = FeatureCache(
            cache_dir, bundle.feature_extractor, int16_roundtrip=int16_roundtrip,
            min_seconds=min_seconds, check=cache_check, recipe=recipe,
        )
        features = cache.compute(table, on_bad_file=on_bad_file, workers=feature_workers)
        check_folds_usable(table, features)
        return cls(table, bundle, features, templates)

    @property
    def classifier(self) -> ZeroShotClassifier:
        if self._classifier is None:
            self._classifier = ZeroShotClassifier(self.bundle, self.table.class_names, self.templates)
        return self._classifier

    def identity(self, rows: np.ndarray | None = None) -> dict:
        """What results computed on the given rows (default: all) depend on, besides the method's options.

        The data as the model sees it (preprocessing and each audio file's identity), labels and folds, the
        model and the prompt templates. Two runs share stored results only when this and the options agree.
        """
        rows = np.arange(len(self.table)) if rows is None else np.sort(np.asarray(rows))
        table = self.table
        return {
            "model": self.bundle.provenance,
            "features": self.features.digest(rows),
            "labels": digest([table.class_names, table.labels[rows].tolist(), table.folds[rows].tolist()]),
            "valid": digest(self.features.valid[rows].tolist()),
            "templates": list(self.templates),
        }

    def key(self, procedure: dict) -> str:
        """The key of results produced by `procedure` (a method and its options) on this workspace's data."""
        return digest({"data": self.identity(), "procedure": procedure})

    def provenance(self) -> dict:
        """Weights, preprocessing recipe, prompt templates and dataset: what a stored result depends on."""
        return {
            **self.bundle.provenance,
            **self.features.recipe,
            "templates": list(self.templates),
            "dataset": self.table.name,
        }

    def valid_indices(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The given rows (default: all) minus the files that were skipped as bad input."""
        rows = np.arange(len(self.table)) if indices is None else np.asarray(indices)
        return rows[self.features.valid[rows]]

    def splits(self, val_fraction: float = 0.0, seed: int = 0) -> list[Split]:
        """Official folds, with skipped files removed from every index set."""
        return [
            Split(s.fold, self.valid_indices(s.train), self.valid_indices(s.test), self.valid_indices(s.val))
            for s in official_splits(self.table, val_fraction=val_fraction, seed=seed)
        ]

    def split(self, fold: int, val_fraction: float = 0.0, seed: int = 0) -> Split:
        """The official split whose test fold is `fold` (an error listing the folds if there is none)."""
        for split in self.splits(val_fraction, seed):
            if split.fold == fold:
                return split
        raise ValueError(f"no fold {fold} in {self.table.name!r}: folds are {list(self.table.fold_ids)}")

    def batch(self, rows: np.ndarray):
        """Model inputs of the given rows on the model's device: (input_features, is_longer (n, 1))."""
        return model_inputs(self.features.input_features, rows, self.bundle.device, self.features.is_longer)

    def batches(self, rows, batch_size: int, shuffle_generator=None, desc: str | None = None) -> Iterator[Batch]:
        """(rows, input_features, is_longer) batches of the given rows on the model's device (see `batches`)."""
        f = self.features
        return batches(f.input_features, rows, batch_size, self.bundle.device, f.is_longer, shuffle_generator, desc)

    def encode(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> AudioEncoding:
        """Frame tokens, pooled output and embedding of one batch from `batches` (differentiable)."""
        return encode_audio(self.bundle.model, input_features, is_longer)

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """Audio embeddings of one batch from `batches` (differentiable: ResiDual's hooks act here)."""
        return self.encode(input_features, is_longer).embedding

    def embed(self, indices: np.ndarray, batch_size: int = 32, desc: str = "audio embeddings"):
        f = self.features
        return self.classifier.embed(f.input_features, indices, f.is_longer, batch_size=batch_size, desc=desc)
