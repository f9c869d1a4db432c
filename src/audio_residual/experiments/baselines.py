"""Run the registered methods fold by fold into the resumable `ResultsStore` of an output folder.

    store = run_baselines(ws, "runs/esc50")              # zeroshot, linear_probe, contrastive_adapter
    store = run_baselines(ws, "runs/esc50", protocols=few_shot_protocols([1, 2], seeds=3))  # k-shot rows
    # ... ResiDual adds its rows with store.add_evaluation(...) ...
    write_report(store, "runs/esc50", ws.table.class_names)   # audio_residual.evaluation.report
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from audio_residual.evaluation.store import ResultsStore
from audio_residual.experiments.protocol import FULL_DATA, Protocol
from audio_residual.layout import RunLayout
from audio_residual.methods import DEFAULT_METHODS, REGISTRY, Context, get
from audio_residual.methods.base import release_memory
from audio_residual.workspace import Workspace

EMBEDDING_METHODS = DEFAULT_METHODS
FINETUNE_METHOD = "finetune"
ALL_METHODS = tuple(name for name in REGISTRY if name != FINETUNE_METHOD)  # fine-tuning joins with finetune_epochs > 0


def _method_list(methods: Sequence[str], finetune_epochs: int) -> list[str]:
    """Validated method names; fine-tuning is added by (and only by) `finetune_epochs > 0`."""
    unknown = set(methods) - set(REGISTRY)
    if unknown:
        choices = tuple(name for name in REGISTRY if name != FINETUNE_METHOD)
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {choices} (+ finetune)")
    names = [m for m in dict.fromkeys(methods) if m != FINETUNE_METHOD]
    return [*names, FINETUNE_METHOD] if finetune_epochs > 0 else names


def baseline_procedure(
    name: str, val_fraction: float, seed: int, finetune_epochs: int = 0, options: Mapping[str, Any] | None = None
) -> dict:
    """What a baseline's rows depend on besides the data: the method, its validation split, seed, options."""
    procedure = {"method": name, "val_fraction": val_fraction, "seed": seed, "options": dict(options or {})}
    return procedure | ({"epochs": finetune_epochs} if name == FINETUNE_METHOD else {})


def run_baselines(
    ws: Workspace,
    out_dir: str | Path,
    methods: Sequence[str] = EMBEDDING_METHODS,
    folds: Sequence[int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
    finetune_epochs: int = 0,
    peer_options: Mapping[str, Mapping[str, Any]] | None = None,
    protocols: Sequence[Protocol] = (FULL_DATA,),
) -> ResultsStore:
    """Evaluate each method on each fold of each protocol, skipping rows the store holds under the same key.

    Every valid clip is embedded once and the embeddings are reused by every fold, protocol and embedding
    method. Models train on `split.train`, choose hyper-parameters / stop early on `split.val` (carved from
    the training folds: `val_fraction` of them for full data, k clips per class for a k-shot draw) and are
    scored on `split.test`, the official test fold. `seconds` is the wall time of training + test
    inference from cached embeddings (the shared embedding pass is not charged to any method); for
    fine-tuning it is the whole fine-tuning run. Methods outside `DEFAULT_METHODS` (Tip-Adapter(-F), CoOp,
    LoRA, …) run only when named in `methods`; `peer_options[name]` are keyword arguments for a method's training.
    The full-data contrastive adapter of each fold is saved (`RunLayout.adapter`) for zero-shot transfer.
    """
    layout = RunLayout.of(out_dir)
    store = ResultsStore(layout.results)
    names = _method_list(methods, finetune_epochs)
    peer_options = peer_options or {}
    keys = {
        (name, protocol): ws.key(
            baseline_procedure(name, val_fraction, seed, finetune_epochs, peer_options.get(name)) | protocol.procedure()
        )
        for name in names
        for protocol in protocols
    }

    def done(name: str, protocol: Protocol, fold: int) -> bool:
        key = keys[name, protocol]
        stored = store.reuse(name, fold, key, protocol.shots, protocol.seed)
        if get(name).transferable and protocol.full_data:
            stored = stored and layout.adapter(name, key, fold).is_file()
        return stored and not force

    todo = [
        (protocol, name, split)
        for protocol in protocols
        for split in protocol.splits(ws, val_fraction, seed)
        if folds is None or split.fold in folds
        for name in names
        if not done(name, protocol, split.fold)
    ]
    if not todo:
        return store
    emb = _embeddings(ws) if any(get(name).uses_embeddings for _, name, _ in todo) else None
    for protocol, name, split in tqdm(todo, desc="baselines"):
        method, key = get(name), keys[name, protocol]
        options = dict(peer_options.get(name) or {}) | ({"epochs": finetune_epochs} if name == FINETUNE_METHOD else {})
        ctx = Context(ws, split, emb, seed, options)
        start = time.perf_counter()
        model = method.fit(ctx)
        scores, params = method.scores(model, ctx, split.test), method.trainable_params(model)
        seconds = time.perf_counter() - start
        if method.transferable and protocol.full_data:
            method.save(model, layout.adapter(name, key, split.fold))
        del model  # free a model copy before the next fold
        release_memory(ws)
        store.add_evaluation(name, split.fold, key, scores, ws.table.labels[split.test], params, seconds,
                             **protocol.columns())  # fmt: skip
    return store


def _embeddings(ws: Workspace):
    """rows → cached audio embeddings: every valid clip embedded once, reused by every fold and method."""
    rows = ws.valid_indices()
    position = np.full(len(ws.table), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    embeddings = ws.embed(rows, desc="audio embeddings (all folds)")

    def emb(indices: np.ndarray) -> torch.Tensor:
        return embeddings[torch.from_numpy(position[indices])]

    return emb


def saved_encoders(store: ResultsStore, out_dir: str | Path, name: str) -> list:
    """The full-data model of each fold of this session's rows of a transferable method (zero-shot transfer)."""
    layout, method = RunLayout.of(out_dir), get(name)
    key = store.selected.get((name, None, None))
    folds = sorted(store.frame.loc[store.frame["method"] == name, "fold"])
    if key is None or not folds:
        raise ValueError(f"no {name} rows in this session: run run_baselines with it first")
    return [method.load(layout.adapter(name, key, fold)) for fold in folds]
