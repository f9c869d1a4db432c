"""Baselines: contrastive adapter and full fine-tuning on toy data and the tiny CLAP (the probe: test_peers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.data_processing import Split
from audio_residual.methods.contrastive_adapter import AdapterOptions, train_contrastive_adapter
from audio_residual.methods.finetune import finetune_audio_encoder
from audio_residual.tasks.loss import symmetric_infonce

N_CLASSES, DIM = 6, 24


pytestmark = pytest.mark.usefixtures("single_thread")


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@pytest.fixture(scope="module")
def separable():
    """Unit-norm embeddings clustered around one random centre per class (like CLAP's, but separable)."""
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(N_CLASSES, DIM, generator=gen), dim=-1)
    labels = torch.arange(240) % N_CLASSES
    emb = F.normalize(centres[labels] + 0.15 * torch.randn(240, DIM, generator=gen), dim=-1)
    return centres, emb, labels


@pytest.fixture(scope="module")
def rotated(separable):
    """Audio embeddings in a rotated space: zero-shot against the class centres is near chance."""
    centres, _, labels = separable
    gen = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen))
    emb = F.normalize(
        centres[labels] @ rotation + 0.15 * torch.randn(len(labels), DIM, generator=gen), dim=-1
    )
    return centres, emb, labels


def test_adapter_at_zero_epochs_is_zero_shot(rotated):
    centres, emb, labels = rotated
    adapter = train_contrastive_adapter(emb, labels, centres, logit_scale=14.3, options=AdapterOptions(epochs=0))
    zero_shot = 14.3 * emb @ centres.T
    torch.testing.assert_close(adapter.logits(emb), zero_shot)
    assert adapter.num_parameters == DIM * DIM + DIM


def test_adapter_learns_rotated_embeddings_deterministically(rotated):
    centres, emb, labels = rotated
    zero_shot = _accuracy(emb[180:] @ centres.T, labels[180:])
    kwargs = dict(val_emb=emb[150:180], val_labels=labels[150:180],
                  options=AdapterOptions(epochs=60, lr=1e-2, batch_size=64), seed=0)
    adapter = train_contrastive_adapter(emb[:150], labels[:150], centres, 20.0, **kwargs)
    again = train_contrastive_adapter(emb[:150], labels[:150], centres, 20.0, **kwargs)
    assert zero_shot < 0.5
    assert _accuracy(adapter.logits(emb[180:]), labels[180:]) >= zero_shot + 0.3
    assert torch.equal(adapter.logits(emb[180:]), again.logits(emb[180:]))


def test_symmetric_infonce_treats_same_label_pairs_as_positives():
    text = torch.eye(3)
    labels = torch.tensor([0, 0, 1, 2])
    aligned = symmetric_infonce(20.0 * text[labels] @ text[labels].T, labels, labels)
    swapped = symmetric_infonce(20.0 * text[torch.tensor([1, 0, 0, 2])] @ text[labels].T, labels, labels)
    # Two clips of class 0 with the same text are both positives: the loss is at its floor, log(2) per clip.
    assert aligned < swapped
    assert aligned.item() == pytest.approx(np.log(2) * 0.5, abs=1e-3)


def test_finetune_copies_the_model_trains_and_counts_params(tiny_bundle, workspace_of_arrays):
    model = tiny_bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = np.random.default_rng(0)
    features = gen.standard_normal((4, 1, 1001, 64)).astype(np.float32)
    features[2:] += 2.0  # two clearly different inputs for the two classes
    ws = workspace_of_arrays(tiny_bundle, features, [0, 0, 1, 1], ("dog", "rain"))
    split = Split(1, np.arange(4), np.arange(4), np.arange(0))  # no validation: every epoch trains on
    tuned = finetune_audio_encoder(ws, split, zero_shot_head=False, epochs=3, lr=1e-3, batch_size=4)
    dim = model.audio_projection.linear2.out_features
    expected = sum(p.numel() for p in model.audio_model.parameters())
    expected += sum(p.numel() for p in model.audio_projection.parameters()) + dim * 2 + 2
    assert tuned.trainable_params == expected
    assert len(tuned.losses) == 3 and tuned.losses[-1] < tuned.losses[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"shared bundle weight {key} changed"
    assert any(
        not torch.equal(p, q)
        for p, q in zip(tuned.model.audio_model.parameters(), model.audio_model.parameters(), strict=True)
    )
    assert tuned.logits(features, np.arange(4), np.zeros(4, dtype=bool)).shape == (4, 2)


def test_finetune_before_training_reproduces_zero_shot(tiny_bundle, workspace_of_arrays):
    from audio_residual.clap.zeroshot import ZeroShotClassifier

    features = np.random.default_rng(1).standard_normal((3, 1, 1001, 64)).astype(np.float32)
    longer = np.zeros(3, dtype=bool)
    ws = workspace_of_arrays(tiny_bundle, features, [0, 0, 0], ("dog", "rain", "sea_waves"))
    rows = np.arange(3)
    tuned = finetune_audio_encoder(ws, Split(1, rows, rows, np.arange(0)), epochs=0)
    zero_shot = ZeroShotClassifier(tiny_bundle, ("dog", "rain", "sea_waves"))  # built apart from the workspace
    expected = zero_shot.logits(zero_shot.embed(features, rows, longer))
    torch.testing.assert_close(tuned.logits(features, rows, longer), expected, rtol=1e-4, atol=1e-4)
