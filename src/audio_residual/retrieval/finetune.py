"""Full fine-tuning for retrieval: `pretrain` (the contrastive CLAP training of `audio-residual pretrain`)
continued from the study's own checkpoint on its training split, the kept epoch chosen by validation mean R@1.

The text tower is frozen by default (`freeze="text"`), as for every other retrieval method; the fine-tuned
model is a `save_pretrained` folder under the study's output (`OUT/finetune/model`), with its provenance.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from audio_residual.clap.loading import load_clap
from audio_residual.evaluation.retrieval import dot_scorer
from audio_residual.retrieval.data import RetrievalData
from audio_residual.retrieval.methods import Fit, Fitted, TextCache
from audio_residual.retrieval.text_encoders import clap_text_encoder
from audio_residual.training.pretrain import PretrainRecipe, trainable_parameters
from audio_residual.training.pretrain_run import PROVENANCE_FILE, PretrainRun, PretrainSource, pretrain


def fit_pretrain_finetune(data: RetrievalData, fit: Fit, out: Path, freeze: str = "text") -> Fitted:
    """Continue contrastive training of the data's model on its train split (validation picks the epoch)."""
    started = time.perf_counter()
    recipe = PretrainRecipe(epochs=fit.epochs, batch_size=max(2, fit.batch_size), lr=fit.lr, freeze=freeze,
                            seed=fit.seed)
    run = PretrainRun(out=Path(out), cache_dir=data.cache_dir, device=str(data.bundle.device))
    folder = pretrain(data.table, PretrainSource(config=None, model=str(data.bundle.model_id)), recipe, run)
    tuned = load_clap(folder, device=data.bundle.device)
    provenance = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    epochs = provenance["epochs"]
    text = TextCache(clap_text_encoder(tuned))

    def score(source, rows, texts):
        return dot_scorer(source.audio_embeddings(rows, model=tuned.model), text(texts))

    history = [{"epoch": e["epoch"], "train_loss": e["train_loss"], "val_mean_r1": e["mean_r1"]} for e in epochs[1:]]
    params = sum(p.numel() for p in trainable_parameters(tuned.model, freeze).values())
    return Fitted("finetune", params, time.perf_counter() - started, score, best_epoch=provenance["best_epoch"],
                  start_score=epochs[0]["mean_r1"], history=history, options={"freeze": freeze},
                  module=tuned.model)
