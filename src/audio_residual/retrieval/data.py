"""Captioned audio as retrieval sees it: official splits of (clips, captions), CLAP's embeddings and tokens.

`RetrievalData` is the retrieval counterpart of the classification `Workspace`: a `CaptionTable`, the CLAP
bundle and the cached features of its clips (the cache a labelled dataset of the same files shares). A
split is its usable clips, every caption of them, and for each caption the clip it describes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from audio_residual.clap.batches import batches
from audio_residual.clap.encode import audio_embeddings, encode_audio
from audio_residual.clap.loading import ClapBundle, load_clap
from audio_residual.data_processing.captions import CaptionTable, load_captions
from audio_residual.data_processing.features import CachedFeatures, FeatureCache
from audio_residual.io import digest
from audio_residual.retrieval.text_encoders import TextEncoder, clap_text_encoder


@dataclass(frozen=True)
class CaptionSplit:
    """One official split: table rows of its usable clips, their captions, and each caption's clip position."""

    name: str
    rows: np.ndarray
    texts: tuple[str, ...]
    caption_clip: np.ndarray

    def captions_of(self) -> list[np.ndarray]:
        """Per clip position, the indices of its captions."""
        order = np.argsort(self.caption_clip, kind="stable")
        bounds = np.searchsorted(self.caption_clip[order], np.arange(len(self.rows) + 1))
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def caption_split(table: CaptionTable, valid: np.ndarray, name: str) -> CaptionSplit:
    """The split `name` without the clips whose audio was skipped; a ValueError if none is left."""
    rows = table.rows(name)
    usable = rows[valid[rows]]
    if len(usable) == 0:
        skipped = f" ({len(rows)} skipped as bad audio)" if len(rows) else ""
        raise ValueError(f"{table.name}: the {name} split has no clips{skipped}; retrieval needs train, "
                         "validation and test clips")
    texts, owner = table.caption_pairs(usable)
    return CaptionSplit(name, usable, tuple(texts), owner)


def duplicate_audio(table: CaptionTable, features: CachedFeatures) -> tuple[tuple[str, str], ...]:
    """Pairs of files with identical content (the cache's content hash) within one split; the same audio in
    two splits is a ValueError naming both files: test clips would be trained on."""
    first: dict[str, int] = {}
    within = []
    for row in np.flatnonzero(features.valid):
        identity = features.identities[row]
        if not identity:
            continue
        other = first.setdefault(identity, int(row))
        if other == row:
            continue
        a, b = table.filenames[other], table.filenames[row]
        if table.splits[other] != table.splits[row]:
            raise ValueError(f"{table.name}: {a!r} ({table.splits[other]}) and {b!r} ({table.splits[row]}) are the "
                             "same audio: a clip in two splits leaks between training and test; remove one")
        within.append((a, b))
    return tuple(within)


def tokenizer_words(table: CaptionTable) -> tuple[str, ...]:
    """The captions' words: what the offline random tiny model trains its tokenizer on."""
    return tuple(sorted({w for caps in table.captions for c in caps for w in c.lower().split()}))


@dataclass
class AudioSource:
    """Clips as CLAP sees them: a bundle and cached features. Methods embed through it, so an adapted
    model scores a labelled set (retention) the same way it scores the captioned one."""

    bundle: ClapBundle
    features: CachedFeatures
    batch_size: int = 32

    def text_encoder(self) -> TextEncoder:
        return clap_text_encoder(self.bundle)

    def model_batches(self, rows: np.ndarray, desc: str | None = None):
        f = self.features
        return batches(f.input_features, rows, self.batch_size, self.bundle.device, f.is_longer, None, desc)

    @torch.no_grad()
    def audio_embeddings(self, rows: np.ndarray, residual=None, model=None, desc: str | None = None) -> torch.Tensor:
        """(n, D) unit CLAP embeddings of the rows; with `residual` attached, or through another `model`
        holding `audio_model` and `audio_projection` (LoRA, fine-tuned)."""
        model = self.bundle.model if model is None else model
        out = []
        for _, x, longer in self.model_batches(rows, desc):
            attach = residual.attached(self.bundle.model) if residual is not None else contextlib.nullcontext()
            with self.bundle.autocast(), attach:
                out.append(audio_embeddings(model, x, longer).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def frame_tokens(self, rows: np.ndarray, desc: str | None = None) -> torch.Tensor:
        """(n, T, D) the final HTSAT tokens averaged over frequency (one per time frame), each through CLAP's
        frozen audio projection: TAP's keys and values. Their plain mean is the pooled output before projection."""
        model, out = self.bundle.model, []
        for _, x, longer in self.model_batches(rows, desc):
            with self.bundle.autocast():
                frames = encode_audio(model, x, longer).token_map().mean(2).transpose(1, 2)  # (n, T, C)
                out.append(model.audio_projection(frames).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def pooled_outputs(self, rows: np.ndarray) -> torch.Tensor:
        """(n, C) the encoder's pooled output before CLAP's projection (a linear projection's other source)."""
        out = []
        for _, x, longer in self.model_batches(rows):
            with self.bundle.autocast():
                out.append(encode_audio(self.bundle.model, x, longer).pooled.float().cpu())
        return torch.cat(out)


@dataclass
class RetrievalData(AudioSource):
    """A `CaptionTable` with its bundle and cached features: the retrieval counterpart of `Workspace`."""

    table: CaptionTable | None = None
    duplicates: tuple[tuple[str, str], ...] = ()  # same audio under two names within one split (counted)
    cache_dir: Path = Path("cache")  # the feature cache root (fine-tuning's `pretrain` shares it)

    @classmethod
    def open(cls, data: str | Path, model: str | Path, cache_dir: str | Path = "cache", device: str = "auto",
             amp: str = "auto", on_bad_file: str = "error", batch_size: int = 32) -> RetrievalData:
        table = load_captions(data, export_root=Path("data") / "hf")
        bundle = load_clap(model, device=device, amp=amp, class_names=tokenizer_words(table))
        cache = FeatureCache(Path(cache_dir), bundle.feature_extractor)
        features = cache.compute(table, on_bad_file=on_bad_file)
        return cls(bundle, features, batch_size, table, duplicate_audio(table, features), Path(cache_dir))

    def split(self, name: str) -> CaptionSplit:
        return caption_split(self.table, self.features.valid, name)

    def identity(self) -> dict:
        """What a stored retrieval result depends on besides the method: model, audio as seen, captions, splits."""
        return {
            "model": self.bundle.provenance,
            "features": self.features.digest(),
            "captions": digest([self.table.filenames, self.table.captions, self.table.splits]),
            "valid": digest(self.features.valid.tolist()),
        }

    def key(self, procedure: dict) -> str:
        return digest({"data": self.identity(), "procedure": procedure})
