"""Run the baselines fold by fold into the resumable `ResultsStore` of an output folder.

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

from audio_residual.baselines.contrastive_adapter import ContrastiveAdapter, train_contrastive_adapter
from audio_residual.baselines.finetune import finetune_audio_encoder
from audio_residual.baselines.peers import PEER_EMBEDDING_METHODS, PEER_METHODS, run_peer
from audio_residual.baselines.probe import train_logistic_probe
from audio_residual.evaluation.compare import ResultsStore
from audio_residual.layout import RunLayout
from audio_residual.protocol import FULL_DATA, Protocol
from audio_residual.workspace import Workspace

EMBEDDING_METHODS = ("zeroshot", "linear_probe", "contrastive_adapter")
FINETUNE_METHOD = "finetune"
ALL_METHODS = (*EMBEDDING_METHODS, *PEER_METHODS)  # fine-tuning joins with finetune_epochs > 0
TRANSFER_ADAPTER = "contrastive_adapter"  # keeps CLAP's text side: its map is saved for zero-shot transfer


def _method_list(methods: Sequence[str], finetune_epochs: int) -> list[str]:
    """Validated method names; fine-tuning is added by (and only by) `finetune_epochs > 0`."""
    unknown = set(methods) - set(EMBEDDING_METHODS) - set(PEER_METHODS) - {FINETUNE_METHOD}
    if unknown:
        choices = (*EMBEDDING_METHODS, *PEER_METHODS)
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
    fine-tuning it is the whole fine-tuning run. The peer methods (`PEER_METHODS`: Tip-Adapter(-F), CoOp,
    LoRA) run only when named in `methods`; `peer_options[name]` are keyword arguments for their training.
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
        if name == TRANSFER_ADAPTER and protocol.full_data:
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
    labels, n_classes, classifier = ws.table.labels, len(ws.table.class_names), ws.classifier
    emb = None  # rows → cached audio embeddings, set when some method needs them
    if any(name in EMBEDDING_METHODS or name in PEER_EMBEDDING_METHODS for _, name, _ in todo):
        rows = ws.valid_indices()
        position = np.full(len(ws.table), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        embeddings = ws.embed(rows, desc="audio embeddings (all folds)")

        def emb(indices: np.ndarray) -> torch.Tensor:
            return embeddings[torch.from_numpy(position[indices])]

    for protocol, name, split in tqdm(todo, desc="baselines"):
        start = time.perf_counter()
        if name == "zeroshot":
            logits, params = classifier.logits(emb(split.test)), 0
        elif name == "linear_probe":
            probe = train_logistic_probe(
                emb(split.train), labels[split.train], n_classes, emb(split.val), labels[split.val], seed=seed
            )
            logits, params = probe.logits(emb(split.test)), probe.num_parameters
        elif name == "contrastive_adapter":
            adapter = train_contrastive_adapter(
                emb(split.train),
                labels[split.train],
                classifier.class_embeddings,
                classifier.logit_scale,
                emb(split.val),
                labels[split.val],
                seed=seed,
            )
            logits, params = adapter.logits(emb(split.test)), adapter.num_parameters
            if protocol.full_data:
                adapter.save(layout.adapter(name, keys[name, protocol], split.fold))
        elif name in PEER_METHODS:
            logits, params = run_peer(name, ws, split, emb, seed, peer_options.get(name))
        else:
            features = ws.features
            tuned = finetune_audio_encoder(
                ws.bundle,
                features.input_features,
                features.is_longer,
                labels,
                split.train,
                n_classes,
                split.val,
                zero_shot=classifier,
                epochs=finetune_epochs,
                seed=seed,
            )
            logits = tuned.logits(features.input_features, split.test, features.is_longer)
            params = tuned.trainable_params
            del tuned  # free the model copy before the next fold
            if ws.bundle.device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        store.add_evaluation(
            name, split.fold, keys[name, protocol], logits, labels[split.test], n_classes, params, seconds,
            **protocol.columns(),
        )
    return store


def saved_adapters(store: ResultsStore, out_dir: str | Path) -> list[ContrastiveAdapter]:
    """The full-data contrastive adapter of each fold of this session's rows (for zero-shot transfer)."""
    layout = RunLayout.of(out_dir)
    key = store.selected.get((TRANSFER_ADAPTER, None, None))
    folds = sorted(store.frame.loc[store.frame["method"] == TRANSFER_ADAPTER, "fold"])
    if key is None or not folds:
        raise ValueError(f"no {TRANSFER_ADAPTER} rows in this session: run run_baselines with it first")
    return [ContrastiveAdapter.load(layout.adapter(TRANSFER_ADAPTER, key, fold)) for fold in folds]
