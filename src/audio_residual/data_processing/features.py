"""Disk cache of CLAP log-mel input features, reproducible, resumable and memory-mapped.

Layout (`layout.CacheLayout`): `CACHE/features/<config hash>/config.json` records the preprocessing
configuration, and `CACHE/features/<config hash>/<table name>-<table key>/` holds one table's
rows: `input_features.npy` (float32, row i = clip i of the table) and `index.json`, which maps each
filename to its row, file identity, status and `is_longer`. A row counts as cached only when the index
says so and the file identity still matches; the index is rewritten atomically every `checkpoint_every`
clips, so an interrupted run resumes where it stopped.

File identity (`AudioConfig.cache_check`): "content" (default) hashes every file's bytes (BLAKE2b), so a file overwritten
in place is recomputed even when it keeps its size and mtime; it re-reads the audio on every open (about
1 s per GB from the page cache, far below one forward pass). "mtime" trusts size + modification time: no
re-read, but an overwrite that preserves both (`cp -p`, `touch -r`, some sync tools) reuses stale features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from audio_residual.data_processing.audio import (
    MODEL_SAMPLE_RATE,
    BadAudioError,
    load_audio_checked,
)
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.data_processing.datasets import ClipTable
from audio_residual.io import atomic_path, digest, locked, preallocate, update_json
from audio_residual.layout import CacheLayout, FeatureStoreLayout

# 2: fusion clips of ≤ 10 s are stored with is_longer False (LAION's inference rule), no longer the
# extractor's per-call random pick. 3: rand_trunc crops long clips (seeded window) before decoding and
# resampling them; silence is judged after the mono mix and the int16 round trip.
CACHE_FORMAT_VERSION = 3
TRUNCATION_MODES = ("rand_trunc", "fusion")
# Keys of `FeatureExtractor.to_dict()` that name the processor but do not change the features.
_VOLATILE_EXTRACTOR_KEYS = frozenset({"processor_class", "auto_map"})


@dataclass(frozen=True, eq=False)
class CachedFeatures:
    """Features of every clip of a table, row-aligned with it; rows of skipped clips are zero."""

    input_features: np.ndarray  # (N, channels, frames, mel bins) float32, read-only memmap
    is_longer: np.ndarray  # (N,) bool
    valid: np.ndarray  # (N,) bool, False where the audio file was skipped
    skipped: list[tuple[str, str]]  # (filename, reason)
    identities: tuple[str, ...]  # per row: the audio file's identity (content hash or size:mtime)
    config_hash: str  # the preprocessing configuration the rows were computed with
    preprocessing: dict = field(default_factory=dict)  # how they were made: `FeatureCache.preprocessing`
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (filename, reason): used, but suspect

    def digest(self, rows=None) -> str:
        """What the given rows (default: all) are, as the model sees them: preprocessing + file identities."""
        rows = range(len(self.identities)) if rows is None else rows
        return digest([self.config_hash, [self.identities[int(r)] for r in rows]])


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot put {type(value).__name__} into a cache key")


def _write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True, default=_json_default)
        handle.flush()
        os.fsync(handle.fileno())


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


@contextlib.contextmanager
def _seeded_global_numpy_rng(seed: int) -> Iterator[None]:
    """The CLAP extractor draws fusion crops from numpy's global RNG; pin it, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def laion_is_longer(n_samples: int, feature_extractor) -> bool:
    """LAION's inference rule (`get_audio_features`): a clip takes the fusion branch only when its mel
    has more frames than one 10 s chunk; shorter clips use the global mel alone.

    transformers' extractor instead flags one clip per call at random when none is longer, which would
    make a clip's embedding depend on the batch it was extracted with.
    """
    hop = feature_extractor.hop_length
    return n_samples // hop > feature_extractor.nb_max_samples // hop  # frame counts, centred STFT


def _file_identity(path: Path, check: str = "content") -> str | None:
    """`size:blake2b(content)` or `size:mtime_ns` (see the module docstring); None if unreadable."""
    try:
        info = path.stat()
        if check == "mtime":
            return f"{info.st_size}:{info.st_mtime_ns}"
        with path.open("rb") as handle:
            return f"{info.st_size}:{hashlib.file_digest(handle, 'blake2b').hexdigest()[:32]}"
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None


class FeatureCache:
    """Computes `ClapFeatureExtractor` features once per (preprocessing config, file version).

    Truncation and padding default to the extractor's own configuration. With `rand_trunc`, clips
    longer than the extractor's maximum are cropped here at an offset seeded by their filename, so
    the cached features are reproducible instead of depending on numpy's global RNG. `cache` is the cache
    folder (`CacheLayout`); the features go under its `features/`.
    """

    def __init__(
        self,
        cache: str | Path | CacheLayout,
        feature_extractor,
        audio: AudioConfig = AudioConfig(),
        *,
        target_sr: int = MODEL_SAMPLE_RATE,
        truncation: str | None = None,
        padding: str | None = None,
        checkpoint_every: int = 25,
    ) -> None:
        if target_sr != feature_extractor.sampling_rate:
            raise ValueError(
                f"target_sr={target_sr} differs from the extractor's sampling_rate={feature_extractor.sampling_rate}"
            )
        self.feature_extractor = feature_extractor
        self.audio = audio
        self.target_sr = target_sr
        self.truncation = truncation if truncation is not None else feature_extractor.truncation
        self.padding = padding if padding is not None else feature_extractor.padding
        if self.truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {self.truncation!r}")
        self.checkpoint_every = max(1, checkpoint_every)
        extractor_config = {
            key: value
            for key, value in feature_extractor.to_dict().items()
            if not key.startswith("_") and key not in _VOLATILE_EXTRACTOR_KEYS
        }
        self.config = {
            "format_version": CACHE_FORMAT_VERSION,
            "extractor": extractor_config,
            "target_sr": target_sr,
            "int16_roundtrip": audio.int16_roundtrip,
            "min_seconds": audio.min_seconds,
            "truncation": self.truncation,
            "padding": self.padding,
            "recipe": audio.recipe,
        }
        config_json = json.dumps(self.config, sort_keys=True, default=_json_default)
        self.config_hash = hashlib.sha256(config_json.encode()).hexdigest()[:16]
        self.layout = CacheLayout.of(cache)
        self.config_dir = self.layout.feature_config(self.config_hash)

    @property
    def preprocessing(self) -> dict:
        """The preprocessing steps that decide the features, for provenance records."""
        return {
            "sample_rate": self.target_sr,
            "int16_roundtrip": self.audio.int16_roundtrip,
            "truncation": self.truncation,
            "padding": self.padding,
            "min_seconds": self.audio.min_seconds,
            "recipe": self.audio.recipe,
        }

    def store(self, table: ClipTable) -> FeatureStoreLayout:
        """The files of `table`'s rows: one store per (audio folder, ordered filenames)."""
        identity = json.dumps([str(table.audio_dir.resolve()), list(table.filenames)])
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return self.layout.feature_store(self.config_hash, table.name, key)

    def compute(self, table: ClipTable) -> CachedFeatures:
        """Features for every clip of `table`, computing only rows missing from or stale in the cache.

        `audio.workers` > 1 decodes, resamples and extracts in that many processes; rows are written in the
        same order with the same per-file seeds, so the cache is byte-identical to a one-process run. A bad
        file stops the run or is skipped, as `audio.on_bad_file` says.
        """
        on_bad_file, workers = self.audio.on_bad_file, self.audio.workers
        if len(table) == 0:
            raise ValueError(f"table {table.name!r} has no clips")
        store = self.store(table)
        store.root.mkdir(parents=True, exist_ok=True)
        config_path = self.layout.feature_config_file(self.config_hash)
        if not config_path.exists():
            _write_json_atomic(config_path, self.config)
        features_path, index_path = store.features, store.index

        entries = self._read_index(index_path, features_path, len(table))
        identities = [_file_identity(path, self.audio.cache_check) for path in tqdm(
            table.paths(), desc="checking audio files", unit="file", leave=False,
            disable=self.audio.cache_check == "mtime"
        )]
        todo = [
            row
            for row, (filename, identity) in enumerate(zip(table.filenames, identities, strict=True))
            if identity is None or entries.get(filename, {}).get("identity") != identity
        ]
        if todo:
            with locked(features_path):  # two runs on one cache never create two feature files
                features, created = self._open_for_writing(store, len(table))
            if created:
                entries, todo = {}, list(range(len(table)))
            done: set[str] = set()  # rows computed here: the only ones this process vouches for
            clips = self._clips(table.audio_dir, [table.filenames[row] for row in todo], workers)
            try:
                progress = tqdm(clips, total=len(todo), desc=f"CLAP features ({table.name})", unit="clip")
                for n_done, (row, (clip, is_longer, reason, warnings)) in enumerate(zip(todo, progress, strict=True), 1):
                    filename = table.filenames[row]
                    done.add(filename)
                    if reason is not None:
                        features[row] = 0.0
                        entries[filename] = {"row": row, "identity": identities[row], "reason": reason}
                        if on_bad_file == "error":
                            raise BadAudioError(table.audio_dir / filename, reason)
                        continue
                    features[row] = clip
                    entries[filename] = {"row": row, "identity": identities[row], "is_longer": is_longer}
                    if warnings:
                        entries[filename]["warnings"] = warnings
                    if n_done % self.checkpoint_every == 0:
                        self._checkpoint(features, entries, index_path, len(table), done)
            finally:
                clips.close()  # stops the worker pool now, also on an error
                self._checkpoint(features, entries, index_path, len(table), done)
                del features

        skipped = [(name, entries[name]["reason"]) for name in table.filenames if "reason" in entries[name]]
        if skipped and on_bad_file == "error":
            filename, reason = skipped[0]
            raise BadAudioError(table.audio_dir / filename, reason)
        return CachedFeatures(
            input_features=np.load(features_path, mmap_mode="r"),
            is_longer=np.array([entries[name].get("is_longer", False) for name in table.filenames]),
            valid=np.array(["reason" not in entries[name] for name in table.filenames]),
            skipped=skipped,
            identities=tuple(entries[name]["identity"] or "" for name in table.filenames),
            config_hash=self.config_hash,
            preprocessing=self.preprocessing,
            warnings=[
                (name, reason) for name in table.filenames for reason in entries[name].get("warnings", [])
            ],
        )

    def _clip(self, audio_dir: Path, filename: str) -> tuple[np.ndarray | None, bool, str | None, list[str]]:
        """Features, is_longer, None and warnings of one file, or (None, False, reason, []) when it cannot be used."""
        try:
            audio, warnings = load_audio_checked(
                audio_dir / filename, target_sr=self.target_sr, int16_roundtrip=self.audio.int16_roundtrip,
                min_seconds=self.audio.min_seconds, recipe=self.audio.recipe, **self._crop(filename),
            )
        except BadAudioError as err:
            return None, False, err.reason, []
        return (*self._extract(audio, filename), None, warnings)

    def _crop(self, filename: str) -> dict:
        """rand_trunc keeps one 10 s window of a long clip: read only that (seeded by the file name), plus a
        margin; fusion needs the whole clip."""
        if self.truncation != "rand_trunc":
            return {}
        return {"max_seconds": self.feature_extractor.nb_max_samples / self.target_sr, "seed": _stable_seed(filename)}

    def _clips(self, audio_dir: Path, filenames: list[str], workers: int) -> Iterator[tuple]:
        """`_clip` of each file, in order: here, or in a pool of `workers` spawned processes."""
        if workers == 1 or len(filenames) < 2:
            yield from (self._clip(audio_dir, name) for name in filenames)
            return
        # Fork starts a worker in milliseconds (spawn re-imports transformers: seconds). The workers run only
        # numpy and soxr, never torch or CUDA, so the parent's torch threads and CUDA context do not matter.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        initargs = (self, os.getpid())
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs) as pool:
            try:
                yield from pool.map(_worker_clip, [audio_dir] * len(filenames), filenames, chunksize=4)
            finally:
                pool.shutdown(cancel_futures=True)

    def _extract(self, audio: np.ndarray, filename: str) -> tuple[np.ndarray, bool]:
        seed = _stable_seed(filename)
        max_samples = self.feature_extractor.nb_max_samples
        is_longer = audio.size > max_samples
        if self.truncation == "rand_trunc" and is_longer:
            start = int(np.random.default_rng(seed).integers(0, audio.size - max_samples + 1))
            audio = audio[start : start + max_samples]
        with _seeded_global_numpy_rng(seed):
            output = self.feature_extractor(
                audio,
                sampling_rate=self.target_sr,
                truncation=self.truncation,
                padding=self.padding,
                return_tensors="np",
            )
        if self.truncation == "fusion":
            is_longer = laion_is_longer(audio.size, self.feature_extractor)
        return np.asarray(output["input_features"][0], dtype=np.float32), bool(is_longer)

    def _feature_shape(self) -> tuple[int, ...]:
        """Per-clip feature shape, read off the extractor on one second of a quiet tone."""
        t = np.arange(self.target_sr, dtype=np.float32) / self.target_sr
        probe = 0.1 * np.sin(2 * np.pi * 440.0 * t)
        with _seeded_global_numpy_rng(0):
            output = self.feature_extractor(
                probe,
                sampling_rate=self.target_sr,
                truncation=self.truncation,
                padding=self.padding,
                return_tensors="np",
            )
        return tuple(np.asarray(output["input_features"]).shape[1:])

    def _read_index(self, index_path: Path, features_path: Path, n_rows: int) -> dict[str, dict]:
        """Entries of a usable index, or {} when the index or its feature file is missing or mismatched."""
        if not (index_path.is_file() and features_path.is_file()):
            return {}
        index = json.loads(index_path.read_text())
        if index.get("format_version") != CACHE_FORMAT_VERSION or index.get("n_rows") != n_rows:
            return {}
        return index["entries"]

    def _open_for_writing(self, store: FeatureStoreLayout, n_rows: int) -> tuple[np.memmap, bool]:
        """Writable feature rows, and whether the file was (re)created, invalidating any index."""
        features_path = store.features
        if features_path.is_file():
            features = np.load(features_path, mmap_mode="r+")
            if features.shape[0] == n_rows and features.dtype == np.float32:
                del features
                preallocate(features_path, features_path.stat().st_size)  # a sparse file from a full disk
                return np.load(features_path, mmap_mode="r+"), False
            del features
        # Create under a temporary name so a crash cannot leave a feature file with a broken header, and
        # reserve its blocks: writing a memory-mapped page the disk has no room for is a SIGBUS.
        with atomic_path(features_path) as tmp:
            created = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.float32, shape=(n_rows, *self._feature_shape())
            )
            created.flush()
            del created
            try:
                preallocate(tmp, tmp.stat().st_size)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(features_path)) from None
        store.index.unlink(missing_ok=True)
        return np.load(features_path, mmap_mode="r+"), True

    def _checkpoint(
        self, features: np.memmap, entries: dict, index_path: Path, n_rows: int, done: set[str] = frozenset()
    ) -> None:
        """Flush feature rows before the index that vouches for them; merged under a lock with the index on
        disk, so rows another process on the same cache computed meanwhile stay vouched for."""
        features.flush()
        ours = {"format_version": CACHE_FORMAT_VERSION, "n_rows": n_rows, "entries": entries}

        def merge(current: dict | None) -> dict:
            if not current or {k: current.get(k) for k in ("format_version", "n_rows")} != {
                "format_version": CACHE_FORMAT_VERSION, "n_rows": n_rows
            }:
                return ours
            return {**ours, "entries": {**current.get("entries", {}), **{name: entries[name] for name in done}}}

        update_json(index_path, merge, write=_write_json_atomic)


_WORKER_CACHE: FeatureCache | None = None  # the cache a pool worker extracts for (set once per process)


def _init_worker(cache: FeatureCache, parent: int | None = None) -> None:
    """One BLAS thread per worker: the workers already fill the cores, more threads would only contend.
    A worker exits when its parent dies (`exit_with_parent`), instead of holding its memory forever."""
    global _WORKER_CACHE
    _WORKER_CACHE = cache
    threadpool_limits(1)
    if parent is not None:
        exit_with_parent(parent)


def exit_with_parent(parent: int, period: float = 0.5) -> None:
    """End this process soon after process `parent` is gone (killed with -9 included): a daemon thread
    watches the parent pid, which changes when the orphan is re-parented. Portable, unlike prctl."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker_clip(audio_dir: Path, filename: str) -> tuple[np.ndarray | None, bool, str | None, list[str]]:
    return _WORKER_CACHE._clip(audio_dir, filename)
