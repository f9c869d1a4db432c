"""Run the baselines fold by fold into a resumable `ResultsStore`, then write the report (CSV, markdown, PNGs).

Typical use:

    store = run_baselines(exp, "runs/esc50")              # zeroshot, linear_probe, contrastive_adapter
    # ... ResiDual adds its rows with store.add_evaluation("residual", fold, ...) ...
    print(write_report(store, "runs/esc50", exp.table.class_names))
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from audio_residual.baselines import finetune_audio_encoder, train_contrastive_adapter, train_logistic_probe
from audio_residual.evaluation import plots
from audio_residual.evaluation.compare import (
    BASELINE_METHOD,
    ResultsStore,
    markdown_table,
    per_class_deltas,
    summary_table,
    summed_confusion,
)
from audio_residual.evaluation.peers import PEER_EMBEDDING_METHODS, PEER_METHODS, run_peer
from audio_residual.experiment import Experiment
from audio_residual.io import write_csv, write_text

EMBEDDING_METHODS = ("zeroshot", "linear_probe", "contrastive_adapter")
FINETUNE_METHOD = "finetune"
RESULTS_CSV = "results.csv"


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
    exp: Experiment,
    out_dir: str | Path,
    methods: Sequence[str] = EMBEDDING_METHODS,
    folds: Sequence[int] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    force: bool = False,
    finetune_epochs: int = 0,
    peer_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> ResultsStore:
    """Evaluate each method on each official fold, skipping rows the store holds under the same key.

    Every valid clip is embedded once and the embeddings are reused by every fold and embedding method.
    Models train on `split.train`, choose hyper-parameters / stop early on `split.val` (carved from the
    training folds) and are scored on `split.test`. `seconds` is the wall time of training + test
    inference from cached embeddings (the shared embedding pass is not charged to any method); for
    fine-tuning it is the whole fine-tuning run. The peer methods (`PEER_METHODS`: Tip-Adapter(-F), CoOp,
    LoRA) run only when named in `methods`; `peer_options[name]` are keyword arguments for their training.
    """
    store = ResultsStore(Path(out_dir) / RESULTS_CSV)
    names = _method_list(methods, finetune_epochs)
    peer_options = peer_options or {}
    keys = {
        name: exp.key(baseline_procedure(name, val_fraction, seed, finetune_epochs, peer_options.get(name)))
        for name in names
    }
    splits = [s for s in exp.splits(val_fraction=val_fraction, seed=seed) if folds is None or s.fold in folds]
    todo = [
        (name, split) for split in splits for name in names if not store.reuse(name, split.fold, keys[name]) or force
    ]
    if not todo:
        return store
    labels, n_classes, classifier = exp.table.labels, len(exp.table.class_names), exp.classifier
    emb = None  # rows → cached audio embeddings, set when some method needs them
    if any(name in EMBEDDING_METHODS or name in PEER_EMBEDDING_METHODS for name, _ in todo):
        rows = exp.valid_indices()
        position = np.full(len(exp.table), -1, dtype=np.int64)
        position[rows] = np.arange(len(rows))
        embeddings = exp.embed(rows, desc="audio embeddings (all folds)")

        def emb(indices: np.ndarray) -> torch.Tensor:
            return embeddings[torch.from_numpy(position[indices])]

    for name, split in tqdm(todo, desc="baselines"):
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
        elif name in PEER_METHODS:
            logits, params = run_peer(name, exp, split, emb, seed, peer_options.get(name))
        else:
            features = exp.features
            tuned = finetune_audio_encoder(
                exp.bundle,
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
            if exp.bundle.device.type == "cuda":
                torch.cuda.empty_cache()
        store.add_evaluation(
            name, split.fold, keys[name], logits, labels[split.test], n_classes, params, time.perf_counter() - start
        )
    return store


def write_report(
    store: ResultsStore,
    out_dir: str | Path,
    class_names: Sequence[str] | None = None,
    baseline: str = BASELINE_METHOD,
) -> str:
    """summary.csv, table.md and PNG figures next to results.csv; returns the markdown table.

    Per-class and confusion figures are drawn for methods whose rows were added with arrays.
    """
    out_dir = Path(out_dir)
    summary = summary_table(store, baseline=baseline)
    write_csv(out_dir / "summary.csv", summary)
    markdown = markdown_table(summary, baseline=baseline, n_classes=None if class_names is None else len(class_names))
    write_text(out_dir / "table.md", markdown)
    figures = out_dir / "figures"
    plots.save(plots.fold_accuracy(store.frame), figures / "fold_accuracy.png")
    with_arrays = [m for m in store.methods() if store.has_arrays(m)]
    for method in with_arrays:
        matrix = summed_confusion(store, method)
        title = f"{method}: confusion summed over folds"
        plots.save(plots.confusion_heatmap(matrix, class_names, title), figures / f"confusion_{method}.png")
    if baseline in with_arrays:
        deltas = per_class_deltas(store, class_names, baseline=baseline, methods=with_arrays)
        for method in dict.fromkeys(deltas["method"]):
            plots.save(plots.class_deltas(deltas, method, baseline), figures / f"class_deltas_{method}.png")
    return markdown
