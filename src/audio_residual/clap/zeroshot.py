"""Zero-shot classification with CLAP: class prompts → text embeddings, audio → embeddings, cosine × scale."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from audio_residual.clap.batches import batches
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle

DEFAULT_TEMPLATES = ("This is a sound of {label}.",)


def check_template(template: str) -> str:
    """`template` itself if it holds `{label}` and no other field; else a ValueError naming it.

    Without `{label}` every class would get the same prompt and zero-shot would be chance.
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(
            f"prompt template {template!r} is malformed ({err}); write it like {DEFAULT_TEMPLATES[0]!r}"
        ) from err
    if "label" not in fields or set(fields) != {"label"}:
        raise ValueError(
            f"prompt template {template!r} must contain {{label}} and no other field (found {fields}); "
            f"write it like {DEFAULT_TEMPLATES[0]!r}"
        )
    return template


def class_prompts(class_names: Sequence[str], template: str) -> list[str]:
    """LAION's recipe: underscores become spaces before the label enters the template."""
    return [template.format(label=name.replace("_", " ")) for name in class_names]


@torch.no_grad()
def text_embeddings(bundle: ClapBundle, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings, (len(texts), projection_dim), fp32; each text truncated to
    what the model reads (`ClapBundle.text_length`: 77 tokens for LAION's CLAPs, as they were trained)."""
    tokens = bundle.tokenize(texts)
    with bundle.autocast():
        pooled = bundle.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        projected = bundle.model.text_projection(pooled.pooler_output)
    return F.normalize(projected.float(), dim=-1)


class ZeroShotClassifier:
    """Frozen class text embeddings and CLAP's audio logit scale: logits = scale · cos(audio, class)."""

    def __init__(self, bundle: ClapBundle, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
        if not class_names:
            raise ValueError("zero-shot classification needs at least one class name")
        self.bundle = bundle
        self.class_names = tuple(class_names)
        self.templates = tuple(check_template(t) for t in templates)
        if not self.templates:
            raise ValueError("zero-shot classification needs at least one prompt template")
        per_template = [text_embeddings(bundle, class_prompts(self.class_names, t)) for t in self.templates]
        # Several templates: average the normalised embeddings per class, then renormalise (CLIP's ensembling).
        self.class_embeddings = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        self.logit_scale = float(bundle.model.logit_scale_a.exp())

    def logits(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * audio_embeds.float() @ self.class_embeddings.to(audio_embeds.device).T

    @torch.no_grad()
    def embed(
        self,
        input_features: np.ndarray,
        indices: Sequence[int] | np.ndarray,
        is_longer: np.ndarray | None = None,
        batch_size: int = 32,
        desc: str = "audio embeddings",
    ) -> torch.Tensor:
        """Audio embeddings of the selected rows of a (memory-mapped) feature array, on the CPU."""
        out = []
        for _, x, longer in batches(input_features, indices, batch_size, self.bundle.device, is_longer, desc=desc):
            with self.bundle.autocast():
                emb = audio_embeddings(self.bundle.model, x, longer)
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.class_embeddings.shape[1])
