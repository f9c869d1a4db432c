"""The audio encode path: frame tokens, pooled output and embedding, from log-mels or from a stage input.

The encoder tail of `encode_from_stage` is copied from transformers; these tests hold it to transformers' own
`ClapAudioEncoder.forward`, so an upstream change that the copy misses fails here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from audio_residual.clap.encode import (
    audio_embeddings,
    audio_encoder,
    encode_audio,
    encode_from_stage,
    stage_input,
)
from audio_residual.clap.tiny import build_tiny_clap


def _inputs(fusion: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Three random log-mel clips; a fused model gets one long clip (local crops) among short ones."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4 if fusion else 1, 1001, 64, generator=generator)
    return x, (torch.tensor([[True], [False], [False]]) if fusion else None)


@pytest.fixture(scope="module", params=[False, True], ids=["unfused", "fused"])
def tiny(request, single_thread):
    model = build_tiny_clap(("dog", "rain"), enable_fusion=request.param)[0].eval()
    return model, *_inputs(request.param)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_encoder_tail_copied_from_transformers_equals_its_forward(tiny, stage):
    model, x, is_longer = tiny
    with torch.no_grad():
        reference = model.audio_model(input_features=x, is_longer=is_longer)
        encoding = encode_from_stage(model, stage_input(model, x, stage, is_longer), stage)
    _close(encoding.token_map(), reference.last_hidden_state)
    _close(encoding.pooled, reference.pooler_output)
    _close(encoding.embedding, F.normalize(model.audio_projection(reference.pooler_output), dim=-1))


def test_encode_audio_returns_transformers_outputs_as_tokens(tiny):
    model, x, is_longer = tiny
    with torch.no_grad():
        reference = model.audio_model(input_features=x, is_longer=is_longer)
        encoding = encode_audio(model, x, is_longer)
        embeddings = audio_embeddings(model, x, is_longer)
    channels, freq, time = reference.last_hidden_state.shape[1:]
    assert encoding.grid == (freq, time) and encoding.tokens.shape == (3, freq * time, channels)
    assert torch.equal(encoding.token_map(), reference.last_hidden_state)
    assert torch.equal(encoding.tokens[:, 1], reference.last_hidden_state[:, :, 0, 1])  # token f·T + t
    assert torch.equal(encoding.pooled, reference.pooler_output)
    assert torch.equal(encoding.embedding, embeddings)  # the embedding path is unchanged, bit for bit
    _close(encoding.tokens.mean(1), encoding.pooled)
    assert encoding.embedding.dtype == torch.float32
    _close(encoding.embedding.norm(dim=-1), torch.ones(3))


def test_htsat_geometry_tokens_are_two_mel_halves_by_32_time_steps(htsat_tiny, single_thread):
    """The real HTSAT: last_hidden_state (batch, 768, 2, 32) (LAION-AI/CLAP#135), 64 tokens per clip."""
    x = torch.randn(1, 1, 1001, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = htsat_tiny.audio_model(input_features=x)
        encoding = encode_from_stage(htsat_tiny, stage_input(htsat_tiny, x, 3), 3)
    assert encoding.grid == (2, 32) and encoding.tokens.shape == (1, 64, 768)
    _close(encoding.token_map(), reference.last_hidden_state)
    _close(encoding.pooled, reference.pooler_output)


def test_gradients_reach_the_log_mel_and_the_stage_input(tiny):
    """Saliency differentiates tokens and embedding w.r.t. the input log-mel; λ training through a prefix."""
    model, x, is_longer = tiny
    x = x.clone().requires_grad_(True)
    encoding = encode_audio(model, x, is_longer)
    for output in (encoding.tokens, encoding.pooled, encoding.embedding):
        (grad,) = torch.autograd.grad(output[0].square().sum(), x, retain_graph=True)
        assert grad[0].abs().sum() > 0 and torch.equal(grad[1:], torch.zeros_like(grad[1:]))  # clips stay apart
    hidden = stage_input(model, x.detach(), 2, is_longer).requires_grad_(True)
    (grad,) = torch.autograd.grad(encode_from_stage(model, hidden, 2).tokens.sum(), hidden)
    assert grad.abs().sum() > 0


def test_stage_input_names_the_valid_stages(tiny):
    model, x, is_longer = tiny
    with pytest.raises(ValueError, match=r"stage 0\.\.3, got 4"):
        stage_input(model, x, 4, is_longer)


def test_token_order_is_mel_half_major_with_time_steps_in_order(htsat_tiny, single_thread):
    """The documented order, checked on HTSAT's geometry: token f·32 + t is mel half f, frames 32t..32t+31."""
    encoder = audio_encoder(htsat_tiny)
    # reshape_mel2img stacks 4 chunks of 256 frames along the frequency axis: row = chunk·64 + mel bin.
    frames, mels = torch.meshgrid(torch.arange(1024.0), torch.arange(64.0), indexing="ij")
    image = encoder.reshape_mel2img((frames * 100 + mels)[None, None])[0, 0]
    rows, cols = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    assert torch.equal(image, ((rows // 64 * 256 + cols) * 100 + rows % 64).float())
    # The last stage's 8 × 8 grid (row-major tokens): label each token with its grid position.
    labelled = torch.arange(64.0)[None, :, None].expand(1, 64, 768)
    handle = encoder.norm.register_forward_hook(lambda *_: labelled)
    try:
        with torch.no_grad():
            encoding = encode_audio(htsat_tiny, torch.randn(1, 1, 1001, 64))
    finally:
        handle.remove()
    f, t = torch.meshgrid(torch.arange(2), torch.arange(32), indexing="ij")
    grid_row, grid_col = t // 8 * 2 + f, t % 8  # grid row = chunk·2 + mel half; column = time within the chunk
    assert torch.equal(encoding.token_map()[0, 0], (grid_row * 8 + grid_col).float())
    assert torch.equal(encoding.tokens[0, :, 0], (grid_row * 8 + grid_col).flatten().float())
