"""The workspace: a dataset, the CLAP model and the cached features of its clips — what every step works on.

    ws = Workspace.open("data/ESC-50-master", ModelSource("laion/clap-htsat-unfused"), AudioConfig())
    ws.features.input_features[ws.valid_indices()]   # memory-mapped log-mels
    target = ws.on("data/UrbanSound8K")               # another dataset, same model and audio configuration

One workspace serves every task: a labelled `ClipTable` (classification: folds, class prompts) or a
`CaptionTable` (retrieval, pretraining: official splits, captions). Every command builds its data through
`open` and every other dataset it scores through `on`, so an option given once (`AudioConfig`, the model
source) reaches every clip the command embeds, and `provenance` says so.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from audio_residual.clap.batches import Batch, batches, model_inputs
from audio_residual.clap.encode import AudioEncoding, audio_embeddings, encode_audio
from audio_residual.clap.loading import ClapBundle, ModelSource
from audio_residual.clap.zeroshot import (
    DEFAULT_TEMPLATES,
    ZeroShotClassifier,
    check_template,
    text_embeddings,
)
from audio_residual.data_processing import CachedFeatures, ClipTable, FeatureCache, Split, official_splits
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.data_processing.captions import CaptionTable
from audio_residual.data_processing.sources import load_table
from audio_residual.io import digest
from audio_residual.layout import CacheLayout

DEFAULT_CACHE = Path("cache")
OFFICIAL_SPLIT = 0  # the `fold` of captioned audio's one official train / validation / test split
CAPTION_SPLITS = ("train", "validation", "test")


def check_folds_usable(table: ClipTable, features: CachedFeatures) -> None:
    """Refuse a fold left without clips by skipped files: its metrics would be NaN and training would see nothing."""
    for fold in table.fold_ids:
        rows = table.folds == fold
        if not features.valid[rows].any():
            raise ValueError(
                f"fold {fold} of {table.name!r} has no usable clips: all {int(rows.sum())} were skipped as bad "
                f"files (first: {features.skipped[0][0]}: {features.skipped[0][1]}); fix them or drop the fold"
            )


def audio_identities(table: ClipTable | CaptionTable, features: CachedFeatures, check: str) -> list[str]:
    """Per row, what makes two rows the same audio in the leak check ("" for a skipped clip).

    With `cache_check` "content" it is the cache's content hash: the same bytes under any two names (an alias
    such as `audio/./x.wav`, a symlink, a hard link, a copy). With "mtime" the cache never reads the bytes, and
    size + mtime is no identity (clips of one length unpacked from one archive share both), so it is the file
    itself (device and inode): aliases, symlinks and hard links are seen, a copy under another name is not.
    """
    if check == "content":
        return [identity if valid else "" for identity, valid in zip(features.identities, features.valid, strict=True)]
    identities = []
    for path, valid in zip(table.paths(), features.valid, strict=True):
        try:
            info = path.stat() if valid else None
        except OSError:  # gone since its features were read: it cannot be compared, and is not a leak by itself
            info = None
        identities.append(f"file:{info.st_dev}:{info.st_ino}" if info is not None else "")
    return identities


def _group_name(table: ClipTable | CaptionTable, row: int) -> str:
    """The split of a captioned clip, the fold of a labelled one (every fold is the test fold once)."""
    return table.splits[row] if isinstance(table, CaptionTable) else f"fold {table.folds[row]}"


def _same_audio(table: ClipTable | CaptionTable, a: int, b: int) -> str:
    """How rows `a` and `b` are the same audio, for the message: one file under two names, or two copies."""
    with contextlib.suppress(OSError):
        if table.paths()[a].samefile(table.paths()[b]):
            return "one file under two names"
    return "identical content"


def duplicate_audio(table: ClipTable | CaptionTable, features: CachedFeatures, check: str = "content",
                    refuse: bool = True) -> tuple[tuple[str, str], ...]:
    """Pairs of usable clips that are the same audio (`audio_identities`) within one split or fold. The same
    audio in two splits (two folds of labelled data) is a ValueError naming both files and where they are, when
    `refuse`: test clips would be trained on, or an epoch chosen on a training clip; else the pair is counted."""
    first: dict[str, int] = {}
    pairs = []
    for row, identity in enumerate(audio_identities(table, features, check)):
        other = first.setdefault(identity, row) if identity else row
        if other == row:
            continue
        a, b = table.filenames[other], table.filenames[row]
        where_a, where_b = _group_name(table, other), _group_name(table, row)
        if refuse and where_a != where_b:
            kind = "split" if isinstance(table, CaptionTable) else "fold"
            raise ValueError(f"{table.name}: {a!r} ({where_a}) and {b!r} ({where_b}) are the same audio "
                             f"({_same_audio(table, other, row)}): a clip in two {kind}s leaks between training and "
                             "test; remove one")
        pairs.append((a, b))
    return tuple(pairs)


def tokenizer_words(table: ClipTable | CaptionTable) -> tuple[str, ...]:
    """What the offline random tiny model trains its tokenizer on: class names, or the captions' words."""
    if isinstance(table, ClipTable):
        return tuple(table.class_names)
    return tuple(sorted({w for caps in table.captions for c in caps for w in c.lower().split()}))


@dataclass
class Workspace:
    table: ClipTable | CaptionTable
    bundle: ClapBundle
    features: CachedFeatures
    audio: AudioConfig = AudioConfig()
    cache_dir: Path = DEFAULT_CACHE
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    batch_size: int = 32  # of every embedding pass
    duplicates: tuple[tuple[str, str], ...] = ()  # the same audio under two names in one split or fold
    _classifier: ZeroShotClassifier | None = field(default=None, repr=False)
    _embeddings: tuple[np.ndarray, torch.Tensor] | None = field(default=None, repr=False)
    _texts: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        data,
        model: ModelSource | str | Path = ModelSource(),
        audio: AudioConfig = AudioConfig(),
        *,
        cache_dir: str | Path = DEFAULT_CACHE,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        captions: bool = False,
        csv: str | Path | None = None,
        caption_column: str | None = None,
        other_class_names: Sequence[str] = (),
    ) -> Workspace:
        """The dataset `data` (a `--data` value or a table; captioned audio when `captions`) on `model`.

        `other_class_names`: classes of other datasets the model will also score (zero-shot transfer); the
        offline random tiny model builds its tokenizer from every name it will see, a real model ignores them.
        """
        templates = tuple(check_template(t) for t in templates)  # before any slow step
        table = load_table(data, captions=captions, csv=csv, caption_column=caption_column)
        source = model if isinstance(model, ModelSource) else ModelSource(model)
        words = tuple(dict.fromkeys((*tokenizer_words(table), *other_class_names)))
        bundle = source.load(class_names=words, cache_dir=CacheLayout.of(cache_dir).converted_models)
        return cls.of(table, bundle, audio, Path(cache_dir), templates)

    @classmethod
    def of(cls, table, bundle: ClapBundle, audio: AudioConfig = AudioConfig(), cache_dir: str | Path = DEFAULT_CACHE,
           templates: Sequence[str] = DEFAULT_TEMPLATES, split: bool = True) -> Workspace:
        """`table` on a loaded `bundle`: its features computed (or read from the cache) the `audio` way.

        The same audio in two splits or folds is refused (`duplicate_audio`) unless `split` is False: a dataset
        only scored as a whole (a transfer target) has nothing to leak between."""
        features = FeatureCache(cache_dir, bundle.feature_extractor, audio).compute(table)
        if not features.valid.any():
            raise ValueError(f"dataset {table.name!r}: every one of its {len(table)} clips was skipped as a bad file")
        duplicates = duplicate_audio(table, features, audio.cache_check, refuse=split)
        if not isinstance(table, CaptionTable):
            check_folds_usable(table, features)
        return cls(table, bundle, features, audio, Path(cache_dir), tuple(templates), duplicates=duplicates)

    def on(self, data) -> Workspace:
        """Another dataset (a `--data` value or a table) on this model, audio configuration, cache and templates:
        transfer targets and retention sets are scored by the encoder adapted here, so they must match it."""
        workspace = Workspace.of(load_table(data), self.bundle, self.audio, self.cache_dir, self.templates, split=False)
        workspace.batch_size = self.batch_size
        return workspace

    @property
    def captioned(self) -> bool:
        return isinstance(self.table, CaptionTable)

    @property
    def classifier(self) -> ZeroShotClassifier:
        """Zero-shot classification over the table's classes (labelled datasets only)."""
        if self.captioned:
            raise ValueError(f"{self.table.name} is captioned audio: it has no classes to classify")
        if self._classifier is None:
            self._classifier = ZeroShotClassifier(self.bundle, self.table.class_names, self.templates)
        return self._classifier

    def _targets_digest(self, rows: np.ndarray) -> str:
        table = self.table
        if self.captioned:
            return digest([[table.filenames[r] for r in rows], [table.captions[r] for r in rows],
                           [table.splits[r] for r in rows]])
        return digest([table.class_names, table.labels[rows].tolist(), table.folds[rows].tolist()])

    def identity(self, rows: np.ndarray | None = None) -> dict:
        """What results computed on the given rows (default: all) depend on, besides the method's options.

        The data as the model sees it (preprocessing and each audio file's identity), labels and folds (or
        captions and splits), the model and the prompt templates. Two runs share stored results only when
        this and the options agree.
        """
        rows = np.arange(len(self.table)) if rows is None else np.sort(np.asarray(rows))
        return {
            "model": self.bundle.provenance,
            "features": self.features.digest(rows),
            "labels": self._targets_digest(rows),
            "valid": digest(self.features.valid[rows].tolist()),
            "templates": list(self.templates),
        }

    def key(self, procedure: dict) -> str:
        """The key of results produced by `procedure` (a method and its options) on this workspace's data."""
        return digest({"data": self.identity(), "procedure": procedure})

    def provenance(self) -> dict:
        """Weights, audio configuration, preprocessing, prompt templates and dataset: what a result depends on."""
        return {
            **self.bundle.provenance,
            **self.features.preprocessing,
            "audio": self.audio.describe(),
            "templates": list(self.templates),
            "dataset": self.table.name,
        }

    def valid_indices(self, indices: np.ndarray | None = None) -> np.ndarray:
        """The given rows (default: all) minus the files that were skipped as bad input."""
        rows = np.arange(len(self.table)) if indices is None else np.asarray(indices)
        return rows[self.features.valid[rows]]

    def splits(self, val_fraction: float = 0.0, seed: int = 0) -> list[Split]:
        """The official splits, skipped files removed: one per fold of a labelled dataset (validation carved
        from the training folds), or captioned audio's one train / validation / test split (`val_fraction`
        does not apply: its validation split is official)."""
        if not self.captioned:
            return [
                Split(s.fold, self.valid_indices(s.train), self.valid_indices(s.test), self.valid_indices(s.val))
                for s in official_splits(self.table, val_fraction=val_fraction, seed=seed)
            ]
        rows = {}
        for name in CAPTION_SPLITS:
            everything = self.table.rows(name)
            rows[name] = self.valid_indices(everything)
            if len(rows[name]) == 0:
                skipped = f" ({len(everything)} skipped as bad audio)" if len(everything) else ""
                raise ValueError(f"{self.table.name}: the {name} split has no clips{skipped}; it needs train, "
                                 "validation and test clips")
        return [Split(OFFICIAL_SPLIT, rows["train"], rows["test"], rows["validation"])]

    def split(self, fold: int, val_fraction: float = 0.0, seed: int = 0) -> Split:
        """The official split whose test fold is `fold` (an error listing the folds if there is none)."""
        for split in self.splits(val_fraction, seed):
            if split.fold == fold:
                return split
        folds = [s.fold for s in self.splits(val_fraction, seed)]
        raise ValueError(f"no fold {fold} in {self.table.name!r}: folds are {folds}")

    def batch(self, rows: np.ndarray):
        """Model inputs of the given rows on the model's device: (input_features, is_longer (n, 1))."""
        return model_inputs(self.features.input_features, rows, self.bundle.device, self.features.is_longer)

    def batches(self, rows, batch_size: int | None = None, shuffle_generator=None, desc: str | None = None
                ) -> Iterator[Batch]:
        """(rows, input_features, is_longer) batches of the given rows on the model's device (see `batches`)."""
        f = self.features
        return batches(f.input_features, rows, batch_size or self.batch_size, self.bundle.device, f.is_longer,
                       shuffle_generator, desc)

    def encode(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> AudioEncoding:
        """Frame tokens, pooled output and embedding of one batch from `batches` (differentiable)."""
        return encode_audio(self.bundle.model, input_features, is_longer)

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """Audio embeddings of one batch from `batches` (differentiable: ResiDual's hooks act here)."""
        return self.encode(input_features, is_longer).embedding

    @torch.no_grad()
    def embed(self, rows, adapter=None, model: torch.nn.Module | None = None, desc: str | None = None) -> torch.Tensor:
        """(len(rows), D) unit audio embeddings on the CPU: of the plain model, with `adapter` attached (a
        ResiDual), or through another `model` holding `audio_model` and `audio_projection` (LoRA, fine-tuned)."""
        model = self.bundle.model if model is None else model
        out = []
        for _, x, longer in self.batches(rows, desc=desc):
            attach = adapter.attached(self.bundle.model) if adapter is not None else contextlib.nullcontext()
            with self.bundle.autocast(), attach:
                out.append(audio_embeddings(model, x, longer).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.bundle.model.config.projection_dim)

    def embeddings(self, rows) -> torch.Tensor:
        """Plain audio embeddings of the rows, every usable clip embedded once and reused by every caller."""
        if self._embeddings is None:
            valid = self.valid_indices()
            position = np.full(len(self.table), -1, dtype=np.int64)
            position[valid] = np.arange(len(valid))
            self._embeddings = position, self.embed(valid, desc="audio embeddings (every clip, once)")
        position, embeddings = self._embeddings
        return embeddings[torch.from_numpy(position[np.asarray(rows, dtype=np.int64)])]

    @torch.no_grad()
    def frame_tokens(self, rows) -> torch.Tensor:
        """(n, T, D) the final HTSAT tokens averaged over frequency (one per time frame), each through CLAP's
        frozen audio projection: TAP's keys and values. Their plain mean is the pooled output before projection."""
        model, out = self.bundle.model, []
        for _, x, longer in self.batches(rows):
            with self.bundle.autocast():
                frames = encode_audio(model, x, longer).token_map().mean(2).transpose(1, 2)  # (n, T, C)
                out.append(model.audio_projection(frames).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def pooled_outputs(self, rows) -> torch.Tensor:
        """(n, C) the encoder's pooled output before CLAP's projection (a linear projection's other source)."""
        out = []
        for _, x, longer in self.batches(rows):
            with self.bundle.autocast():
                out.append(encode_audio(self.bundle.model, x, longer).pooled.float().cpu())
        return torch.cat(out)

    def text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit CLAP text embeddings (CPU), computed once per list of texts: the frozen text side."""
        key = tuple(texts)
        if key not in self._texts:
            chunks = [text_embeddings(self.bundle, key[s : s + 256]).cpu() for s in range(0, len(key), 256)]
            self._texts[key] = torch.cat(chunks) if chunks else torch.empty(0, self.bundle.model.config.projection_dim)
        return self._texts[key]


def write_skipped(ws: Workspace, out: str | Path, name: str | None = None) -> None:
    """OUT/skipped.csv (clips left out: bad audio, and clips the metadata names but the folder lacks) and
    OUT/warnings.csv (files used but suspect: clipping, DC only, the same audio as another clip of their split or
    fold), each counted on the console; for another
    dataset of the run (a transfer target), OUT/skipped-<name>.csv and OUT/warnings-<name>.csv.

    Each is removed when empty, so a list from an earlier run never outlives the files it named.
    """
    import pandas as pd

    from audio_residual.io import write_csv
    from audio_residual.layout import RunLayout

    table, layout = ws.table, RunLayout(Path(out))
    split_of = dict(zip(table.filenames, table.splits if ws.captioned else [""] * len(table), strict=True))
    skipped = [{"filename": name, "reason": reason, "split": split_of.get(name, "")}
               for name, reason in ws.features.skipped]
    skipped += [{"filename": clip, "reason": reason, "split": split} for split, clip, reason in
                getattr(table, "missing", ())]
    warnings = [{"filename": name, "reason": reason, "split": split_of.get(name, "")}
                for name, reason in ws.features.warnings]
    warnings += [{"filename": b, "reason": f"the same audio as {a}", "split": split_of.get(b, "")}
                 for a, b in ws.duplicates]
    if ws.duplicates:
        print(f"{table.name}: {len(ws.duplicates)} duplicate audio file(s) within a "
              f"{'split' if ws.captioned else 'fold'} (the same audio under two names), each used as listed")
    suffix = "" if name is None else "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    paths = [path.with_name(f"{path.stem}{suffix}{path.suffix}") for path in (layout.skipped, layout.warnings)]
    lists = [(paths[0], skipped, "skipped {n} clip(s) (bad audio, or listed but missing)"),
             (paths[1], warnings, "{n} clip(s) used despite a warning (clipping, DC only, duplicate audio)")]
    for path, entries, message in lists:
        if entries:
            write_csv(path, pd.DataFrame(entries, columns=["filename", "reason", "split"]))
            print(f"{ws.table.name}: {message.format(n=len(entries))}, listed in {path}")
        else:
            path.unlink(missing_ok=True)
