"""ResiDual units: identity at λ=1, exact edits, parameter counts, persistence, folds-only fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks
from audio_residual.residual.units import ResiDual, ResidualConfig


@pytest.fixture(scope="module")
def features():
    return torch.randn(12, 1, 1001, 64, generator=torch.Generator().manual_seed(0)).numpy()


@pytest.fixture(scope="module")
def stats(tiny_bundle, features):
    """Fitted on 10 clips: enough tokens (16 per clip in the last stage) for full-rank covariances."""
    return ResidualStatistics.fit(tiny_bundle.model, features, np.arange(10), batch_size=5)


CONFIGS = [
    dict(granularity="head"),
    dict(granularity="head", evr=0.9),
    dict(granularity="head", coarse=True),
    dict(granularity="block", kinds=("attn", "mlp")),
    dict(granularity="layer"),
    dict(granularity="layer", kinds=("mlp",), k=3, stages=(1, 3)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_identity_at_lambda_one(tiny_bundle, stats, features, cfg):
    model = tiny_bundle.model
    x = torch.from_numpy(features)
    residual = ResiDual.from_statistics(stats, ResidualConfig(**cfg))
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with residual.attached(model):
            edited = audio_embeddings(model, x)
        after = audio_embeddings(model, x)
    assert (edited - plain).abs().max() <= 1e-5
    assert torch.equal(after, plain)  # detaching restores the exact original model


def test_randn_init_moves_the_model_and_detach_restores_it(tiny_bundle, stats, features):
    model = tiny_bundle.model
    x = torch.from_numpy(features[:2])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="head", init="randn"))
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with residual.attached(model):
            edited = audio_embeddings(model, x)
        assert (edited - plain).abs().max() > 1e-3
        assert torch.equal(audio_embeddings(model, x), plain)


def _capture(model, x, name):
    with torch.no_grad():
        return ClapHooks(model).run_with_cache(x, names=[name])[1][name]


def test_lambda_zero_removes_centred_component_block(tiny_bundle, stats, features):
    """Block unit at λ=0: the first block's attention output loses Φᵀ Φ (u − μ), computed here by hand."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[:2])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block", stages=(0,), k=5))
    with torch.no_grad():
        for p in residual.lambdas.values():
            p.zero_()
    name = "layers.0.blocks.0.hook_attn_out"
    u = _capture(model, x, name).double()
    basis = stats.pca("block", "attn", (0,))["layers.0.blocks.0.attn"].prune(k=5)
    expected = u - ((u - basis.mean) @ basis.components.T) @ basis.components
    # The edited activation as it leaves drop_path (after every pre-hook, ResiDual's included).
    seen = {}
    hook = model.audio_model.audio_encoder.layers[0].blocks[0].drop_path.register_forward_hook(
        lambda _m, _args, out: seen.setdefault("u", out.detach())
    )
    try:
        with torch.no_grad(), residual.attached(model):
            audio_embeddings(model, x)
    finally:
        hook.remove()
    assert (seen["u"].double() - expected).abs().max() <= 1e-5


def test_lambda_zero_removes_centred_component_head(tiny_bundle, stats, features):
    """Head unit at λ=0: head h's contribution becomes W_O,h z_h − Φᵀ Φ (W_O,h z_h − μ)."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[:2])
    block, head = "layers.2.blocks.1", 2
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="head", stages=(2,), k=6))
    group = "layers_2_blocks_1_attn_heads"
    index = getattr(residual, f"{group}__index")
    with torch.no_grad():
        residual.lambdas[group][index[head][index[head] >= 0]] = 0.0
    name = f"{block}.attn.hook_result"
    contribution = _capture(model, x, name)[..., head, :].double()
    basis = stats.head_pca(block, head).prune(k=6)
    expected = contribution - ((contribution - basis.mean) @ basis.components.T) @ basis.components
    with torch.no_grad(), residual.attached(model):
        edited = _capture(model, x, name)
    assert (edited[..., head, :].double() - expected).abs().max() <= 1e-5
    other = _capture(model, x, name)[..., 0, :]
    assert (edited[..., 0, :] - other).abs().max() <= 1e-6  # other heads untouched


def test_parameter_counts_match_formula(stats):
    heads = {b: stats.num_heads(b) for b in stats.blocks}
    head_dims = {b: stats.head_dim(b) for b in stats.blocks}
    widths = {b: stats.w_out[b].shape[0] for b in stats.blocks}
    stages = stats.stages()
    assert ResiDual.from_statistics(stats, ResidualConfig(granularity="head")).num_parameters() == sum(
        heads[b] * head_dims[b] for b in stats.blocks
    )
    assert ResiDual.from_statistics(stats, ResidualConfig(granularity="head", k=3)).num_parameters() == 3 * sum(
        heads.values()
    )
    assert ResiDual.from_statistics(stats, ResidualConfig(granularity="head", coarse=True)).num_parameters() == sum(
        heads.values()
    )
    # Attention reads a LayerNorm'd input, which spans d − 1 directions: its output has rank ≤ d − 1, and a
    # λ for the missing direction would be spent on float32 noise.
    kept = {(g, kind): {n: len(b.eigenvalues) for n, b in stats.pca(g, kind).items()}
            for g in ("block", "layer") for kind in ("attn", "mlp")}
    block = ResiDual.from_statistics(stats, ResidualConfig(granularity="block")).num_parameters()
    assert block == sum(kept["block", "attn"].values()) <= sum(widths.values()) - len(widths)
    layer = ResiDual.from_statistics(stats, ResidualConfig(granularity="layer", kinds=("attn", "mlp")))
    assert layer.num_parameters() == sum(kept["layer", "attn"].values()) + sum(kept["layer", "mlp"].values())
    assert layer.num_parameters() <= 2 * sum(widths[stats.blocks_of(s)[0]] for s in stages)
    stage0 = ResiDual.from_statistics(stats, ResidualConfig(granularity="layer", stages=(0,)))
    assert stage0.num_parameters() == kept["layer", "attn"]["layers.0.attn"] <= widths["layers.0.blocks.0"]
    pruned = ResiDual.from_statistics(stats, ResidualConfig(granularity="head", evr=0.9))
    evr_k = [len(b.prune(evr=0.9).eigenvalues) for b in stats.pca("head").values()]
    assert pruned.num_parameters() == sum(evr_k) < sum(heads[b] * head_dims[b] for b in stats.blocks)


def test_gradients_reach_lambda_only(tiny_bundle, stats, features):
    model = tiny_bundle.model
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="head", init="randn"))
    with residual.attached(model):
        loss = audio_embeddings(model, torch.from_numpy(features[:2]))[:, 0].sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in residual.lambdas.values())
    assert all(p.grad is None for p in model.parameters())
    assert not any(b.requires_grad for b in residual.buffers())


def test_save_load_round_trip(tiny_bundle, stats, features, tmp_path):
    model = tiny_bundle.model
    x = torch.from_numpy(features[:2])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="layer", kinds=("attn", "mlp"), init="randn"))
    path = residual.save(tmp_path / "lambda.safetensors", metadata={"fold": 1})
    loaded = ResiDual.load(path)
    assert loaded.config == residual.config and loaded.units == residual.units
    for group in residual.lambdas:
        assert torch.equal(loaded.lambdas[group], residual.lambdas[group])
    with torch.no_grad():
        with residual.attached(model):
            a = audio_embeddings(model, x)
        with loaded.attached(model):
            b = audio_embeddings(model, x)
    assert torch.equal(a, b)


def test_test_fold_audio_does_not_change_the_basis(tiny_bundle, features):
    train = np.arange(3)
    changed = features.copy()
    changed[3:] = np.random.default_rng(1).normal(size=changed[3:].shape)
    a = ResidualStatistics.fit(tiny_bundle.model, features, train, batch_size=2)
    b = ResidualStatistics.fit(tiny_bundle.model, changed, train, batch_size=2)
    ra = ResiDual.from_statistics(a, ResidualConfig(granularity="head"))
    rb = ResiDual.from_statistics(b, ResidualConfig(granularity="head"))
    for (name, buf_a), (_, buf_b) in zip(ra.named_buffers(), rb.named_buffers(), strict=True):
        assert torch.equal(buf_a, buf_b), name


@pytest.mark.parametrize(
    "cfg, message",
    [
        (dict(granularity="neuron"), "granularity"),
        (dict(granularity="head", kinds=("mlp",)), "no heads"),
        (dict(kinds=("conv",)), "kinds"),
        (dict(init="zeros"), "init"),
        (dict(evr=1.5), "evr"),
        (dict(k=0), "k must"),
    ],
)
def test_bad_config_is_a_clear_error(cfg, message):
    with pytest.raises(ValueError, match=message):
        ResidualConfig(**cfg)


def test_unknown_stage_is_a_clear_error(stats):
    with pytest.raises(ValueError, match="stage"):
        ResiDual.from_statistics(stats, ResidualConfig(stages=(7,)))


def test_identity_at_lambda_one_on_full_size_htsat(htsat_tiny):
    x = torch.randn(1, 1, 1001, 64, generator=torch.Generator().manual_seed(5))
    full_stats = ResidualStatistics.fit(htsat_tiny, x.numpy(), np.arange(1), batch_size=1)
    residual = ResiDual.from_statistics(full_stats, ResidualConfig(granularity="head"))
    with torch.no_grad():
        plain = audio_embeddings(htsat_tiny, x)
        with residual.attached(htsat_tiny):
            edited = audio_embeddings(htsat_tiny, x)
    assert residual.num_parameters() > 1000
    assert (edited - plain).abs().max() <= 1e-5
