"""Contrastive CLAP (pre)training on captioned audio: the recipe of the Custom-CLAP project.

A transformers `ClapModel`, from scratch for a named size or from a checkpoint, trained with CLIP's
symmetric cross-entropy over the in-batch (clip, caption) pairs — one caption drawn per clip and step —
with a learned temperature clamped as CLIP clamps it (logit scale ≤ 100), AdamW (no decay on biases,
norms and the temperature), linear warm-up then cosine decay, gradient accumulation and bf16 autocast on
CUDA. Every epoch is scored by retrieval on the validation split (LAION's metric, both directions); the
kept epoch is the best validation mean R@1, the starting point included. Clips come from the shared
feature cache; captions are tokenized once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ClapConfig, ClapModel, ClapProcessor, ClapTextConfig, PreTrainedTokenizerBase

from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import TextLength, tokenize
from audio_residual.clap.tiny import (
    htsat_base_config,
    htsat_tiny_config,
    hub_feature_extractor,
    offline_tokenizer,
    tiny_clap_config,
)
from audio_residual.data_processing.captions import CaptionTable
from audio_residual.tasks.loss import symmetric_infonce
from audio_residual.tasks.retrieval import retrieval_metrics

CONFIGS = ("tiny", "htsat-tiny", "htsat-base")
FREEZE = ("none", "text", "audio")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit scale) at 100


@dataclass(frozen=True)
class PretrainConfig:
    """The training options; every field is recorded in the output's provenance."""

    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # micro-batches per optimizer step (the loss is summed over their in-batch pairs)
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup: float = 0.05  # fraction of all optimizer steps spent warming up linearly
    betas: tuple[float, float] = (0.9, 0.98)
    freeze: str = "none"
    all_captions: bool = False  # every caption of a clip in its step, not one drawn (multi-positive loss)
    seed: int = 0
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE:
            raise ValueError(f"--freeze must be one of {FREEZE}, got {self.freeze!r}")
        if min(self.epochs, self.batch_size, self.accumulate) < 1 or self.batch_size < 2:
            raise ValueError("epochs and accumulate must be >= 1 and batch_size >= 2 (contrastive pairs)")
        if not 0 <= self.warmup < 1 or self.lr <= 0:
            raise ValueError(f"warmup must be in [0, 1) and lr > 0, got {self.warmup}, {self.lr}")


def caption_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE with RoBERTa's special tokens trained once on the captions' vocabulary (tiny config)."""
    return offline_tokenizer(texts, vocab_size=vocab_size)


def new_clap(config: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> tuple[ClapModel, ClapProcessor]:
    """A random-initialised CLAP of a named size, its text tower sized to `tokenizer`.

    `tiny`: the toy geometry of `clap.tiny`, set up to train from scratch in minutes (see below);
    `htsat-tiny` / `htsat-base`: the audio towers of LAION's checkpoints with a RoBERTa-base text tower.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown --config {config!r}: choose from {CONFIGS}")
    vocab = len(tokenizer)
    if config == "tiny":
        # Trained for minutes from scratch: no dropout (it only slows the start); the tiny text tower keeps the
        # wide init of `clap.tiny` (with std 0.02 every caption embeds alike, cosine 0.999, and the loss has
        # no gradient to tell captions apart for dozens of steps); the rest takes transformers' standard init.
        clap_config = tiny_clap_config(vocab_size=vocab)
        clap_config.initializer_factor = 1.0
        clap_config.text_config.initializer_factor = 3.0
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            setattr(clap_config.text_config, key, 0.0)
        for key in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            setattr(clap_config.audio_config, key, 0.0)
    else:
        audio = (htsat_tiny_config if config == "htsat-tiny" else htsat_base_config)().audio_config
        text = ClapTextConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
        clap_config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=512)
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        model = ClapModel(clap_config)
    extractor = hub_feature_extractor(clap_config.audio_config.enable_fusion)
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def trainable_parameters(model: ClapModel, freeze: str) -> dict[str, torch.nn.Parameter]:
    """Freeze one tower (its encoder and projection) or none; the temperatures always train."""
    frozen = {"none": (), "text": ("text_model.", "text_projection."), "audio": ("audio_model.", "audio_projection.")}
    if freeze not in frozen:
        raise ValueError(f"--freeze must be one of {FREEZE}, got {freeze!r}")
    params = {}
    for name, param in model.named_parameters():
        train = not name.startswith(frozen[freeze])
        param.requires_grad_(train)
        if train:
            params[name] = param
    return params


def contrastive_loss(
    audio_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale_a: torch.Tensor,
    logit_scale_t: torch.Tensor,
    owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's loss (`tasks.loss.symmetric_infonce`) over normalised in-batch pairs, with CLAP's two
    temperatures: `logit_scale_a` scores audio→text, `logit_scale_t` text→audio (both log-scales).

    With several captions per clip (`owner[q]`: the clip of caption q), each caption's one positive is its
    clip and each clip's target is spread evenly over its captions; with one caption per clip this is CLIP's
    loss. (transformers' `ClapModel(return_loss=True)` scores text→audio twice; this scores each direction once.)
    """
    audio, text = F.normalize(audio_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    clips = torch.arange(len(audio), device=audio.device)
    owner = clips if owner is None else owner.to(audio.device)
    return symmetric_infonce(logit_scale_a.exp() * audio @ text.T, clips, owner, logit_scale_t.exp() * text @ audio.T)


@torch.no_grad()
def clamp_logit_scale(model: ClapModel, maximum: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit scale) ≤ `maximum` after each step, as CLIP does."""
    for scale in (model.logit_scale_a, model.logit_scale_t):
        scale.clamp_(max=math.log(maximum))


def optimizer_and_schedule(
    model: ClapModel, params: dict[str, torch.nn.Parameter], config: PretrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only, and linear warm-up then cosine decay to 0 over `total_steps`."""
    decay = [p for name, p in params.items() if p.ndim >= 2 and "embeddings" not in name]
    rest = [p for name, p in params.items() if not (p.ndim >= 2 and "embeddings" not in name)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)
    warmup = int(round(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class CaptionedFeatures:
    """What training reads: cached clip features, every caption's tokens and the clip each describes."""

    input_features: np.ndarray  # (n_clips, ...) memmap of the table's clips
    is_longer: np.ndarray
    input_ids: torch.Tensor  # (n_captions, length)
    attention_mask: torch.Tensor
    caption_clip: np.ndarray  # (n_captions,) table row of each caption
    train_rows: np.ndarray
    validation_rows: np.ndarray

    @classmethod
    def build(cls, table: CaptionTable, features, tokenizer, length: TextLength,
              valid: np.ndarray | None = None) -> CaptionedFeatures:
        """Captions truncated by the model's rule (`ClapBundle.text_length`: as the checkpoint was trained,
        77 tokens for LAION's; a model from scratch, what its position embeddings hold)."""
        valid = np.ones(len(table), bool) if valid is None else np.asarray(valid, bool)
        texts, owner = table.caption_pairs()
        tokens = tokenize(tokenizer, texts, length)
        rows = {s: table.rows(s)[valid[table.rows(s)]] for s in ("train", "validation")}
        if len(rows["train"]) < 2:
            raise ValueError(f"{table.name}: pretraining needs at least 2 training clips, found {len(rows['train'])}")
        return cls(features.input_features, features.is_longer, tokens["input_ids"], tokens["attention_mask"],
                   owner, rows["train"], rows["validation"])  # fmt: skip

    def captions_of(self, rows: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(self.caption_clip, kind="stable")
        starts = np.searchsorted(self.caption_clip[order], rows, side="left")
        ends = np.searchsorted(self.caption_clip[order], rows, side="right")
        return [order[s:e] for s, e in zip(starts, ends, strict=True)]


def epoch_batches(
    data: CaptionedFeatures, batch_size: int, generator: torch.Generator, all_captions: bool = False
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(clip rows, caption indices, each caption's clip position) per batch, clips in a drawn order.

    Each clip brings one caption drawn from its own (CLIP's recipe) or, with `all_captions`, every caption.
    A final batch of one clip is dropped: it has no negative pair.
    """
    rows = data.train_rows[torch.randperm(len(data.train_rows), generator=generator).numpy()]
    captions = data.captions_of(rows)
    picks = torch.randint(0, 2**31 - 1, (len(rows),), generator=generator).numpy()
    out = []
    for s in range(0, len(rows), batch_size):
        if all_captions:
            chosen = [captions[i] for i in range(s, min(s + batch_size, len(rows)))]
        else:
            chosen = [captions[i][picks[i] % len(captions[i])][None] for i in range(s, min(s + batch_size, len(rows)))]
        owner = np.concatenate([np.full(len(c), j) for j, c in enumerate(chosen)])
        out.append((rows[s : s + batch_size], np.concatenate(chosen).astype(np.int64), owner.astype(np.int64)))
    return [b for b in out if len(b[0]) > 1]


def batch_inputs(data: CaptionedFeatures, batch, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch's tensors on `device`: clip features from the (memory-mapped) cache, caption tokens."""
    rows, captions, owner = batch
    mask = data.attention_mask[captions]
    width = int(mask.sum(1).max())  # drop the padding columns no caption of this batch needs
    return {
        "input_features": torch.from_numpy(np.ascontiguousarray(data.input_features[rows])).to(device),
        "is_longer": torch.from_numpy(np.array(data.is_longer[rows])).reshape(-1, 1).to(device),
        "input_ids": data.input_ids[captions][:, :width].to(device),
        "attention_mask": mask[:, :width].to(device),
        "owner": torch.from_numpy(owner).to(device),
    }


def inputs_loss(model: ClapModel, inputs: dict[str, torch.Tensor], autocast=contextlib.nullcontext) -> torch.Tensor:
    """The symmetric contrastive loss of one batch's tensors (`batch_inputs`)."""
    with autocast():
        pooled = model.audio_model(input_features=inputs["input_features"], is_longer=inputs["is_longer"]).pooler_output
        audio = model.audio_projection(pooled)
        text_out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text = model.text_projection(text_out.pooler_output)
    return contrastive_loss(audio, text, model.logit_scale_a, model.logit_scale_t, inputs["owner"])


def batch_loss(model: ClapModel, data: CaptionedFeatures, batch, device: torch.device, autocast) -> torch.Tensor:
    """The symmetric contrastive loss of one batch of (clip rows, caption indices, caption owners)."""
    return inputs_loss(model, batch_inputs(data, batch, device), autocast)


@torch.no_grad()
def embed_captions(model: ClapModel, data: CaptionedFeatures, captions: np.ndarray, device, batch_size: int, autocast) -> torch.Tensor:
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        ids, mask = data.input_ids[chunk].to(device), data.attention_mask[chunk].to(device)
        with autocast():
            pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            out.append(F.normalize(model.text_projection(pooled).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_clips(model: ClapModel, features, is_longer, rows: np.ndarray, device, batch_size: int, autocast) -> torch.Tensor:
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(features[chunk])).to(device)
        longer = torch.from_numpy(np.array(is_longer[chunk])).reshape(-1, 1).to(device)
        with autocast():
            out.append(audio_embeddings(model, x, longer).cpu())
    return torch.cat(out)


def validation_retrieval(model: ClapModel, data: CaptionedFeatures, device, batch_size: int = 64, autocast=None) -> dict:
    """LAION's retrieval metrics (both directions) of the validation clips against all their captions."""
    autocast = autocast or contextlib.nullcontext
    rows = data.validation_rows
    if len(rows) == 0:
        raise ValueError("the captioned data has no validation clips: pretraining selects its epoch on them")
    was_training = model.training
    model.eval()
    captions = np.concatenate(data.captions_of(rows))
    position = {int(r): i for i, r in enumerate(rows)}
    owner = np.array([position[int(c)] for c in data.caption_clip[captions]], dtype=np.int64)
    audio = embed_clips(model, data.input_features, data.is_longer, rows, device, batch_size, autocast)
    text = embed_captions(model, data, captions, device, batch_size, autocast)
    model.train(was_training)
    return retrieval_metrics(audio, text, owner)


def config_dict(config: PretrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
