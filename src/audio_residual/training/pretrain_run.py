"""`audio-residual pretrain`: captioned audio in, a `save_pretrained` CLAP folder with its provenance out.

OUT/model/          the kept epoch (best validation mean R@1, epoch 0 included): weights (safetensors),
                    config, processor + tokenizer, and `pretraining.json` (data, recipe, epochs, figures)
OUT/history.csv     one row per epoch (0 = the starting point): loss, lr, retrieval, zero-shot accuracy
OUT/checkpoint.safetensors   the latest epoch's state: a killed run resumes from it
OUT/skipped.csv     clips left out (missing AudioCaps videos, unreadable audio), when there are any
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from audio_residual.clap.loading import ClapBundle, align_truncation, load_clap, resolve_amp, resolve_device
from audio_residual.data_processing import FeatureCache
from audio_residual.data_processing.captions import CaptionTable
from audio_residual.io import digest, write_csv, write_json
from audio_residual.training import pretrain as P
from audio_residual.training.checkpoint import load_checkpoint, save_checkpoint
from audio_residual.training.tracking import RunTracker

PROVENANCE_FILE = "pretraining.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.safetensors"


@dataclass
class PretrainSource:
    """Where the starting weights come from: a named size from scratch, or a model (`--model`)."""

    config: str | None = "tiny"
    model: str | None = None
    tokenizer: str | None = None  # a tokenizer folder for htsat sizes (no RoBERTa tokenizer offline)

    def describe(self) -> dict:
        return {"config": self.config, "model": self.model, "tokenizer": self.tokenizer}


@dataclass
class PretrainRun:
    out: Path
    cache_dir: Path = Path("cache")
    device: str = "auto"
    amp: str = "auto"
    wandb: str = "disabled"
    eval_classification: str | None = None
    on_bad_file: str = "error"
    feature_workers: int = 1  # processes extracting features (the cache is the same either way)
    extra_provenance: dict = field(default_factory=dict)


def start_model(source: PretrainSource, table: CaptionTable, seed: int):
    """(model, processor, description) of the starting point."""
    if source.model is not None:
        bundle = load_clap(source.model, device="cpu", amp=None)
        return bundle.model, bundle.processor
    if source.config == "tiny":
        from audio_residual.data_processing.synthetic_captions import CAPTION_WORDS

        texts = [CAPTION_WORDS, *(c for captions in table.captions for c in captions)]
        tokenizer = P.caption_tokenizer(texts)
    elif source.tokenizer is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.tokenizer)
    else:
        raise ValueError(
            f"--config {source.config} has a RoBERTa text tower, whose tokenizer cannot be downloaded offline: "
            "give one with --tokenizer DIR (e.g. a saved roberta-base tokenizer) or start from --model"
        )
    return P.new_clap(source.config, tokenizer, seed)


def _write_skipped(out: Path, table: CaptionTable, features) -> None:
    rows = [{"split": s, "clip": c, "reason": r} for s, c, r in table.missing]
    rows += [{"split": table.splits[table.filenames.index(f)], "clip": f, "reason": r} for f, r in features.skipped]
    path = out / "skipped.csv"
    if rows:
        write_csv(path, pd.DataFrame(rows, columns=["split", "clip", "reason"]))
        print(f"{len(rows)} clip(s) skipped (listed in {path})")
    else:
        path.unlink(missing_ok=True)


def classification_eval(spec: str | None, processor, cache_dir: Path, device: torch.device):
    """A function model → zero-shot accuracy on the labelled set `spec` (None: no such evaluation)."""
    if spec is None:
        return None
    from audio_residual.clap.zeroshot import ZeroShotClassifier
    from audio_residual.evaluation.metrics import topk_accuracy
    from audio_residual.workspace import resolve_dataset

    table = resolve_dataset(spec)
    features = FeatureCache(cache_dir, processor.feature_extractor).compute(table, on_bad_file="skip")
    rows = np.flatnonzero(features.valid)

    def accuracy(model) -> float:
        was_training = model.training
        model.eval()
        bundle = ClapBundle(model, processor, "pretraining", device)
        classifier = ZeroShotClassifier(bundle, table.class_names)
        logits = classifier.logits(classifier.embed(features.input_features, rows, features.is_longer, desc=None))
        model.train(was_training)
        return topk_accuracy(logits, table.labels[rows], 1)

    return accuracy


def _save_model(model, processor, folder: Path, provenance: dict) -> None:
    """save_pretrained into a staging folder renamed into place: a kill never leaves half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_json(staging / PROVENANCE_FILE, provenance)
        mask = os.umask(0o022)
        os.umask(mask)
        for path in (staging, *staging.iterdir()):  # mkdtemp made them private: the modes open() would give
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _evaluate(model, data, device, recipe, autocast, classify) -> dict:
    metrics = P.validation_retrieval(model, data, device, recipe.eval_batch_size, autocast)
    keep = {k: v for k, v in metrics.items() if not k.startswith(("n_", "t2a_random", "a2t_random"))}
    keep["random_t2a_r1"] = metrics["t2a_random_r1"]
    if classify is not None:
        keep["zero_shot_accuracy"] = classify(model)
    return keep


def _one_epoch(model, data, params, optimizer, scheduler, recipe, device, autocast, generator) -> float:
    model.train()
    batches = P.epoch_batches(data, recipe.batch_size, generator, recipe.all_captions)
    groups = [batches[i : i + recipe.accumulate] for i in range(0, len(batches), recipe.accumulate)]
    losses = []
    for group in tqdm(groups, desc="pretraining steps", leave=False, unit="step"):
        optimizer.zero_grad(set_to_none=True)
        for batch in group:
            loss = P.batch_loss(model, data, batch, device, autocast) / len(group)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()}; lower --lr")
            loss.backward()
            losses.append(float(loss.detach()) * len(group))
        optimizer.step()
        scheduler.step()
        P.clamp_logit_scale(model)
    return float(np.mean(losses)) if losses else float("nan")


def steps_per_epoch(data, recipe) -> int:
    n_batches = len(data.train_rows) // recipe.batch_size + (len(data.train_rows) % recipe.batch_size > 1)
    return max(1, -(-n_batches // recipe.accumulate))


def _provenance(table, features, source, recipe, history, best_epoch, seconds, extra) -> dict:
    best = next(r for r in history if r["epoch"] == best_epoch)
    return {
        "data": {"name": table.name, "clips": table.counts(), "missing": len(table.missing),
                 "skipped": len(features.skipped), "features": features.digest(),
                 "captions": digest([table.captions, table.splits])},
        "start": source.describe(), "recipe": P.recipe_dict(recipe), "selected_by": "validation mean_r1",
        "best_epoch": best_epoch, "validation": {k: v for k, v in best.items() if k not in ("epoch", "lr")},
        "epochs": history, "seconds": round(seconds, 1), "transformers": transformers.__version__, **extra,
    }  # fmt: skip


def _resume(path: Path, key: str, model, optimizer, scheduler):
    """(history, best_epoch, seconds) saved by an interrupted run of the same key, else None."""
    if not path.is_file():
        return None
    states, info = load_checkpoint(path)
    if info.get("key") != key:
        return None
    model.load_state_dict(states["model"])
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    print(f"resuming pretraining after epoch {info['history'][-1]['epoch']} ({path})")
    return info["history"], info["best_epoch"], info["seconds"]


def pretrain(table: CaptionTable, source: PretrainSource, recipe: P.PretrainRecipe, run: PretrainRun) -> Path:
    """Train contrastively, keep the best validation epoch; returns OUT/model (a `--model` folder)."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(run.device)
    amp = resolve_amp(run.amp, device)
    autocast = (lambda: torch.autocast("cuda", dtype=amp)) if amp is not None else contextlib.nullcontext
    model, processor = start_model(source, table, recipe.seed)
    align_truncation(model, processor, "pretraining")
    features = FeatureCache(run.cache_dir, processor.feature_extractor).compute(
        table, on_bad_file=run.on_bad_file, workers=run.feature_workers
    )
    _write_skipped(out, table, features)
    data = P.CaptionedFeatures.build(table, features, processor.tokenizer, features.valid)
    model.to(device)
    params = P.trainable_parameters(model, recipe.freeze)
    optimizer, scheduler = P.optimizer_and_schedule(model, params, recipe, recipe.epochs * steps_per_epoch(data, recipe))
    classify = classification_eval(run.eval_classification, processor, run.cache_dir, device)
    key = digest([source.describe(), P.recipe_dict(recipe), features.digest(), table.captions, table.splits,
                  run.eval_classification])  # fmt: skip
    tracker = RunTracker(run.wandb, config={"recipe": P.recipe_dict(recipe), "start": source.describe()},
                         wandb_dir=out, job_type="pretrain")  # fmt: skip
    started = time.perf_counter()
    resumed = _resume(out / CHECKPOINT_FILE, key, model, optimizer, scheduler)
    history, best_epoch, earlier = resumed or ([], 0, 0.0)
    if not history:
        history.append({"epoch": 0, "train_loss": float("nan"), "lr": 0.0,
                        **_evaluate(model, data, device, recipe, autocast, classify)})  # fmt: skip
        _save_model(model, processor, out / "model", _provenance(table, features, source, recipe, history, 0, 0.0, run.extra_provenance))
    for epoch in tqdm(range(len(history), recipe.epochs + 1), desc="pretraining", unit="epoch",
                      initial=len(history) - 1, total=recipe.epochs):  # fmt: skip
        if epoch == 0:
            continue
        generator = torch.Generator().manual_seed(recipe.seed * 100_003 + epoch - 1)
        loss = _one_epoch(model, data, params, optimizer, scheduler, recipe, device, autocast, generator)
        record = {"epoch": epoch, "train_loss": loss, "lr": scheduler.get_last_lr()[0],
                  **_evaluate(model, data, device, recipe, autocast, classify)}  # fmt: skip
        history.append(record)
        tracker.log({f"pretrain/{k}": v for k, v in record.items()}, step=epoch)
        seconds = earlier + time.perf_counter() - started
        if record["mean_r1"] > history[best_epoch]["mean_r1"]:  # ties keep the earlier epoch
            best_epoch = epoch
            _save_model(model, processor, out / "model",
                        _provenance(table, features, source, recipe, history, epoch, seconds, run.extra_provenance))  # fmt: skip
        states = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        save_checkpoint(out / CHECKPOINT_FILE, states,
                        {"key": key, "history": history, "best_epoch": best_epoch, "seconds": seconds})  # fmt: skip
    seconds = earlier + time.perf_counter() - started
    final = _provenance(table, features, source, recipe, history, best_epoch, seconds, run.extra_provenance)
    write_json(out / "model" / PROVENANCE_FILE, final)
    write_csv(out / HISTORY_FILE, pd.DataFrame(history))
    tracker.summary({"best_epoch": best_epoch, **final["validation"]})
    tracker.finish()
    return out / "model"
