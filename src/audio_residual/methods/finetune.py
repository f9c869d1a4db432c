"""Full fine-tuning, the expensive upper baseline, for both tasks.

Classification: a deep copy of the audio encoder and projection with a linear head that starts as the zero-shot
classifier, cross-entropy. Retrieval: `pretrain` (contrastive CLAP training) continued from the study's own
model on its training split, the text tower frozen by default. Meant for a GPU (AMP through `bundle.autocast()`);
it runs on the CPU too, slowly, which the tests use on the tiny model. The shared frozen bundle is never touched.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from audio_residual.clap.batches import batches
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle, load_clap
from audio_residual.clap.zeroshot import text_embeddings
from audio_residual.data_processing import Split
from audio_residual.io import atomic_path
from audio_residual.methods.base import Method, keyword_defaults, register
from audio_residual.methods.lora import batchnorm_frozen_mode
from audio_residual.tasks import CLASSIFICATION, RETRIEVAL
from audio_residual.tasks.retrieval import dot_scorer
from audio_residual.training.loop import Steps, train
from audio_residual.training.pretrain import PretrainConfig, trainable_parameters
from audio_residual.training.pretrain_run import PROVENANCE_FILE, PretrainRun, PretrainSource, pretrain
from audio_residual.workspace import Workspace


class AudioClassifier(nn.Module):
    """A trainable copy of the audio encoder + projection, followed by a linear head on normalised embeddings."""

    def __init__(self, audio_model: nn.Module, audio_projection: nn.Module, n_classes: int, dim: int):
        super().__init__()
        self.audio_model = audio_model
        self.audio_projection = audio_projection
        self.head = nn.Linear(dim, n_classes)

    def forward(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(audio_embeddings(self, input_features, is_longer))


@dataclass
class FineTuned:
    """The trained classifier, its trainable-parameter count and the per-step training losses."""

    model: AudioClassifier
    bundle: ClapBundle
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    val_accuracy: float | None = None

    def logits(self, input_features, indices, is_longer=None, batch_size: int = 32) -> torch.Tensor:
        """Logits of the selected rows of a (memory-mapped) feature array, on the CPU."""
        return classifier_logits(
            self.model, self.bundle, input_features, indices, is_longer, batch_size, self.model.head.out_features
        )


@torch.no_grad()
def classifier_logits(
    model: nn.Module, bundle: ClapBundle, input_features, indices, is_longer, batch_size: int, n_classes: int
) -> torch.Tensor:
    """Eval-mode logits of an audio classifier (fine-tuned or LoRA) on the selected rows, on the CPU."""
    model.eval()
    out = []
    for _, x, longer in batches(input_features, indices, batch_size, bundle.device, is_longer):
        with bundle.autocast():
            out.append(model(x, longer).float().cpu())
    return torch.cat(out) if out else torch.empty(0, n_classes)


def _steps(model: AudioClassifier, ws: Workspace, split: Split, batch_size: int, optimizer, losses: list[float]
           ) -> Steps:
    """The training loop's side of the classifier: cross-entropy under the bundle's autocast (loss scaled for
    fp16), validation accuracy; `losses` collects the step losses."""
    bundle, features = ws.bundle, ws.features
    scaler = torch.amp.GradScaler("cuda", enabled=bundle.amp_dtype == torch.float16 and bundle.device.type == "cuda")
    labels = ws.table.labels

    def loss(batch) -> torch.Tensor:
        x, longer = ws.batch(batch.rows)
        with bundle.autocast():
            logits = model(x, longer)
        value = F.cross_entropy(logits.float(), torch.from_numpy(labels[batch.rows]).to(bundle.device))
        losses.append(float(value.detach()))
        return value

    def validate() -> float:
        logits = classifier_logits(model, bundle, features.input_features, split.val, features.is_longer, batch_size, 0)
        return float((logits.argmax(1).numpy() == labels[np.asarray(split.val)]).mean())

    return Steps(
        params={name: p for name, p in model.named_parameters() if p.requires_grad},
        batches=CLASSIFICATION.batches(ws, split.train, batch_size),
        loss=loss,
        validate=validate if len(split.val) > 0 else None,
        optimizer=optimizer,
        scaler=scaler,
        mode=batchnorm_frozen_mode(model),
    )


def finetune_audio_encoder(
    ws: Workspace,
    split: Split,
    zero_shot_head: bool = True,
    epochs: int = 5,
    lr: float = 1e-5,
    head_lr: float = 1e-3,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    seed: int = 0,
) -> FineTuned:
    """Fine-tune a deep copy of the audio encoder + projection and a linear head with cross-entropy.

    With `zero_shot_head`, the head starts as the zero-shot classifier (weights = logit scale × class text
    embeddings), so training starts from CLAP's own predictions; otherwise it is random. The encoder gets a
    small learning rate, the head a larger one. With a validation split, the returned weights are those of the
    epoch the training loop selects (epoch 0, the zero-shot head, included).
    """
    bundle, source = ws.bundle, ws.bundle.model
    n_classes, dim = len(ws.table.class_names), source.audio_projection.linear2.out_features
    with torch.random.fork_rng(devices=[]):  # a random head is drawn from `seed`, the global stream untouched
        torch.manual_seed(seed)
        model = AudioClassifier(copy.deepcopy(source.audio_model), copy.deepcopy(source.audio_projection), n_classes, dim)
    model = model.to(bundle.device).requires_grad_(True)
    if zero_shot_head:
        with torch.no_grad():
            model.head.weight.copy_(ws.classifier.logit_scale * ws.classifier.class_embeddings)
            model.head.bias.zero_()
    encoder_params = [*model.audio_model.parameters(), *model.audio_projection.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": lr}, {"params": model.head.parameters(), "lr": head_lr}],
        weight_decay=weight_decay,
    )
    result = FineTuned(model, bundle, sum(p.numel() for p in model.parameters() if p.requires_grad))
    steps = _steps(model, ws, split, batch_size, optimizer, result.losses)
    result.val_accuracy = train(steps, epochs, seed, desc="fine-tuning", metric="accuracy").best_score
    model.eval().requires_grad_(False)
    return result


@register
class FineTune(Method):
    """Classification: the encoder and a zero-shot-initialised linear head, cross-entropy."""

    name = "finetune"
    defaults = keyword_defaults(finetune_audio_encoder, "seed")

    def fit(self, ctx):
        return finetune_audio_encoder(ctx.ws, ctx.split, seed=ctx.seed, **ctx.options)

    def scores(self, model, ctx, rows):
        features = ctx.ws.features
        return model.logits(features.input_features, rows, features.is_longer)

    def trainable_params(self, model) -> int:
        return model.trainable_params


@dataclass
class TunedClap:
    """A CLAP trained further by `pretrain`: the tuned bundle, what trained, and its epoch record."""

    bundle: ClapBundle
    trainable_params: int
    best_epoch: int
    val_score: float
    folder: Path | None = None  # its `save_pretrained` folder

    def text(self, texts) -> torch.Tensor:
        return torch.cat([text_embeddings(self.bundle, texts[s : s + 256]).cpu() for s in range(0, len(texts), 256)])


def finetune_clap(ws: Workspace, out: Path, freeze: str = "text", epochs: int = 5, lr: float = 1e-5,
                  batch_size: int = 32, seed: int = 0) -> TunedClap:
    """Continue contrastive training of the workspace's model on its training split (validation picks the
    epoch, the start included); the tuned model is a `save_pretrained` folder under `out`."""
    config = PretrainConfig(epochs=epochs, batch_size=max(2, batch_size), lr=lr, freeze=freeze, seed=seed)
    run = PretrainRun(out=Path(out), cache_dir=ws.cache_dir, audio=ws.audio, device=str(ws.bundle.device),
                      wandb="disabled")
    folder = pretrain(ws.table, PretrainSource(config=None, bundle=ws.bundle), config, run)
    tuned = load_clap(folder, device=ws.bundle.device)
    provenance = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    best = provenance["best_epoch"]
    params = sum(p.numel() for p in trainable_parameters(tuned.model, freeze).values())
    tuned.model.requires_grad_(False)
    return TunedClap(tuned, params, best, provenance["epochs"][best]["mean_r1"], folder)


@register
class FineTuneClap(Method):
    """Retrieval: `pretrain` continued from the study's checkpoint (text tower frozen by default)."""

    name = "finetune"
    tasks = ("retrieval",)
    by_default = ("retrieval",)
    transferable = True
    defaults = keyword_defaults(finetune_clap, "seed")

    def fit(self, ctx):
        out = Path(ctx.layout.root) / "finetune" / (ctx.key or "run")  # one folder per key: reruns never clash
        return finetune_clap(ctx.ws, out, seed=ctx.seed, **ctx.options)

    def save(self, model: TunedClap, path: Path) -> None:
        """A pointer to the tuned model's `save_pretrained` folder (written by `pretrain`), not a second copy."""
        with atomic_path(path) as tmp:
            save_file({}, str(tmp), metadata={"folder": str(model.folder), "trainable_params": str(model.trainable_params),
                                             "best_epoch": str(model.best_epoch), "val_score": str(model.val_score)})

    def load(self, path: Path, ws) -> TunedClap:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tuned = load_clap(meta["folder"], device=ws.bundle.device)
        tuned.model.requires_grad_(False)
        return TunedClap(tuned, int(meta["trainable_params"]), int(meta["best_epoch"]), float(meta["val_score"]),
                         Path(meta["folder"]))

    def embed(self, model: TunedClap, ws, rows):
        return ws.embed(rows, model=model.bundle.model)

    def scores(self, model: TunedClap, ctx, rows):
        """The tuned audio against the tuned text tower (the same as CLAP's when it stayed frozen)."""
        return dot_scorer(self.embed(model, ctx.ws, rows), model.text(RETRIEVAL.texts(ctx.ws, rows)))

    def transfer_scores(self, model: TunedClap, target, rows):
        prompts = CLASSIFICATION.texts(target, rows)
        return CLASSIFICATION.scores(target, self.embed(model, target, rows), rows, _ensembled(model, target, prompts))

    def trainable_params(self, model: TunedClap) -> int:
        return model.trainable_params

    def details(self, model: TunedClap) -> dict:
        return {"best_epoch": model.best_epoch, "val_score": model.val_score}


def _ensembled(model: TunedClap, target: Workspace, prompts: list[str]) -> torch.Tensor:
    """The tuned text tower's class embeddings of `target`, its templates averaged (CLIP's ensembling)."""
    n = len(target.table.class_names)
    per_template = model.text(prompts).reshape(-1, n, model.bundle.model.config.projection_dim)
    return F.normalize(per_template.mean(0), dim=-1)
