"""The one contrastive loss: CLIP's symmetric InfoNCE, used by every task and method that trains contrastively
(retrieval's methods, the classification adapter, CLAP pretraining), like open_clip's one `loss.py`.

A batch may hold two captions of one clip, one clip twice, or (classification) several clips of one class
sharing one class prompt: pairs that share an identity are all positives, the target spread evenly over them,
rather than pushed apart as the one-positive diagonal would push them. With distinct identities it is exactly
CLIP's loss.
"""

from __future__ import annotations

import torch


def symmetric_infonce(
    logits: torch.Tensor,
    audio_ids: torch.Tensor,
    text_ids: torch.Tensor,
    text_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the audio→text and text→audio cross-entropies.

    `logits` (n_audio, n_text): row i is audio of identity `audio_ids[i]`, column j text of identity
    `text_ids[j]` (a clip id, a class); pairs of equal identity are positives. `text_logits` (n_text, n_audio)
    scores the text→audio direction when it has its own temperature (CLAP keeps one per direction); by
    default it is `logits.T`. Every row and every column needs a positive.
    """
    same = (audio_ids[:, None] == text_ids[None, :]).to(logits.dtype)
    if not bool((same.sum(1) > 0).all() and (same.sum(0) > 0).all()):
        raise ValueError("symmetric InfoNCE needs a matching text for every audio row and an audio row for every text")
    text_logits = logits.T if text_logits is None else text_logits
    audio_to_text = -((same / same.sum(1, keepdim=True)) * logits.log_softmax(1)).sum(1).mean()
    same_t = same.T
    text_to_audio = -((same_t / same_t.sum(1, keepdim=True)) * text_logits.log_softmax(1)).sum(1).mean()
    return (audio_to_text + text_to_audio) / 2


def pair_infonce(audio: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's loss for a batch of aligned (audio i, text i) unit embeddings, all pairs distinct."""
    index = torch.arange(len(audio), device=audio.device)
    return symmetric_infonce(scale * audio @ text.T, index, index)
