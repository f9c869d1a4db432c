"""Named hook points: exact residual decomposition, selective caching, hooks always removed."""

from __future__ import annotations

import pytest
import torch

from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _check_decomposition(model, batch: int) -> None:
    hooks = ClapHooks(model)
    fusion = model.config.audio_config.enable_fusion
    x = torch.randn(batch, 4 if fusion else 1, 1001, 64)
    is_longer = (torch.arange(batch) == 0).reshape(-1, 1) if fusion else None  # clip 0 takes the fusion branch
    with torch.no_grad():
        embeds, cache = hooks.run_with_cache(x, names=lambda name: True, is_longer=is_longer)
        plain = audio_embeddings(model, x, is_longer)
    assert torch.equal(embeds, plain)  # read-only hooks do not perturb the forward
    for s, b, layer in hooks.blocks():
        p = f"layers.{s}.blocks.{b}."
        heads = cache[p + "attn.hook_result"]
        z = cache[p + "attn.hook_z"]
        assert heads.shape[-2] == z.shape[-2] == layer.attention.self.num_attention_heads
        # Σ_h z_h W_O,hᵀ + b_O equals the attention output, in grid order after undoing windows and shift.
        summed = hooks.to_grid(p + "attn.hook_result", heads.sum(-2) + layer.attention.output.dense.bias)
        attn_out = cache[p + "hook_attn_out"]
        assert (summed.reshape(attn_out.shape) - attn_out).abs().max() <= 1e-5
        # Each head's contribution has rank ≤ d_head.
        singular = torch.linalg.svdvals(heads[..., 0, :].reshape(-1, heads.shape[-1]).double())
        if len(singular) > z.shape[-1]:  # more tokens than d_head: the rank bound is visible
            assert singular[z.shape[-1] :].max() <= 1e-5 * singular[0]
        resid = cache[p + "hook_resid_pre"] + attn_out + cache[p + "hook_mlp_out"]
        assert (resid - cache[p + "hook_resid_post"]).abs().max() <= 1e-5
        assert (cache[p + "hook_resid_pre"] + attn_out - cache[p + "hook_resid_mid"]).abs().max() <= 1e-5


def test_decomposition_exact_on_tiny_model(tiny_bundle):
    _check_decomposition(tiny_bundle.model, batch=2)


def test_decomposition_exact_on_full_size_htsat(htsat_tiny):
    _check_decomposition(htsat_tiny, batch=1)


def test_to_grid_undoes_window_partition_and_shift(tiny_bundle):
    """A hook on z that tags each token with its grid index must come back in grid order."""
    hooks = ClapHooks(tiny_bundle.model)
    x = torch.randn(1, 1001, 64)[None]
    with torch.no_grad():
        _, cache = hooks.run_with_cache(x, names=["layers.0.blocks.1.hook_resid_pre", "layers.0.blocks.1.attn.hook_z"])
    layer = hooks.points["layers.0.blocks.1.attn.hook_z"].layer
    assert layer.shift_size > 0
    # Reproduce the windowed input of attention by hand: layernorm, grid, roll, partition.
    normed = layer.layernorm_before(cache["layers.0.blocks.1.hook_resid_pre"])
    height, width = hooks.encoder.input_resolutions[0]
    v = layer.attention.self.value(normed).view(1, height, width, -1)
    shifted = torch.roll(v, shifts=(-layer.shift_size,) * 2, dims=(1, 2))
    w = layer.window_size
    windows = shifted.view(1, height // w, w, width // w, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, v.shape[-1])
    torch.testing.assert_close(hooks.to_grid("layers.0.blocks.1.attn.hook_z", windows), v)


def test_run_with_cache_returns_only_requested(tiny_bundle):
    hooks = ClapHooks(tiny_bundle.model)
    x = torch.randn(1, 1, 1001, 64)
    with torch.no_grad():
        _, cache = hooks.run_with_cache(x, names="layers.2.*.attn.hook_z")
        _, default = hooks.run_with_cache(x)
    assert sorted(cache) == ["layers.2.blocks.0.attn.hook_z", "layers.2.blocks.1.attn.hook_z"]
    assert not any(name.endswith("hook_result") for name in default)  # opt-in: heads× the memory
    assert len(default) == len(hooks.names) - sum(n.endswith("hook_result") for n in hooks.names)
    with pytest.raises(KeyError, match="unknown hook"):
        hooks.run_with_cache(x, names=["layers.9.blocks.0.hook_mlp_out"])


def test_hooks_removed_even_on_exception(tiny_bundle):
    model = tiny_bundle.model
    before = _hook_count(model)
    hooks = ClapHooks(model)

    def boom(tensor, point):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), hooks.hooks([("layers.1.*", boom)]):
        audio_embeddings(model, torch.randn(1, 1, 1001, 64))
    assert _hook_count(model) == before


def test_editing_hooks_change_the_forward(tiny_bundle):
    model = tiny_bundle.model
    hooks = ClapHooks(model)
    x = torch.randn(1, 1, 1001, 64)
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with hooks.hooks([("layers.3.blocks.0.hook_mlp_out", lambda t, p: torch.zeros_like(t))]):
            ablated = audio_embeddings(model, x)
        _, cache = hooks.run_with_cache(x, names=["layers.3.blocks.0.hook_resid_mid"])
        # With the last MLP zeroed, the block output is its mid residual: check through the final norm.
        encoder = hooks.encoder
        pooled = encoder.norm(cache["layers.3.blocks.0.hook_resid_mid"]).mean(1)
        expected = torch.nn.functional.normalize(model.audio_projection(pooled), dim=-1)
    assert not torch.allclose(plain, ablated)
    torch.testing.assert_close(ablated, expected, rtol=1e-5, atol=1e-5)


def test_read_only_points_refuse_edits(tiny_bundle):
    hooks = ClapHooks(tiny_bundle.model)
    with pytest.raises(RuntimeError, match="read-only"), hooks.hooks([("layers.0.blocks.0.hook_resid_mid", lambda t, p: t * 2)]):
        audio_embeddings(tiny_bundle.model, torch.randn(1, 1, 1001, 64))
