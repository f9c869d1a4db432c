"""`audio-residual pretrain`: captioned audio in, a `save_pretrained` CLAP folder with its provenance out.

OUT/model/          the kept epoch (best validation mean R@1, epoch 0 included): weights (safetensors),
                    config, processor + tokenizer, and `pretraining.json` (data, training options, epochs, figures)
OUT/history.csv     one row per epoch (0 = the starting point): loss, lr, retrieval, zero-shot accuracy
OUT/checkpoint.safetensors   the latest epoch's state (the one training loop's): a killed run resumes from it
OUT/epoch0.json     the starting point's validation figures
OUT/skipped.csv     clips left out (missing AudioCaps videos, unreadable audio), when there are any
OUT/.pretrain.lock  held while a run writes OUT: a second run into the same folder at once is refused

Under torchrun every rank trains its share of each batch (`ContrastiveStep`); rank 0 alone writes these files and
logs to W&B, and a rerun with any number of ranks resumes the checkpoint (the batches do not depend on it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import transformers
from safetensors import safe_open

from audio_residual.clap.loading import ClapBundle, ModelSource, align_truncation, resolve_amp, resolve_device
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.data_processing.captions import CaptionTable
from audio_residual.data_processing.sharded_features import ShardedFeatureCache
from audio_residual.io import digest, write_csv, write_json
from audio_residual.tasks.classification import topk_accuracy
from audio_residual.training import pretrain as P
from audio_residual.training.distributed import Ranks
from audio_residual.training.loop import Steps, train
from audio_residual.training.tracking import RunTracker
from audio_residual.workspace import Workspace, write_skipped

PROVENANCE_FILE = "pretraining.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.safetensors"
EPOCH0_FILE = "epoch0.json"  # the starting point's validation figures (a resumed run does not measure them again)
LOCK_FILE = ".pretrain.lock"


@dataclass
class PretrainSource:
    """Where the starting weights come from: a named size from scratch, or a model (`--model`: hub id, folder,
    `tiny`, LAION's `.pt` with its `--text-config`, at a `--revision`)."""

    config: str | None = "tiny"
    model: ModelSource | None = None
    tokenizer: str | None = None  # a tokenizer folder for htsat sizes (no RoBERTa tokenizer offline)
    bundle: ClapBundle | None = None  # or a loaded model, copied (fine-tuning a study's own model)

    def describe(self) -> dict:
        model = None
        if self.bundle is not None:
            model = self.bundle.provenance
        elif self.model is not None:
            model = {"model": str(self.model.model), "revision": self.model.revision,
                     "text_config": None if self.model.text_config is None else str(self.model.text_config)}
        return {"config": self.config, "model": model, "tokenizer": self.tokenizer}


@dataclass
class PretrainRun:
    """Where and how a pretraining run runs: output folder, feature cache and its `audio` configuration,
    device, W&B, and a labelled set scored zero-shot every epoch (`eval_classification`)."""

    out: Path
    cache_dir: Path = Path("cache")
    audio: AudioConfig = AudioConfig()
    device: str = "auto"
    amp: str = "auto"
    wandb: str = "auto"
    eval_classification: str | None = None
    extra_provenance: dict = field(default_factory=dict)


def start_model(source: PretrainSource, table: CaptionTable, seed: int, cache_dir: Path):
    """(model, processor) of the starting point, on the CPU."""
    if source.bundle is not None:
        model = copy.deepcopy(source.bundle.model).cpu().requires_grad_(True)
        return model, source.bundle.processor
    if source.model is not None:
        bundle = dataclasses.replace(source.model, device="cpu", amp="none").load(
            cache_dir=Path(cache_dir) / "models")
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


def classification_eval(spec: str | None, ws: Workspace):
    """A function model → zero-shot accuracy on the labelled set `spec` (None: no such evaluation), its clips
    prepared like the training data (`ws.on`)."""
    if spec is None:
        return None
    target = ws.on(spec)
    rows = target.valid_indices()

    def accuracy(model) -> float:
        was_training = model.training
        model.eval()
        classifier = ZeroShotClassifier(target.bundle, target.table.class_names, target.templates)  # current weights
        logits = classifier.logits(target.embed(rows))
        model.train(was_training)
        return topk_accuracy(logits, target.table.labels[rows], 1)

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


class _Evaluation:
    """A model's validation figures: retrieval both directions (+ zero-shot accuracy with a labelled set).

    With several ranks, every rank embeds its share; rank 0 computes the figures (and the zero-shot accuracy)
    and sends them to the others."""

    def __init__(self, data, device, config, amp, classify, ranks: Ranks) -> None:
        self.data, self.device, self.config, self.classify, self.ranks = data, device, config, classify, ranks
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp)) if amp is not None else contextlib.nullcontext
        self.started = time.perf_counter()

    def __call__(self, model) -> dict:
        metrics = P.validation_retrieval(model, self.data, self.device, self.config.eval_batch_size, self.autocast,
                                         self.ranks)  # fmt: skip
        keep = None
        if self.ranks.main:
            keep = {k: float(v) for k, v in metrics.items() if not k.startswith(("n_", "t2a_random", "a2t_random"))}
            keep["random_t2a_r1"] = float(metrics["t2a_random_r1"])
            if self.classify is not None:
                keep["zero_shot_accuracy"] = float(self.classify(model))
        return self.ranks.broadcast_json(keep, "validation")

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def steps_per_epoch(data, config) -> int:
    """Contrastive batches of batch_size × accumulate clips per epoch (a last one of a single clip is dropped)."""
    size = config.batch_size * config.accumulate
    return max(1, len(data.train_rows) // size + (len(data.train_rows) % size > 1))


def _provenance(ws, source, config, history, best_epoch, seconds, extra) -> dict:
    best = next(r for r in history if r["epoch"] == best_epoch)
    table, features = ws.table, ws.features
    return {
        "data": {"name": table.name, "clips": table.counts(), "missing": len(table.missing),
                 "skipped": len(features.skipped), "features": features.digest(),
                 "captions": digest([table.captions, table.splits]), "audio": ws.audio.describe(),
                 "preprocessing": features.preprocessing, "text_length": ws.bundle.text_length.describe()},
        "start": source.describe(), "training": P.config_dict(config), "selected_by": "validation mean_r1",
        "best_epoch": best_epoch, "validation": {k: v for k, v in best.items() if k not in ("epoch", "lr")},
        "epochs": history, "seconds": round(seconds, 1), "transformers": transformers.__version__, **extra,
    }  # fmt: skip


class _ClampedSchedule:
    """The LR schedule the loop steps after each optimizer step, followed by CLIP's clamp of the temperatures."""

    def __init__(self, schedule, model) -> None:
        self.schedule, self.model = schedule, model

    def step(self) -> None:
        self.schedule.step()
        P.clamp_logit_scale(self.model)

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)


def _steps(model, data, optimizer, schedule, config, evaluate, seen: list, first=None) -> Steps:
    """Pretraining's side of the one training loop: one contrastive batch of batch_size × accumulate clips per
    optimizer step (`ContrastiveStep`: micro-batches, ranks), retrieval on validation as the selection metric. The
    loop keeps all the model holds — weights and BatchNorm statistics — at the selected epoch; `seen` gets each
    validation's figures."""
    device = next(model.parameters()).device

    def batches(generator):
        return P.epoch_batches(data, config.batch_size * config.accumulate, generator, config.all_captions)

    def validate() -> float:
        seen.append(evaluate(model))
        if len(seen) == 1 and first is not None and evaluate.ranks.main:
            first(seen[0])
        return seen[-1]["mean_r1"]

    step = P.ContrastiveStep(model, data, device, evaluate.autocast, config.accumulate, evaluate.ranks)
    return Steps(params=dict(model.state_dict(keep_vars=True)), batches=batches, loss=None, backward=step,
                 validate=validate, optimizer=optimizer, scheduler=_ClampedSchedule(schedule, model), mode=model.train,
                 record=lambda: dict(seen[-1]), ranks=evaluate.ranks)  # fmt: skip


@contextlib.contextmanager
def _claim(out: Path, ranks: Ranks):
    """OUT for this run alone while it runs: a second run into it at once would mix two runs' checkpoints and leave
    one run's model with no word of the other, so it is refused (rank 0 holds the lock; a killed run's lock goes
    with its process)."""
    handle, refusal = None, None
    if ranks.main:
        handle = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 — held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle = None
            refusal = (f"{out} is in use by another pretrain run ({holder}): wait for it to finish, or give this run "
                       "another --out")  # fmt: skip
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
    refusal = ranks.broadcast_json(refusal, "the output folder's lock")
    if refusal is not None:
        raise OSError(refusal)
    try:
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _resumable(checkpoint: Path, key: str) -> bool:
    """Whether the loop will resume from `checkpoint` (it does when the run's key matches)."""
    if not checkpoint.is_file():
        return False
    with safe_open(str(checkpoint), framework="pt") as handle:
        return json.loads(handle.metadata()["info"])["config"] == key


def _epoch_zero(path: Path, key: str) -> dict:
    """Epoch 0's figures, written by the session that measured them (a resumed run does not measure them)."""
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.pop("key", None) != key:
        raise RuntimeError(f"{path} is missing or from another run: delete {path.parent / CHECKPOINT_FILE} and rerun")
    return saved


def _workspace(table: CaptionTable, source: PretrainSource, config, run: PretrainRun, ranks: Ranks) -> Workspace:
    """The starting model on this rank's device, and the table's features from the shared cache (under torchrun
    every rank extracts a share of the missing clips and rank 0 writes them, as `audio-residual stats` does)."""
    device = resolve_device(run.device)
    if ranks.distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    model, processor = start_model(source, table, config.seed, run.cache_dir)
    align_truncation(model, processor, "pretraining")
    model.to(device)
    bundle = ClapBundle(model, processor, "pretraining", device)
    if ranks.distributed:
        ShardedFeatureCache(run.cache_dir, bundle.feature_extractor, run.audio).compute(table)
    return Workspace.of(table, bundle, run.audio, run.cache_dir)


def _agree(ranks: Ranks, key: str, tokenizer) -> None:
    """Every rank prepared the same run as rank 0: data, options, features and caption tokens."""
    mine = digest([key, sorted(tokenizer.get_vocab().items())])
    if ranks.broadcast_json(mine, "the run's key") != mine:
        raise ValueError(f"rank {ranks.rank} prepared another run than rank 0 (data, options, features or tokenizer "
                         "differ): every rank must run the same command on the same data")  # fmt: skip


def pretrain(table: CaptionTable, source: PretrainSource, config: P.PretrainConfig, run: PretrainRun) -> Path:
    """Train contrastively through the one training loop, keep the best validation epoch (epoch 0 included);
    returns OUT/model (a `--model` folder). Inside a process group of several ranks (torchrun), data-parallel."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = Ranks.current()
    with _claim(out, ranks):
        result = _pretrain(table, source, config, run, ranks)
    ranks.barrier("the end of training")  # every rank returns once rank 0 has written the model
    return result


def _pretrain(table: CaptionTable, source: PretrainSource, config: P.PretrainConfig, run: PretrainRun,
              ranks: Ranks) -> Path:  # fmt: skip
    out = Path(run.out)
    ws = _workspace(table, source, config, run, ranks)
    model, processor, device, features = ws.bundle.model, ws.bundle.processor, ws.bundle.device, ws.features
    if ranks.main:
        write_skipped(ws, out)
    data = P.CaptionedFeatures.build(table, features, processor.tokenizer, ws.bundle.text_length, features.valid)
    params = P.trainable_parameters(model, config.freeze)
    optimizer, schedule = P.optimizer_and_schedule(model, params, config, config.epochs * steps_per_epoch(data, config))
    classify = classification_eval(run.eval_classification, ws) if ranks.main else None
    evaluate = _Evaluation(data, device, config, resolve_amp(run.amp, device), classify, ranks)
    key = digest([source.describe(), P.config_dict(config), features.digest(), table.captions, table.splits,
                  run.eval_classification])  # fmt: skip
    _agree(ranks, key, processor.tokenizer)
    tracker = RunTracker(run.wandb if ranks.main else "disabled", job_type="pretrain", wandb_dir=out,
                         config={"training": P.config_dict(config), "start": source.describe(), "ranks": ranks.world})
    seen: list[dict] = []
    first = None if _resumable(out / CHECKPOINT_FILE, key) else lambda m: write_json(out / EPOCH0_FILE, {"key": key, **m})
    steps = _steps(model, data, optimizer, schedule, config, evaluate, seen, first)
    result = train(steps, config.epochs, seed=config.seed, checkpoint=out / CHECKPOINT_FILE, key=key, logger=tracker,
                   desc="pretrain", metric="mean_r1")  # fmt: skip
    if not ranks.main:
        return out / "model"
    history = [{"epoch": 0, "train_loss": float("nan"), "lr": 0.0, **_epoch_zero(out / EPOCH0_FILE, key)},
               *result.history]  # fmt: skip
    seconds = result.earlier_seconds + evaluate.seconds()
    extra = {**run.extra_provenance, "ranks": ranks.world}
    provenance = _provenance(ws, source, config, history, result.best_epoch, seconds, extra)
    _save_model(model, processor, out / "model", provenance)  # the loop left the model at the kept epoch
    write_csv(out / HISTORY_FILE, pd.DataFrame(history))
    tracker.summary({"best_epoch": result.best_epoch, **provenance["validation"]})
    tracker.finish()
    return out / "model"
