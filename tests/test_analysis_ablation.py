"""Mean ablation of heads: exact no-op for a head with no output, a real change otherwise, hooks removed."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from audio_residual.analysis import ResidualStatistics, head_ablation, head_mean, mean_ablated
from audio_residual.clap.zeroshot import ZeroShotClassifier

BLOCK, HEAD = "layers.2.blocks.0", 1


@pytest.fixture(scope="module")
def setup(tiny_bundle):
    x = np.random.default_rng(0).standard_normal((6, 1, 1001, 64)).astype(np.float32)
    stats = ResidualStatistics.fit(tiny_bundle.model, x, np.arange(4), batch_size=4)
    classifier = ZeroShotClassifier(tiny_bundle, ("dog", "rain", "sea_waves"))
    return x, stats, classifier


def _logits(classifier, x, rows=(4, 5)):
    return classifier.logits(classifier.embed(x, np.asarray(rows)))


def test_ablating_a_head_with_zero_output_weights_changes_nothing(tiny_bundle, setup):
    x, stats, _ = setup
    model = copy.deepcopy(tiny_bundle.model)
    dense = model.audio_model.audio_encoder.layers[2].blocks[0].attention.output.dense
    d_head = stats.head_dim(BLOCK)
    with torch.no_grad():
        dense.weight[:, HEAD * d_head : (HEAD + 1) * d_head] = 0
    classifier = ZeroShotClassifier(dataclasses.replace(tiny_bundle, model=model), ("dog", "rain", "sea_waves"))
    base = _logits(classifier, x)
    with mean_ablated(model, stats, [(BLOCK, HEAD)]):
        ablated = _logits(classifier, x)
    assert torch.equal(ablated, base)
    frame = head_ablation(classifier, x, np.array([0, 1, 2, 0, 1, 2]), [4, 5], stats, stages=(2,))
    row = frame[frame["unit"] == f"{BLOCK}.attn.head.{HEAD}"].iloc[0]
    assert row["delta"] == 0 and row["logit_shift"] == 0 and row["flip_rate"] == 0


def test_ablation_changes_logits_and_leaves_the_model_unchanged(tiny_bundle, setup):
    x, stats, classifier = setup
    model = tiny_bundle.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    base = _logits(classifier, x)
    with mean_ablated(model, stats, [(BLOCK, HEAD)]):
        ablated = _logits(classifier, x)
    assert float((ablated - base).abs().max()) > 1e-4
    assert torch.equal(_logits(classifier, x), base)  # the hook is gone
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_mean_ablation_sets_the_context_to_the_training_mean(tiny_bundle, setup):
    x, stats, _ = setup
    from audio_residual.clap.hooks import ClapHooks

    seen = {}
    with mean_ablated(tiny_bundle.model, stats, [(BLOCK, HEAD)]):
        with ClapHooks(tiny_bundle.model).hooks([(f"{BLOCK}.attn.hook_z", lambda z, p: seen.update(z=z.clone()))]):
            with torch.no_grad():
                _logits(setup[2], x, rows=(4,))
    expected = head_mean(stats, BLOCK, HEAD).float().expand_as(seen["z"][..., HEAD, :])
    assert torch.equal(seen["z"][..., HEAD, :], expected)
    assert not torch.equal(seen["z"][..., 0, :], head_mean(stats, BLOCK, 0).float().expand_as(expected))


def test_head_ablation_frame(setup):
    x, stats, classifier = setup
    labels = np.array([0, 1, 2, 0, 1, 2])
    frame = head_ablation(classifier, x, labels, [0, 3, 4, 5], stats, stages=(3,), max_clips=3)
    n_heads = sum(stats.num_heads(b) for b in stats.blocks_of(3))
    assert len(frame) == n_heads and (frame["stage"] == 3).all() and (frame["clips"] == 3).all()
    np.testing.assert_allclose(frame["delta"], frame["accuracy"] - frame["base_accuracy"])
    assert [c for c in frame.columns if c.startswith("delta:")] == ["delta:dog", "delta:rain", "delta:sea_waves"]
    assert ((frame["flip_rate"] >= 0) & (frame["flip_rate"] <= 1)).all() and (frame["logit_shift"] > 0).all()
    with pytest.raises(ValueError, match="stage"):
        head_ablation(classifier, x, labels, [4, 5], stats, stages=(7,))
