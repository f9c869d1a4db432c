"""The peer methods (Tip-Adapter, Tip-Adapter-F, CoOp, LoRA) on one fold, for `run_baselines`.

All are opt-in: name them in `run_baselines(methods=...)`. The first three train on the cached audio
embeddings; LoRA runs the audio encoder and is the expensive one. `options` are keyword arguments for the
method's `train_*` function (e.g. `{"epochs": 20}`); hyper-parameters are chosen on `split.val` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from audio_residual.baselines.lora import train_lora
from audio_residual.baselines.prompt_learning import train_coop
from audio_residual.baselines.tip_adapter import train_tip_adapter, train_tip_adapter_f
from audio_residual.data_processing import Split
from audio_residual.workspace import Workspace

PEER_EMBEDDING_METHODS = ("tip_adapter", "tip_adapter_f", "coop")
PEER_FEATURE_METHODS = ("lora",)
PEER_METHODS = (*PEER_EMBEDDING_METHODS, *PEER_FEATURE_METHODS)


def run_peer(
    name: str,
    ws: Workspace,
    split: Split,
    emb: Callable[[np.ndarray], torch.Tensor] | None,
    seed: int,
    options: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, int]:
    """(test logits, trainable parameters) of one peer method trained on `split.train`.

    `emb` maps table rows to cached audio embeddings (needed by the embedding methods).
    """
    options = dict(options or {})
    labels, classifier = ws.table.labels, ws.classifier
    if name in ("tip_adapter", "tip_adapter_f"):
        train = train_tip_adapter
        if name == "tip_adapter_f":
            train = train_tip_adapter_f
            options.setdefault("seed", seed)
        model = train(
            emb(split.train),
            labels[split.train],
            classifier.class_embeddings,
            classifier.logit_scale,
            emb(split.val),
            labels[split.val],
            **options,
        )
        return model.logits(emb(split.test)), model.num_parameters
    if name == "coop":  # with several templates, CoOp starts from the first
        options.setdefault("template", ws.templates[0])
        options.setdefault("seed", seed)
        model = train_coop(
            ws.bundle,
            ws.table.class_names,
            emb(split.train),
            labels[split.train],
            emb(split.val),
            labels[split.val],
            **options,
        )
        return model.logits(emb(split.test)), model.num_parameters
    if name == "lora":
        options.setdefault("seed", seed)
        features = ws.features
        tuned = train_lora(
            ws.bundle,
            features.input_features,
            features.is_longer,
            labels,
            split.train,
            classifier,
            split.val,
            **options,
        )
        logits = tuned.logits(features.input_features, split.test, features.is_longer)
        params = tuned.trainable_params
        del tuned  # free the model copy before the next fold
        if ws.bundle.device.type == "cuda":
            torch.cuda.empty_cache()
        return logits, params
    raise ValueError(f"unknown peer method {name!r}; choose from {PEER_METHODS}")
