"""Contrastive CLAP (pre)training on captioned audio: the recipe of the Custom-CLAP project.

A transformers `ClapModel`, from scratch for a named size or from a checkpoint, trained with CLIP's
symmetric cross-entropy over the in-batch (clip, caption) pairs — one caption drawn per clip and step —
with a learned temperature clamped as CLIP clamps it (logit scale ≤ 100), AdamW (no decay on biases,
norms and the temperature), linear warm-up then cosine decay, gradient accumulation and bf16 autocast on
CUDA. Every epoch is scored by retrieval on the validation split (LAION's metric, both directions); the
kept epoch is the best validation mean R@1, the starting point included. Clips come from the shared
feature cache; captions are tokenized once.

One step's gradients (`ContrastiveStep`) are those of one contrastive batch of `batch_size × accumulate` clips,
however it is cut: into `accumulate` micro-batches embedded one graph at a time (GradCache: embed all without a
graph, take the loss and its gradient with respect to the embeddings, then re-embed each micro-batch and
backpropagate its slice), and into the shares of the ranks of a torchrun job, whose embeddings are gathered with
their gradients (`training.distributed`). The input BatchNorm of the audio tower (HTSAT's `bn0`, on the log-mels)
normalises with the whole batch's statistics in every case, as one process with the whole batch does.
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
from audio_residual.training.distributed import Ranks

CONFIGS = ("tiny", "htsat-tiny", "htsat-base")
FREEZE = ("none", "text", "audio")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit scale) at 100


@dataclass(frozen=True)
class PretrainConfig:
    """The training options; every field is recorded in the output's provenance."""

    epochs: int = 10
    batch_size: int = 32
    accumulate: int = 1  # micro-batches of batch_size clips per step, one contrastive batch (embedded in turn)
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
        if not 0 <= self.warmup < 1:
            raise ValueError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number greater than 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number at least 0, got {self.weight_decay}")


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
    audio, text = F.normalize(_wide(audio_emb), dim=-1), F.normalize(_wide(text_emb), dim=-1)
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


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a model trained in float64 (how the exactness tests rule out rounding)."""
    return x if x.dtype == torch.float64 else x.float()


def batch_inputs(data: CaptionedFeatures, batch, device: torch.device, dtype: torch.dtype | None = None,
                 width: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """One batch's tensors on `device`: clip features from the (memory-mapped) cache (in `dtype`, the model's, when
    given), caption tokens padded to `width` (default: this batch's longest caption)."""
    rows, captions, owner = batch
    mask = data.attention_mask[captions]
    width = int(mask.sum(1).max()) if width is None else width  # drop the padding columns no caption needs
    return {
        "input_features": torch.from_numpy(np.ascontiguousarray(data.input_features[rows])).to(device, dtype),
        "is_longer": torch.from_numpy(np.array(data.is_longer[rows])).reshape(-1, 1).to(device),
        "input_ids": data.input_ids[captions][:, :width].to(device),
        "attention_mask": mask[:, :width].to(device),
        "owner": torch.from_numpy(owner).to(device),
    }


def embed_pairs(model: ClapModel, inputs: dict[str, torch.Tensor], autocast=contextlib.nullcontext):
    """(audio, caption) embeddings, unnormalised, of one batch's tensors (`batch_inputs`)."""
    with autocast():
        pooled = model.audio_model(input_features=inputs["input_features"], is_longer=inputs["is_longer"]).pooler_output
        audio = model.audio_projection(pooled)
        text_out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text = model.text_projection(text_out.pooler_output)
    return audio, text


def inputs_loss(model: ClapModel, inputs: dict[str, torch.Tensor], autocast=contextlib.nullcontext) -> torch.Tensor:
    """The symmetric contrastive loss of one batch's tensors (`batch_inputs`)."""
    audio, text = embed_pairs(model, inputs, autocast)
    return contrastive_loss(audio, text, model.logit_scale_a, model.logit_scale_t, inputs["owner"])


def batch_loss(model: ClapModel, data: CaptionedFeatures, batch, device: torch.device, autocast) -> torch.Tensor:
    """The symmetric contrastive loss of one batch of (clip rows, caption indices, caption owners)."""
    return inputs_loss(model, batch_inputs(data, batch, device), autocast)


def _input_norm(model: ClapModel) -> torch.nn.BatchNorm2d:
    return model.audio_model.audio_encoder.batch_norm


def input_statistics(model: ClapModel, parts: list[dict[str, torch.Tensor]], ranks: Ranks) -> tuple:
    """(mean, biased variance, count) per mel bin of the log-mels of every part on every rank: the statistics
    the input BatchNorm takes in training mode from the whole batch, summed in float64."""
    bins = _input_norm(model).num_features
    device = parts[0]["input_features"].device if parts else next(model.parameters()).device
    sums = torch.zeros(2 * bins + 1, dtype=torch.float64, device=device)
    for inputs in parts:
        x = inputs["input_features"].double()  # (n, channels, time, mel)
        sums[:bins] += x.sum((0, 1, 2))
        sums[bins:-1] += x.square().sum((0, 1, 2))
        sums[-1] += x.numel() // bins
    ranks.sum(sums, "the input statistics' all-reduce")
    count = float(sums[-1])
    mean = sums[:bins] / count
    return mean, (sums[bins:-1] / count - mean.square()).clamp_min(0), count


@contextlib.contextmanager
def whole_batch_norm(model: ClapModel, mean: torch.Tensor, var: torch.Tensor):
    """In training mode, the input BatchNorm normalises with the given whole-batch statistics, whatever part of the
    batch it sees, and leaves its running statistics alone (`track_input_statistics` updates them once a step)."""
    norm = _input_norm(model)
    if not norm.training:
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), norm.weight, norm.bias, False, 0.0, norm.eps)

    norm.forward = forward
    try:
        yield
    finally:
        del norm.forward


@torch.no_grad()
def track_input_statistics(model: ClapModel, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
    """The input BatchNorm's running statistics after one training-mode pass over the whole batch."""
    norm = _input_norm(model)
    if not (norm.training and norm.track_running_stats):
        return
    norm.num_batches_tracked += 1
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.mul_(1 - factor).add_(mean.to(norm.running_mean.dtype), alpha=factor)
    unbiased = var * count / max(count - 1.0, 1.0)
    norm.running_var.mul_(1 - factor).add_(unbiased.to(norm.running_var.dtype), alpha=factor)


@contextlib.contextmanager
def _replay(state: tuple, device: torch.device):
    """The random numbers (dropout) of an earlier pass again, the global generators untouched after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if devices:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


class ContrastiveStep:
    """The gradients of CLIP's loss over one contrastive batch, put into `.grad`; returns the loss.

    This rank embeds its contiguous share of the batch's clips (and their captions) in `accumulate` micro-batches;
    the embeddings of every rank are gathered with their gradients and the loss is the whole batch's. One micro-batch
    is one graph; several go GradCache's way: a pass without a graph, the loss's gradient with respect to the
    embeddings, then each micro-batch re-embedded (same random numbers) and backpropagated from its slice, so a
    step holds one micro-batch's activations, not the whole batch's. In every case the input BatchNorm takes the
    whole batch's statistics (in float64), so how the batch is cut changes the result only by float rounding.
    """

    def __init__(self, model: ClapModel, data: CaptionedFeatures, device, autocast, accumulate: int,
                 ranks: Ranks) -> None:  # fmt: skip
        self.model, self.data, self.device, self.autocast = model, data, torch.device(device), autocast
        self.accumulate, self.ranks = accumulate, ranks

    def __call__(self, batch) -> torch.Tensor:
        rows, captions, owner = batch
        clip_edges = self.ranks.bounds(len(rows))
        caption_edges = np.searchsorted(owner, clip_edges).tolist()  # a batch's captions come clip by clip
        mine = slice(clip_edges[self.ranks.rank], clip_edges[self.ranks.rank + 1])
        mine_captions = slice(caption_edges[self.ranks.rank], caption_edges[self.ranks.rank + 1])
        width = int(self.data.attention_mask[captions].sum(1).max())  # every part padded as the whole batch
        parts = self._parts(rows[mine], captions[mine_captions], owner[mine_captions] - mine.start, width)
        mean, var, count = input_statistics(self.model, parts, self.ranks)
        with whole_batch_norm(self.model, mean, var):
            loss = self._gradients(parts, owner, np.diff(clip_edges).tolist(), np.diff(caption_edges).tolist())
        track_input_statistics(self.model, mean, var, count)
        return loss

    def _parts(self, rows: np.ndarray, captions: np.ndarray, owner: np.ndarray, width: int
               ) -> list[dict[str, torch.Tensor]]:  # fmt: skip
        """This rank's micro-batches: its clips cut in `accumulate` parts, each with its captions."""
        parts = []
        for positions in np.array_split(np.arange(len(rows)), self.accumulate):
            if len(positions):
                inside = (owner >= positions[0]) & (owner <= positions[-1])
                part = (rows[positions], captions[inside], owner[inside] - positions[0])
                parts.append(batch_inputs(self.data, part, self.device, self.model.logit_scale_a.dtype, width))
        return parts

    def _embed(self, parts: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not parts:  # more ranks than the batch has clips: this rank embeds nothing
            width = self.model.config.projection_dim
            empty = torch.zeros(0, width, device=self.device, dtype=_wide(self.model.logit_scale_a).dtype)
            return empty, empty.clone()
        pairs = [embed_pairs(self.model, inputs, self.autocast) for inputs in parts]
        return torch.cat([_wide(a) for a, _ in pairs]), torch.cat([_wide(t) for _, t in pairs])

    def _loss(self, audio, text, owner, clip_sizes, caption_sizes) -> torch.Tensor:
        audio = self.ranks.gather(audio, clip_sizes, grad=True)
        text = self.ranks.gather(text, caption_sizes, grad=True)
        owner = torch.as_tensor(owner, device=self.device)
        return contrastive_loss(audio, text, self.model.logit_scale_a, self.model.logit_scale_t, owner)

    def _gradients(self, parts, owner, clip_sizes, caption_sizes) -> torch.Tensor:
        exchange = self.ranks.collective("the backward pass")
        if len(parts) <= 1:
            audio, text = self._embed(parts)
            if not audio.requires_grad:  # an empty share: still a leaf of the gathered graph
                audio.requires_grad_(True), text.requires_grad_(True)
            loss = self._loss(audio, text, owner, clip_sizes, caption_sizes)
            with exchange:
                loss.backward()
            return loss.detach()
        states, cached = [], []
        with torch.no_grad():  # GradCache: the embeddings first, without a graph
            for inputs in parts:
                states.append(_rng_state(self.device))
                cached.append(self._embed([inputs]))
        audio = torch.cat([a for a, _ in cached]).requires_grad_(True)
        text = torch.cat([t for _, t in cached]).requires_grad_(True)
        loss = self._loss(audio, text, owner, clip_sizes, caption_sizes)
        with exchange:
            loss.backward()  # the temperatures' gradients, and the loss's gradient at every embedding
        a = t = 0
        for inputs, state, (part_audio, part_text) in zip(parts, states, cached, strict=True):
            with _replay(state, self.device):
                again = self._embed([inputs])  # one micro-batch's graph at a time
            n_a, n_t = len(part_audio), len(part_text)
            torch.autograd.backward(again, (audio.grad[a : a + n_a], text.grad[t : t + n_t]))
            a, t = a + n_a, t + n_t
        return loss.detach()


@torch.no_grad()
def embed_captions(model: ClapModel, data: CaptionedFeatures, captions: np.ndarray, device, batch_size: int, autocast) -> torch.Tensor:
    out = [torch.zeros(0, model.config.projection_dim, dtype=_wide(model.logit_scale_t).dtype)]
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        ids, mask = data.input_ids[chunk].to(device), data.attention_mask[chunk].to(device)
        with autocast():
            pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            out.append(F.normalize(_wide(model.text_projection(pooled)), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_clips(model: ClapModel, features, is_longer, rows: np.ndarray, device, batch_size: int, autocast) -> torch.Tensor:
    dtype = _wide(model.logit_scale_a).dtype
    out = [torch.zeros(0, model.config.projection_dim, dtype=dtype)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(features[chunk])).to(device, dtype)
        longer = torch.from_numpy(np.array(is_longer[chunk])).reshape(-1, 1).to(device)
        with autocast():
            out.append(_wide(audio_embeddings(model, x, longer)).cpu())
    return torch.cat(out)


def validation_retrieval(model: ClapModel, data: CaptionedFeatures, device, batch_size: int = 64, autocast=None,
                         ranks: Ranks | None = None) -> dict | None:  # fmt: skip
    """LAION's retrieval metrics (both directions) of the validation clips against all their captions.

    With several ranks, each embeds its share of the clips and captions; rank 0 gathers them and alone computes
    (and returns) the figures, None elsewhere.
    """
    autocast, ranks = autocast or contextlib.nullcontext, ranks or Ranks()
    rows = data.validation_rows
    if len(rows) == 0:
        raise ValueError("the captioned data has no validation clips: pretraining selects its epoch on them")
    was_training = model.training
    model.eval()
    captions = np.concatenate(data.captions_of(rows))
    position = {int(r): i for i, r in enumerate(rows)}
    owner = np.array([position[int(c)] for c in data.caption_clip[captions]], dtype=np.int64)
    clips, texts = ranks.share(len(rows)), ranks.share(len(captions))
    audio = embed_clips(model, data.input_features, data.is_longer, rows[clips], device, batch_size, autocast)
    text = embed_captions(model, data, captions[texts], device, batch_size, autocast)
    model.train(was_training)
    if ranks.distributed:
        audio = ranks.gather(audio, ranks.sizes(len(rows))).cpu()
        text = ranks.gather(text, ranks.sizes(len(captions))).cpu()
    return retrieval_metrics(audio, text, owner) if ranks.main else None


def config_dict(config: PretrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
