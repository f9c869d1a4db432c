"""The earlier project's three defects, each pinned by a test that would fail on its code.

1. each patched block was applied twice (shortcut added twice, MLP re-run);
2. the PCA mean was dropped, so λ = 1 was not the identity;
3. λ was trained on unscaled cosine logits instead of CLAP's logit-scaled ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks
from audio_residual.residual.units import ResiDual, ResidualConfig
from audio_residual.training import TrainConfig, train_residual_fold
from audio_residual.workspace import Workspace


@pytest.fixture(scope="module")
def features():
    return torch.randn(10, 1, 1001, 64, generator=torch.Generator().manual_seed(3)).numpy()


@pytest.fixture(scope="module")
def stats(tiny_bundle, features):
    return ResidualStatistics.fit(tiny_bundle.model, features, np.arange(8), batch_size=4)


def test_each_block_is_edited_once_and_its_mlp_runs_once(tiny_bundle, stats, features):
    """λ = 3 on block 0's attention: its output must be u + 2 Φᵀ Φ (u − μ) (once, not twice), and the
    block output must equal the shortcut + edited attention + one MLP pass on that sum."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[8:])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block", stages=(0,), k=4))
    with torch.no_grad():
        for p in residual.lambdas.values():
            p.fill_(3.0)
    hooks = ClapHooks(model)
    names = ["layers.0.blocks.0." + s for s in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad():
        u = hooks.run_with_cache(x, names=["layers.0.blocks.0.hook_attn_out"])[1]["layers.0.blocks.0.hook_attn_out"]
        mlp_calls = []
        layer = hooks.encoder.layers[0].blocks[0]
        counter = layer.output.register_forward_hook(lambda *_: mlp_calls.append(1))
        try:
            with residual.attached(model):
                _, cache = hooks.run_with_cache(x, names=names)
        finally:
            counter.remove()
    basis = stats.pca("block", "attn", (0,))["layers.0.blocks.0.attn"].prune(k=4)
    u = u.double()
    expected_attn = u + 2 * ((u - basis.mean) @ basis.components.T) @ basis.components
    pre, mid, mlp, post = (cache[n].double() for n in names)
    assert (mid - pre - expected_attn).abs().max() <= 1e-5
    assert (post - mid - mlp).abs().max() <= 1e-5
    assert len(mlp_calls) == 1


def test_lambda_one_is_the_identity_only_because_the_mean_is_kept(tiny_bundle, stats, features):
    """With μ the edit at λ = 1 is exactly zero; the earlier code's mean-free form u + Φᵀ(λ−1)Φu would
    also be zero at λ = 1, so check the λ ≠ 1 case too: the edit must be centred (zero on μ itself)."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[8:])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block"))
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with residual.attached(model):
            assert (audio_embeddings(model, x) - plain).abs().max() <= 1e-5
    site = next(s for s in residual.sites if s.hook.endswith("hook_attn_out"))
    with torch.no_grad():
        residual.lambdas[site.group].fill_(0.25)
        mean = getattr(residual, site.buffers["mean"])
        torch.testing.assert_close(residual.edit(mean[None, None], site)[0, 0], mean, rtol=0, atol=1e-6)


def test_training_loss_uses_logit_scaled_similarities(synthetic_esc50, tmp_path, monkeypatch):
    ws = Workspace.open(synthetic_esc50, model="tiny-random", cache_dir=tmp_path, device="cpu")
    split = ws.splits(val_fraction=0.2)[0]
    seen = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, y, *a, **k: seen.append(logits.detach()) or real(logits, y, *a, **k))
    config = TrainConfig(granularity="layer", epochs=1, batch_size=len(split.train), lr=1e-3)
    import audio_residual.tasks.classification as classification  # the task's loss is what training uses

    order = split.train[torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0)).numpy()]
    train_residual_fold(ws, split, config)
    assert classification.F is F and seen
    with torch.no_grad():
        plain = audio_embeddings(ws.bundle.model, torch.from_numpy(np.asarray(ws.features.input_features[order])))
    expected = ws.classifier.logits(plain)  # λ = 1 at the first step: exactly zero-shot logits
    assert ws.classifier.logit_scale == pytest.approx(float(ws.bundle.model.logit_scale_a.exp()))
    assert ws.classifier.logit_scale > 10
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-4)
