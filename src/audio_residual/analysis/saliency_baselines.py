"""The reference input of saliency and deletion: what a log-mel looks like with "nothing" in it.

Integrated Gradients attributes s(x) − s(b), gradient × input weighs by x − b, and deletion replaces cells
by b's, so every number depends on b. A useful b is one the model reads as no class: if it reads b as class
c, clips of class c have little left to explain (s(x) − s(b) ≈ 0) and their maps carry nothing. Offered:

* `neutral` (default): the training set's mean log-mel per bin, each bin moved (a few dB) until the model's
  class probabilities at b are as close to uniform as it gets (the maximum-entropy baseline of Tan 2022,
  arXiv:2204.05948, kept near the data's mean spectrum by a pull in units of the bins' training spread);
* `train_mean`: the training set's mean log-mel per bin, constant over time (the data's average spectrum);
* `blur`: the clip blurred by a Gaussian of `BLUR_SIGMA` (0.5 s × 4 mel bins): events smeared out, its
  spectral envelope kept (Fong & Vedaldi 2017; Sturmfels et al. 2020);
* `median`: each mel bin at the clip's own median level over time (its stationary background);
* `floor`: the clip's quietest cell everywhere (the toolkit's earlier default, kept to compare with: it lies
  about 20 dB below a clip's own background, and the tiny CLAP reads it as one class).

`train_mean` and `neutral` are one spectrum per run (channels, mels); the others are computed per clip.
How the model reads each kind (its class probabilities) is in a run's `summary.json` (`baselines`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

BASELINES = ("neutral", "train_mean", "blur", "median", "floor")
DEFAULT_BASELINE = "neutral"
SPECTRUM_KINDS = ("neutral", "train_mean")  # one (channels, mels) spectrum per run, from the training clips
BLUR_SIGMA = (50, 4)  # frames (0.5 s at CLAP's 10 ms hop) × mel bins
NEUTRAL_STEPS = 200  # Adam steps on the spectrum (one forward + backward of one clip each)
NEUTRAL_LR = 0.5  # dB per step
NEUTRAL_PULL = 1e-3  # weight of the squared distance to the mean spectrum, in units of the bins' training std


@dataclass(frozen=True, eq=False)
class Baseline:
    """A reference log-mel per clip. `spectrum` (channels, mels) dB is the run's for `neutral` / `train_mean`."""

    kind: str = "median"
    spectrum: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in BASELINES:
            raise ValueError(f"unknown saliency baseline {self.kind!r}: choose from {', '.join(BASELINES)}")
        if (self.kind in SPECTRUM_KINDS) != (self.spectrum is not None):
            raise ValueError(f"baseline {self.kind!r}: a spectrum is needed for {SPECTRUM_KINDS} and only for them")
        if self.spectrum is not None:
            spectrum = np.array(self.spectrum, dtype=np.float32)
            if spectrum.ndim != 2 or not np.isfinite(spectrum).all():
                raise ValueError(f"baseline spectrum must be finite (channels, mels), got shape {spectrum.shape}")
            spectrum.flags.writeable = False
            object.__setattr__(self, "spectrum", spectrum)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline of each clip of `x` (batch, channels, frames, mels), same shape, no gradient."""
        x = x.detach()
        if self.spectrum is not None:
            spectrum = torch.tensor(self.spectrum, device=x.device, dtype=x.dtype)
            if spectrum.shape != (x.shape[1], x.shape[3]):
                raise ValueError(f"baseline spectrum {tuple(spectrum.shape)} does not fit log-mels {tuple(x.shape)}")
            return spectrum[None, :, None, :].expand_as(x).clone()
        if self.kind == "floor":
            return x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()
        if self.kind == "median":
            return x.median(dim=2, keepdim=True).values.expand_as(x).clone()
        blurred = gaussian_filter(x.float().cpu().numpy(), sigma=(0, 0, *BLUR_SIGMA), mode="nearest")
        return torch.from_numpy(blurred).to(x.device, x.dtype)

    def digest(self) -> str:
        """What the baseline is, for keys of stored per-clip results."""
        parts = [self.kind.encode()]
        if self.spectrum is not None:
            parts.append(self.spectrum.tobytes())
        return hashlib.sha256(b"|".join(parts)).hexdigest()[:16]

    def describe(self) -> dict:
        return {"kind": self.kind, "digest": self.digest(),
                "spectrum_db": None if self.spectrum is None else np.round(self.spectrum, 3).tolist()}


def mean_spectrum(input_features: np.ndarray, rows, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) over `rows` and frames of a (clips, channels, frames, mels) feature array: (channels, mels) each."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("the training-set baselines need at least one training clip")
    total = square = None
    count = 0
    for start in range(0, len(rows), chunk):
        part = np.asarray(input_features[rows[start : start + chunk]], dtype=np.float64)
        part_sum, part_square = part.sum(axis=(0, 2)), np.square(part).sum(axis=(0, 2))
        total = part_sum if total is None else total + part_sum
        square = part_square if square is None else square + part_square
        count += part.shape[0] * part.shape[2]
    mean = total / count
    return mean.astype(np.float32), np.sqrt(np.maximum(square / count - mean**2, 0.0)).astype(np.float32)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Normalised entropy (0: one class, 1: uniform) of each row of class probabilities."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1) / np.log(p.shape[-1]) if p.shape[-1] > 1 else np.zeros(p.shape[:-1])


def neutral_spectrum(
    all_scores: Callable[[torch.Tensor], torch.Tensor], mean: np.ndarray, std: np.ndarray, frames: int, device="cpu"
) -> np.ndarray:
    """The spectrum near `mean` at which `all_scores` (log-mels → (batch, classes) logits) is most uniform.

    Minimises KL(softmax(logits(b)) ‖ uniform) + NEUTRAL_PULL · mean(((b − mean) / std)²) over one level per
    (channel, mel bin), b constant over `frames`; Adam from the mean, NEUTRAL_STEPS steps (deterministic).
    """
    start = torch.from_numpy(np.asarray(mean, dtype=np.float32)).to(device)
    scale = torch.from_numpy(np.maximum(np.asarray(std, dtype=np.float32), 1e-3)).to(device)
    offset = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([offset], lr=NEUTRAL_LR)
    best, best_loss = start.clone(), float("inf")
    for _ in range(NEUTRAL_STEPS):
        spectrum = start + offset
        logits = all_scores(spectrum[None, :, None, :].expand(1, -1, frames, -1))[0].float()
        log_p = logits.log_softmax(-1)
        divergence = (log_p.exp() * (log_p + np.log(log_p.numel()))).sum()
        loss = divergence + NEUTRAL_PULL * ((offset / scale) ** 2).mean()
        if float(loss.detach()) < best_loss:  # the loss of the spectrum just scored, before the step moves it
            best, best_loss = spectrum.detach().clone(), float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return best.cpu().numpy()
