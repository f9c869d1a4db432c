"""A linear projection of frozen audio features into a frozen text encoder's space, trained contrastively.

The projection project's method: one affine map from the frozen audio embedding (or the pooled encoder
output before CLAP's own projection) into the space of any frozen text encoder, scored by cosine. When the
source is CLAP's joint embedding and the text side CLAP's own tower, the map starts at the identity, so
its untrained start is zero-shot; otherwise it starts at PyTorch's default init, near the random baseline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearProjection(nn.Module):
    """Audio features (n, in_dim) → unit vectors (n, out_dim); logits = scale · cos with the captions.

    The temperature starts at `logit_scale`; with `learn_temperature` it is trained (log-parameterised,
    clamped at 100 as in CLIP), else it stays fixed and adds no parameter.
    """

    def __init__(
        self, in_dim: int, out_dim: int, logit_scale: float = 1 / 0.07, learn_temperature: bool = False,
        identity: bool = False,
    ):
        super().__init__()
        self.map = nn.Linear(in_dim, out_dim)
        if identity:
            if in_dim != out_dim:
                raise ValueError(f"an identity start needs equal widths, got {in_dim} → {out_dim}")
            nn.init.eye_(self.map.weight)
            nn.init.zeros_(self.map.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=learn_temperature)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.map(audio.float()), dim=-1)

    def logits(self, audio: torch.Tensor, text_unit: torch.Tensor) -> torch.Tensor:
        return self.scale * self(audio) @ text_unit.T

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
