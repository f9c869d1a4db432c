"""Frozen text towers for retrieval: CLAP's own by default, or any Hugging Face text encoder by name.

The linear-projection method maps audio into a frozen text encoder's space (as the projection project
maps a frozen audio encoder into CLIP's text space). A text encoder here is anything that embeds strings:
CLAP's or CLIP's text model with its projection, a composite model's `get_text_features`, or a plain
encoder (BERT, RoBERTa, T5's encoder...) mean-pooled over its tokens. Anything else is refused by name.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    ClapTextModelWithProjection,
    CLIPTextModelWithProjection,
)

from audio_residual.clap.loading import TextLength, text_length, tokenize

# Stand-alone text towers saved with their projection. A whole CLIP or CLAP checkpoint loads whole and
# embeds by `get_text_features`: its projection width lives in the top-level config, which a tower
# loaded on its own would not see (it would re-initialise the projection at the default width).
TEXT_TOWERS = {"clip_text_model": CLIPTextModelWithProjection, "clap_text_model": ClapTextModelWithProjection}


class TextEncoder:
    """A frozen text model and its tokenizer: `embed(texts)` gives L2-normalised (n, dim) embeddings.

    Texts are truncated by `length` (default: the one rule of `clap.loading.text_length` for this model:
    its tokenizer's limit capped by its position embeddings, 77 tokens for LAION's CLAPs)."""

    def __init__(self, name: str, model, tokenizer, kind: str, device: str | torch.device = "cpu",
                 length: TextLength | None = None):
        self.name, self.kind, self.tokenizer, self.model = name, kind, tokenizer, model
        self.device = torch.device(device)
        self.length = length or text_length(name, tokenizer, getattr(model, "text_model", model))

    def _forward(self, tokens) -> torch.Tensor:
        if self.kind == "clap":
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return self.model.text_projection(pooled.pooler_output)
        if self.kind == "tower":
            return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
        if self.kind == "features":
            out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers ≥ 5: an output
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        out = []
        for start in tqdm(range(0, len(texts), batch_size), desc=f"embed text ({self.name})", disable=not progress):
            tokens = tokenize(self.tokenizer, texts[start : start + batch_size], self.length).to(self.device)
            out.append(F.normalize(self._forward(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @functools.cached_property
    def dim(self) -> int:
        return int(self.embed(["a sound"]).shape[1])


def clap_text_encoder(bundle) -> TextEncoder:
    """CLAP's own text tower and projection (the default text side), sharing the bundle's model."""
    return TextEncoder(f"{bundle.model_id} text tower", bundle.model, bundle.tokenizer, "clap", bundle.device,
                       bundle.text_length)


def _frozen(model, device) -> torch.nn.Module:
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _not_a_text_encoder(name: str, why: str) -> ValueError:
    return ValueError(
        f"--text-model {name!r} is not a text encoder ({why}); name one such as "
        "'openai/clip-vit-base-patch32' or 'roberta-base'"
    )


def load_text_encoder(name: str, device: str | torch.device = "cpu") -> TextEncoder:
    """The text encoder `name` (hub id or local `save_pretrained` folder); a ValueError naming it otherwise."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ValueError(f"--text-model {name!r} could not be loaded: {str(err).splitlines()[0]}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise _not_a_text_encoder(name, "it has no tokenizer") from err
    if config.model_type in TEXT_TOWERS:
        model = _frozen(TEXT_TOWERS[config.model_type].from_pretrained(name), device)
        return TextEncoder(name, model, tokenizer, "tower", device)
    model = _frozen(AutoModel.from_pretrained(name), device)
    if hasattr(config, "text_config") or hasattr(model, "get_text_features"):
        if not hasattr(model, "get_text_features"):
            raise _not_a_text_encoder(name, f"{type(model).__name__} has no text features")
        return TextEncoder(name, model, tokenizer, "features", device)
    if getattr(config, "is_encoder_decoder", False):
        model = model.get_encoder()
    if getattr(model, "main_input_name", None) != "input_ids":
        raise _not_a_text_encoder(name, f"{type(model).__name__} takes {getattr(model, 'main_input_name', '?')}")
    return TextEncoder(name, model, tokenizer, "pooled", device)
