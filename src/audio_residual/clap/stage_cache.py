"""Stage-prefix cache: the input of Swin stage s, computed once per clip, and a forward that starts there.

When λ sits only in stages ≥ s, the mel front end and stages 0..s−1 are frozen and deterministic, so every
epoch would recompute the same stage-s input. `StagePrefix` stores it (float32 memmap, resumable) in the
feature store it came from (`FeatureStoreLayout.stage_prefix`), keyed by the model, the precision and the
features' audio and preprocessing, so every run of a sweep (any fold, any configuration with the same first λ
stage) shares it. `encode` runs stages s.. and the encoder tail on it (`clap.encode.encode_from_stage`): the
same modules on the same tensor as the full forward, so the outputs are the same, and hook points of stages
≥ s (ResiDual, statistics) fire as usual.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from audio_residual.clap.batches import Batch, batches, model_inputs
from audio_residual.clap.encode import AudioEncoding, encode_from_stage, stage_input
from audio_residual.io import atomic_path, digest, write_json
from audio_residual.layout import FeatureStoreLayout, StagePrefixLayout

PREFIX_FORMAT_VERSION = 1


def first_stage(stages) -> int:
    """The first stage that carries λ, or 0 when every stage does (`stages` None)."""
    return 0 if stages is None else min(int(s) for s in stages)


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive lock while one process fills the cache (W&B agents on one machine share it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class StagePrefix:
    """Stage-`stage` inputs of a workspace's valid clips (row-aligned with its table)."""

    def __init__(self, ws, stage: int, batch_size: int = 32):
        self.exp, self.stage = ws, int(stage)
        self.model, self.device = ws.bundle.model, ws.bundle.device
        self.hidden, self.dtype = self._build(batch_size)

    def layout(self) -> StagePrefixLayout | None:
        """Where the prefix lives in the feature store, or None when the features are not a cached file
        (it is kept in memory then)."""
        filename = getattr(self.exp.features.input_features, "filename", None)
        if filename is None:
            return None
        identity = [self.exp.bundle.model_id, str(self.exp.bundle.amp_dtype), self.device.type, self.exp.features.digest()]
        return FeatureStoreLayout.holding(filename).stage_prefix(digest(identity))

    def _build(self, batch_size: int) -> tuple[np.ndarray, torch.dtype]:
        rows = self.exp.valid_indices()
        layout = self.layout()
        if layout is None:
            return self._fill(None, None, rows, 0, batch_size)
        path, meta_path = layout.hidden(self.stage), layout.progress(self.stage)
        with _locked(layout.lock(self.stage)):
            meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else {}
            done = meta.get("rows_done", 0) if meta.get("format_version") == PREFIX_FORMAT_VERSION else 0
            if done < len(rows):
                self._fill(path, meta_path, rows, done, batch_size)
            meta = json.loads(meta_path.read_text())
        return np.load(path, mmap_mode="r"), getattr(torch, meta["dtype"])

    @torch.no_grad()
    def _fill(self, path, meta_path, rows, done, batch_size) -> tuple[np.ndarray, torch.dtype]:
        """Compute rows[done:] in batches; on disk, record progress after every flushed batch (resumable)."""
        features, is_longer = self.exp.features.input_features, self.exp.features.is_longer
        x, longer = model_inputs(features, rows[:1], self.device, is_longer)
        shape = tuple(stage_input(self.model, x, self.stage, longer).shape[1:])
        if path is None:
            store = np.zeros((len(features), *shape), dtype=np.float32)
        elif done == 0:
            with atomic_path(path) as tmp:
                np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(features), *shape)).flush()
            store = np.load(path, mmap_mode="r+")
        else:
            store = np.load(path, mmap_mode="r+")
        dtype, filled = torch.float32, done
        for batch, x, longer in batches(features, rows[done:], batch_size, self.device, is_longer,
                                        desc=f"stage-{self.stage} prefix"):
            with self.exp.bundle.autocast():
                hidden = stage_input(self.model, x, self.stage, longer)
            dtype, filled = hidden.dtype, filled + len(batch)
            store[batch] = hidden.float().cpu().numpy()
            if path is not None:
                store.flush()
                write_json(meta_path, {"format_version": PREFIX_FORMAT_VERSION, "stage": self.stage,
                                       "rows_done": filled, "dtype": str(dtype).split(".")[1]})
        return store, dtype

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, None]:
        """Cached stage inputs of the given rows on the model's device, as `Workspace.batch` (no fusion flags)."""
        return model_inputs(self.hidden, rows, self.device, None)

    def batches(self, rows, batch_size: int, shuffle_generator=None, desc: str | None = None) -> Iterator[Batch]:
        """(rows, cached stage inputs (float32), None) batches on the model's device, as `Workspace.batches`."""
        return batches(self.hidden, rows, batch_size, self.device, None, shuffle_generator, desc)

    def encode(self, hidden: torch.Tensor, is_longer: torch.Tensor | None = None) -> AudioEncoding:
        """Tokens, pooled output and embedding of a batch of cached stage inputs, run in the dtype the model
        produced them in (differentiable through λ hooks); `is_longer` only mattered before the cached stage."""
        return encode_from_stage(self.model, hidden.to(self.dtype), self.stage)

    def forward(self, hidden: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """Audio embeddings of a batch of cached stage inputs (as `Workspace.forward` from log-mels)."""
        return self.encode(hidden, is_longer).embedding
