"""CLIP's symmetric InfoNCE on a (clips × captions) logit matrix, for every retrieval method.

A batch may hold two captions of one clip (or one clip twice): pairs that share a clip are all
positives, the target spread evenly over them, rather than pushed apart as the one-positive diagonal
would push them.
"""

from __future__ import annotations

import torch


def symmetric_infonce(logits: torch.Tensor, audio_clip: torch.Tensor, text_clip: torch.Tensor) -> torch.Tensor:
    """Mean of the audio→text and text→audio cross-entropies of `logits` (n_audio, n_text), where row i
    is clip `audio_clip[i]` and column j describes clip `text_clip[j]`; every row and column needs a positive."""
    same = (audio_clip[:, None] == text_clip[None, :]).to(logits.dtype)
    if not bool((same.sum(1) > 0).all() and (same.sum(0) > 0).all()):
        raise ValueError("symmetric InfoNCE needs a matching caption for every clip and a clip for every caption")
    audio_to_text = -((same / same.sum(1, keepdim=True)) * logits.log_softmax(1)).sum(1).mean()
    text_to_audio = -((same / same.sum(0, keepdim=True)) * logits.log_softmax(0)).sum(0).mean()
    return (audio_to_text + text_to_audio) / 2


def pair_infonce(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's loss for a batch of aligned (clip i, caption i) embeddings, all clips distinct."""
    index = torch.arange(len(audio), device=audio.device)
    return symmetric_infonce(scale * audio @ text.T, index, index)
