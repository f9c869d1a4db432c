"""CLAP's audio encoder forward: log-mels → frame tokens, pooled output and joint-space embedding.

`encode_audio` runs transformers' own `ClapAudioModel.forward` (every hook point fires) and returns an
`AudioEncoding`. `encode_from_stage` starts from the input of a Swin stage (`stage_input`, cached by
`clap.stage_cache`) and returns the same structure: the stages from there on are transformers' modules, the
encoder tail after them is copied from transformers and tested equal to its forward (tests/test_encode.py).
Nothing here is under `torch.no_grad`: ResiDual's λ, fine-tuning, text-aware pooling over the tokens and
saliency (gradients w.r.t. the input log-mel) all differentiate through it.

Token order (tested in tests/test_encode.py). HTSAT resizes the log-mel to 1024 frames × 64 mel bins and folds it
into a 256 × 256 image of `freq_ratio` = 4 time chunks stacked along the frequency axis (row = chunk·64 + mel
bin), so its last stage sees an 8 × 8 grid whose rows are (chunk, mel half). transformers'
`ClapAudioEncoder.forward` regroups it (its "group 2D CNN" reshape, LAION-AI/CLAP#135) into
`last_hidden_state` of shape (batch, D, F, T) = (batch, 768, 2, 32): F = 2 mel halves (lower, upper), T = 32
time steps in order, step t covering frames 32t..32t+31. `AudioEncoding.tokens` is that tensor flattened
frequency-major, (batch, F·T, D): token f·T + t is mel half f at time step t; `token_map()` gives the
(batch, D, F, T) tensor back. The tiny offline model has F = 1, T = 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AudioEncoding:
    """The audio tower's outputs for one batch, all differentiable.

    tokens: (batch, F·T, D) last-stage tokens after the final LayerNorm, in the model's (autocast) dtype,
        frequency-major (see the module docstring); `pooled` is their mean.
    pooled: (batch, D) transformers' `pooler_output`.
    embedding: (batch, projection_dim) L2-normalised `audio_projection(pooled)`, float32: the joint space.
    grid: (F, T) the token grid.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    embedding: torch.Tensor
    grid: tuple[int, int]

    def token_map(self) -> torch.Tensor:
        """The tokens as transformers' `last_hidden_state`: (batch, D, F, T)."""
        return self.tokens.transpose(1, 2).reshape(self.tokens.shape[0], -1, *self.grid)


def audio_encoder(model: nn.Module) -> nn.Module:
    """The `ClapAudioEncoder` inside a `ClapModel` or `ClapAudioModel`."""
    if hasattr(model, "audio_model"):
        model = model.audio_model
    return model.audio_encoder


def _encoding(model: nn.Module, token_map: torch.Tensor, pooled: torch.Tensor) -> AudioEncoding:
    """An `AudioEncoding` from transformers' (batch, D, F, T) token map and pooled output."""
    embedding = F.normalize(model.audio_projection(pooled).float(), dim=-1)
    return AudioEncoding(token_map.flatten(2).transpose(1, 2), pooled, embedding, tuple(token_map.shape[2:]))


def encode_audio(model: nn.Module, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> AudioEncoding:
    """Tokens, pooled output and embedding of a batch of log-mels through transformers' forward.

    `model`: a `ClapModel`, or any module with its `audio_model` and `audio_projection` (fine-tuning, LoRA).
    """
    if is_longer is None and model.audio_model.config.enable_fusion:
        raise ValueError("a fusion CLAP (enable_fusion) needs is_longer for every clip: pass the cached flags")
    out = model.audio_model(input_features=input_features, is_longer=is_longer)
    return _encoding(model, out.last_hidden_state, out.pooler_output)


def audio_embeddings(model: nn.Module, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable L2-normalised audio embeddings: the path ResiDual hooks and training go through."""
    return encode_audio(model, input_features, is_longer).embedding


def stage_input(model, input_features: torch.Tensor, stage: int, is_longer: torch.Tensor | None = None) -> torch.Tensor:
    """The hidden states entering stage `stage` (batch, tokens, d): the full model stopped before that stage."""
    encoder = audio_encoder(model)
    if not 0 <= stage < len(encoder.layers):
        raise ValueError(f"a prefix ends before stage 0..{len(encoder.layers) - 1}, got {stage}")
    captured = {}

    class _Stop(Exception):
        pass

    def grab(_module, args):
        captured["hidden"] = args[0]
        raise _Stop

    handle = encoder.layers[stage].register_forward_pre_hook(grab)
    try:
        model.audio_model(input_features=input_features, is_longer=is_longer)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


def encode_from_stage(model: nn.Module, hidden: torch.Tensor, stage: int) -> AudioEncoding:
    """`encode_audio`'s outputs from the input of stage `stage` (as `stage_input` returns it).

    Stages `stage`.. run through their transformers modules (hooks included), then `_encoder_tail`.
    """
    encoder = audio_encoder(model)
    # Copied from transformers 5.23.0 ClapAudioEncoder.forward: the stage loop, from `stage` on.
    for i in range(stage, len(encoder.layers)):
        hidden = encoder.layers[i](hidden, encoder.input_resolutions[i])[0]
    return _encoding(model, *_encoder_tail(encoder, hidden))


def _encoder_tail(encoder: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state (batch, D, F, T), pooler_output) from the last stage's output (batch, tokens, D).

    Copied from transformers 5.23.0 `ClapAudioEncoder.forward` (models/clap/modeling_clap.py), the lines
    after the stage loop: final norm, (freq, time) reshape, group-2D regrouping, average pool. Tested equal
    to transformers' forward for every start stage, fused and unfused (tests/test_encode.py).
    """
    frames_num = encoder.spec_size // encoder.freq_ratio * encoder.freq_ratio  # height after reshape_mel2img
    last_hidden_state = encoder.norm(hidden)
    batch_size, _, n_channels = last_hidden_state.shape
    freq_shape = frames_num // (2 ** (len(encoder.depths) - 1)) // encoder.patch_stride[0]
    temporal_shape = frames_num // (2 ** (len(encoder.depths) - 1)) // encoder.patch_stride[1]
    last_hidden_state = (
        last_hidden_state.permute(0, 2, 1).contiguous().reshape(batch_size, n_channels, freq_shape, temporal_shape)
    )
    batch_size, n_channels, n_frequencies, n_temp = last_hidden_state.shape
    c_freq_bin = n_frequencies // encoder.freq_ratio
    last_hidden_state = last_hidden_state.reshape(batch_size, n_channels, n_frequencies // c_freq_bin, c_freq_bin, n_temp)
    last_hidden_state = (
        last_hidden_state.permute(0, 1, 3, 2, 4).contiguous().reshape(batch_size, n_channels, c_freq_bin, -1)
    )
    latent_output = encoder.avgpool(torch.flatten(last_hidden_state, 2))
    return last_hidden_state, torch.flatten(latent_output, 1)

