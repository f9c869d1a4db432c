"""The one training loop: its selection rule (epoch 0 included, ties to the earlier epoch), and every
gradient-trained method keeping its untrained start when training on permuted labels cannot help."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.clap.loading import ModelSource
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.data_processing import Split
from audio_residual.methods.contrastive_adapter import AdapterOptions, train_contrastive_adapter
from audio_residual.methods.coop import CoOpOptions, train_coop
from audio_residual.methods.finetune import finetune_audio_encoder
from audio_residual.methods.lora import LoraOptions, train_lora
from audio_residual.methods.tip_adapter import TipAdapterFOptions, train_tip_adapter_f
from audio_residual.tasks import CLASSIFICATION
from audio_residual.training import TrainConfig, train_residual_fold
from audio_residual.training.loop import Steps, row_batches, train
from audio_residual.workspace import Workspace

NAMES = ("dog", "rain", "sea_waves")


def _toy(scores):
    param = torch.nn.Parameter(torch.zeros(3))
    values = iter(scores)
    steps = Steps({"p": param}, row_batches(np.arange(10), 4), lambda rows: ((param - 1) ** 2).sum(),
                  lambda: next(values), torch.optim.SGD([param], lr=0.1))  # fmt: skip
    return param, steps


def test_loop_keeps_the_start_on_ties_and_stops_with_patience():
    param, steps = _toy([0.5] * 10)
    result = train(steps, epochs=10, patience=3)
    assert result.best_epoch == 0 and len(result.history) == 3
    assert torch.equal(param.detach(), torch.zeros(3))


def test_loop_selects_the_best_validation_epoch_and_restores_it():
    param, steps = _toy([0.1, 0.5, 0.7, 0.7, 0.2])
    after = []
    steps.record = lambda: after.append(param.detach().clone()) or {}
    result = train(steps, epochs=4, metric="accuracy")
    assert result.best_epoch == 2 and result.best_score == 0.7  # epoch 3 ties: the earlier epoch is kept
    assert [h["val_accuracy"] for h in result.history] == [0.5, 0.7, 0.7, 0.2]
    assert torch.equal(param.detach(), after[1])


def test_loop_shuffles_from_its_seed_only():
    seen = []
    param = torch.nn.Parameter(torch.zeros(1))
    draw = row_batches(np.arange(8), 8)
    steps = Steps({"p": param}, lambda g: seen.append(draw(g)[0].tolist()) or [], lambda b: param.sum(), None,
                  torch.optim.SGD([param], lr=0.1))  # fmt: skip
    torch.manual_seed(1)
    train(steps, epochs=2, seed=5)
    torch.manual_seed(2)
    train(steps, epochs=2, seed=5)
    assert seen[:2] == seen[2:] and seen[0] != seen[1]


def _rotated(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Every training label moved to another class: training on them can only hurt."""
    return (labels + 1) % n_classes


def test_embedding_methods_keep_their_start_on_permuted_training_labels():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    labels = torch.arange(60) % 3
    emb = F.normalize(centres[labels] + 0.05 * torch.randn(60, 16, generator=gen), dim=-1)
    train_set, val = (emb[:40], _rotated(labels[:40], 3)), (emb[40:], labels[40:])  # zero-shot: all right on val
    adapter = train_contrastive_adapter(*train_set, centres, 20.0, *val, AdapterOptions(epochs=5, lr=0.1, batch_size=8))
    assert torch.equal(adapter.delta, torch.zeros(16, 16)) and torch.equal(adapter.bias, torch.zeros(16))
    tip = train_tip_adapter_f(*train_set, centres, 20.0, *val, TipAdapterFOptions(epochs=5, lr=0.1, batch_size=8))
    assert tip.best_epoch == 0 and torch.equal(tip.keys.detach(), F.normalize(train_set[0], dim=-1))


def test_coop_keeps_its_start_on_permuted_training_labels(tiny_bundle):
    start = train_coop(tiny_bundle, NAMES, torch.zeros(0, 1), torch.zeros(0), options=CoOpOptions(epochs=0))
    labels = torch.arange(30) % 3
    emb = start.class_embeddings[labels]  # each clip at its class's prompt: zero-shot is right on every clip
    coop = train_coop(tiny_bundle, NAMES, emb[:18], _rotated(labels[:18], 3), emb[18:], labels[18:],
                      options=CoOpOptions(epochs=4, lr=0.5, batch_size=6))
    assert coop.best_epoch == 0 and torch.equal(coop.learner.ctx.detach(), start.learner.ctx.detach())


@pytest.fixture(scope="module")
def clips():
    features = np.random.default_rng(0).standard_normal((8, 1, 1001, 64)).astype(np.float32)
    return features, np.zeros(8, dtype=bool)


def _zero_shot_labels(bundle, features, longer):
    zero_shot = ZeroShotClassifier(bundle, NAMES)
    predicted = zero_shot.logits(zero_shot.embed(features, np.arange(len(features)), longer)).argmax(1).numpy()
    labels = predicted.copy()
    labels[:5] = (predicted[:5] + 1) % 3  # training clips 0-4 permuted, validation clips 5-7 as zero-shot says
    return zero_shot, labels


def test_finetuning_and_lora_keep_their_start_on_permuted_training_labels(tiny_bundle, clips, workspace_of_arrays):
    features, longer = clips
    zero_shot, labels = _zero_shot_labels(tiny_bundle, features, longer)
    ws = workspace_of_arrays(tiny_bundle, features, labels, NAMES)
    split = Split(1, np.arange(5), np.arange(5, 8), np.arange(5, 8))
    tuned = finetune_audio_encoder(ws, split, epochs=2, lr=1e-3, head_lr=1e-1, batch_size=2)
    assert tuned.val_accuracy == 1.0
    torch.testing.assert_close(tuned.model.head.weight, zero_shot.logit_scale * zero_shot.class_embeddings)
    lora = train_lora(ws, CLASSIFICATION, split, LoraOptions(ranks=(2,), epochs=2, lr=1e-1, batch_size=2))
    lora_b = [p for name, p in lora.tower.named_parameters() if "lora_B" in name]
    assert lora.val_score == 1.0 and lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


def test_residual_keeps_its_start_on_permuted_training_labels(synthetic_esc50, tmp_path):
    ws = Workspace.open(synthetic_esc50, ModelSource("tiny-random", device="cpu"), cache_dir=tmp_path / "cache")
    split = ws.splits(val_fraction=0.2)[0]
    rows = ws.valid_indices()
    predicted = np.zeros(len(ws.table), dtype=np.int64)
    predicted[rows] = ws.classifier.logits(ws.embed(rows)).argmax(1).numpy()
    labels = predicted.copy()
    labels[split.train] = (predicted[split.train] + 1) % len(ws.table.class_names)
    permuted = dataclasses.replace(ws, table=dataclasses.replace(ws.table, labels=labels))
    config = TrainConfig(granularity="layer", epochs=3, lr=0.3, batch_size=12, schedule="constant")
    result = train_residual_fold(permuted, split, config)
    assert result.best_epoch == 0 and result.val_score == 1.0
