"""Which time-frequency cells of the input log-mel drive a CLAP score: gradient-based attributions (Captum).

A `Scorer` is a differentiable score per clip, score(x) for log-mels x (batch, channels, frames, mels):
the scaled cosine of the audio embedding with a target text (a class prompt or a caption), or one logit of
an audio classifier (fine-tuning, LoRA). Adapters that act by hooks (ResiDual's λ) stay attached while it
runs, so every method explains the adapted model when given one.

Every method attributes the offset from a baseline, δ = x − b (b: a "silent" log-mel, see `baseline`), so
"gradient × input" is δ ⊙ ∂s/∂x and Integrated Gradients integrates from b to x: its attributions sum to
s(x) − s(b) (completeness). Methods (Captum): `gradient` ∂s/∂x (Simonyan et al. 2014), `gradient_x_input`
δ ⊙ ∂s/∂x, `smoothgrad` ∂s/∂x averaged over noisy copies (Smilkov et al. 2017), `integrated_gradients`
(Sundararajan et al. 2017). Maps sum the attribution over input channels: (clips, frames, mels).

Gradients are kept signed: the default baseline is the clip's quietest level, so δ ≥ 0 and removing a cell
always makes it quieter; a positive gradient says a quieter cell lowers the score. Its magnitude |∂s/∂x|
(Simonyan's choice for images) ranks cells by sensitivity in either direction and does worse than random
on deletion with the tiny pretrained CLAP.

Memory is bounded by `batch_size` clips per forward pass whatever the number of steps or noise samples:
Captum's `internal_batch_size` / `nt_samples_batch_size` split the expanded inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency
from torch import nn

from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle
from audio_residual.clap.zeroshot import ZeroShotClassifier, text_embeddings

METHODS = ("gradient", "gradient_x_input", "smoothgrad", "integrated_gradients")
SIGNED = {"gradient": True, "gradient_x_input": True, "smoothgrad": True, "integrated_gradients": True}
BASELINES = ("floor", "time_mean", "zeros")
IG_ABS_TOLERANCE = 1e-3  # score units: a clip whose score hardly moves from b to x is complete within this


class Scorer(nn.Module):
    """score(x, target, is_longer) → (batch,) float32; `target` indexes the texts or classes per clip."""

    def __init__(self, adapter: nn.Module | None = None, autocast: Callable | None = None):
        super().__init__()
        self.adapter = adapter
        self._autocast = autocast or contextlib.nullcontext

    def attached(self) -> contextlib.AbstractContextManager:
        """The adapter's hooks on the encoder (a no-op without adapter); `score` must run inside."""
        if self.adapter is None:
            return contextlib.nullcontext()
        return self.adapter.attached(self.encoder)

    def forward(self, x: torch.Tensor, target: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        with self.attached():
            return self.score(x, target, is_longer)

    def score(self, x, target, is_longer=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class TextScore(Scorer):
    """logit_scale · cos(audio embedding of x, texts[target]): zero-shot class prompts or captions.

    `encoder`: a `ClapModel` or any module with its `audio_model` and `audio_projection` (LoRA, fine-tuned).
    """

    def __init__(self, encoder: nn.Module, texts: torch.Tensor, logit_scale: float, adapter=None, autocast=None):
        super().__init__(adapter, autocast)
        self.encoder = encoder
        self.register_buffer("texts", texts.detach().float())
        self.logit_scale = float(logit_scale)

    def score(self, x, target, is_longer=None) -> torch.Tensor:
        with self._autocast():
            embeds = audio_embeddings(self.encoder, x, is_longer)
        return self.logit_scale * (embeds.float() * self.texts[target]).sum(-1)


class LogitScore(Scorer):
    """One logit of a classifier module mapping (input_features, is_longer) → (batch, classes) logits."""

    def __init__(self, classifier: nn.Module, adapter=None, autocast=None):
        super().__init__(adapter, autocast)
        self.encoder = classifier

    def score(self, x, target, is_longer=None) -> torch.Tensor:
        with self._autocast():
            logits = self.encoder(x, is_longer)
        return logits.float().gather(1, target[:, None])[:, 0]


def zero_shot_scorer(classifier: ZeroShotClassifier, adapter: nn.Module | None = None) -> TextScore:
    """The zero-shot logit of a class (its prompt embedding · CLAP's scale), optionally with ResiDual λ."""
    bundle = classifier.bundle
    if adapter is not None:
        adapter = adapter.to(bundle.device)
    return TextScore(bundle.model, classifier.class_embeddings.to(bundle.device), classifier.logit_scale,
                     adapter, bundle.autocast)


def caption_scorer(bundle: ClapBundle, captions: Sequence[str], adapter: nn.Module | None = None) -> TextScore:
    """Score of a clip against caption `target` (an index into `captions`)."""
    texts = text_embeddings(bundle, captions)
    if adapter is not None:
        adapter = adapter.to(bundle.device)
    return TextScore(bundle.model, texts, float(bundle.model.logit_scale_a.exp()), adapter, bundle.autocast)


RANDOMISED_SEED = 2018  # not 0: the offline tiny model itself is drawn with seed 0


def randomised_encoder(model: nn.Module, seed: int = RANDOMISED_SEED) -> nn.Module:
    """The audio tower (`audio_model`, `audio_projection`) of `model`'s architecture with freshly drawn weights.

    The model randomisation test of Adebayo et al. (2018): a saliency method whose maps survive it explains
    the input, not the model. The weights come from transformers' own initialisation of the same config.
    """
    from transformers import ClapModel

    config = model.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = ClapModel(config)
    holder = nn.Module()
    holder.audio_model, holder.audio_projection = fresh.audio_model, fresh.audio_projection
    device = next(model.parameters()).device
    return holder.to(device).eval().requires_grad_(False)


def randomised_scorer(scorer: TextScore, seed: int = RANDOMISED_SEED) -> TextScore:
    """`scorer`'s texts and scale on a randomly re-initialised audio tower (no adapter)."""
    model = scorer.encoder
    return TextScore(randomised_encoder(model, seed), scorer.texts, scorer.logit_scale, None, scorer._autocast)


def baseline(x: torch.Tensor, kind: str = "floor") -> torch.Tensor:
    """The "absent sound" reference of each clip: `floor` its quietest cell everywhere (silence at the
    clip's noise floor), `time_mean` each mel bin's mean over time (no events, same spectral envelope),
    `zeros` 0 dB everywhere."""
    if kind == "floor":
        return x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()
    if kind == "time_mean":
        return x.mean(dim=2, keepdim=True).expand_as(x).clone()
    if kind == "zeros":
        return torch.zeros_like(x)
    raise ValueError(f"unknown saliency baseline {kind!r}: choose from {BASELINES}")


@dataclass
class Attribution:
    """Attributions of one batch: `maps[method]` (clips, frames, mels) and what checks them."""

    maps: dict[str, torch.Tensor]
    scores: torch.Tensor  # s(x), (clips,)
    baseline_scores: torch.Tensor  # s(b)
    ig_delta: torch.Tensor | None = None  # Σ IG − (s(x) − s(b)), per clip (Captum's convergence delta)
    ig_steps: torch.Tensor | None = None  # the IG steps each clip ended with (see `ig_tolerance`)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # (clips, channels, frames, mels)


def _integrated_gradients(forward, delta, args, change, steps, batch_size, tolerance, max_steps):
    """IG at `steps`; clips whose completeness gap exceeds `tolerance` · |s(x) − s(b)| + IG_ABS_TOLERANCE are redone
    with twice the steps until they pass or reach `max_steps`. Returns (attributions, gaps, steps per clip)."""
    ig = IntegratedGradients(forward)
    todo = torch.arange(delta.shape[0], device=delta.device)
    raw, gap = torch.zeros_like(delta), torch.zeros(delta.shape[0], device=delta.device)
    used = torch.zeros(delta.shape[0], dtype=torch.long)
    while len(todo):
        part_args = tuple(None if a is None else a[todo] for a in args)
        part, part_gap = ig.attribute(
            delta[todo], baselines=0.0, n_steps=steps, additional_forward_args=part_args,
            internal_batch_size=max(batch_size, len(todo)), return_convergence_delta=True,
        )
        raw[todo], gap[todo], used[todo.cpu()] = part.detach(), part_gap.detach().float(), steps
        if tolerance is None or 2 * steps > max_steps:
            break
        too_far = gap[todo].abs().cpu() > tolerance * change[todo.cpu()].abs() + IG_ABS_TOLERANCE
        todo, steps = todo[too_far.to(todo.device)], 2 * steps
    return raw, gap, used


def attribute(
    scorer: Scorer,
    x: torch.Tensor,
    target: torch.Tensor,
    methods: Sequence[str] = METHODS,
    is_longer: torch.Tensor | None = None,
    baseline_kind: str = "floor",
    steps: int = 64,
    ig_tolerance: float | None = None,
    max_steps: int = 1024,
    noise_samples: int = 16,
    noise_level: float = 0.15,
    batch_size: int = 8,
    seed: int = 0,
) -> Attribution:
    """Attributions of `scorer` for the clips `x` (batch, channels, frames, mels) and their targets.

    `steps`: IG's integration points (Gauss-Legendre). A score with sharp transitions along the path from
    b to x needs more: with `ig_tolerance` (e.g. 0.01), clips whose attributions miss s(x) − s(b) by more
    are redone at 2×, 4×, … the steps up to `max_steps`. `noise_samples` and `noise_level` (× the batch's dB
    range, Smilkov et al.'s 10–20 %) for SmoothGrad. At most `batch_size` clips go through one pass.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown saliency method(s) {unknown}: choose from {METHODS}")
    if is_longer is not None and bool(is_longer.any()) and x.shape[1] > 1:
        raise ValueError("saliency of fusion clips over 10 s: their channels are not on one time axis")
    x = x.detach().float()
    base = baseline(x, baseline_kind)
    target = target.to(x.device).long()

    def forward(delta, base_, target_, is_longer_=None):
        return scorer(base_ + delta, target_, is_longer_)

    args = (base, target, is_longer)
    delta = (x - base).requires_grad_(True)
    with torch.no_grad():
        scores, base_scores = forward(delta, *args), forward(torch.zeros_like(delta), *args)
    result = Attribution({}, scores.detach().cpu(), base_scores.detach().cpu())
    n = x.shape[0]
    for method in methods:
        if method == "gradient":
            raw = Saliency(forward).attribute(delta, additional_forward_args=args, abs=False)
        elif method == "gradient_x_input":
            raw = InputXGradient(forward).attribute(delta, additional_forward_args=args)
        elif method == "smoothgrad":
            sigma = noise_level * float(x.amax() - x.amin())
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
                torch.manual_seed(seed)
                raw = NoiseTunnel(Saliency(forward)).attribute(
                    delta, nt_type="smoothgrad", nt_samples=noise_samples, stdevs=sigma, abs=False,
                    nt_samples_batch_size=max(1, batch_size // n), additional_forward_args=args,
                )
        else:
            change = result.scores - result.baseline_scores
            raw, gap, used = _integrated_gradients(forward, delta, args, change, steps, batch_size, ig_tolerance,
                                                   max_steps)
            result.ig_delta, result.ig_steps = gap.cpu(), used
        raw = raw.detach().float()
        result.raw[method] = raw.cpu()
        result.maps[method] = raw.sum(1).cpu()
    return result


def saliency_maps(
    scorer: Scorer,
    input_features: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    targets: Sequence[int] | np.ndarray,
    methods: Sequence[str] = METHODS,
    is_longer: np.ndarray | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    desc: str = "saliency",
    **options,
) -> dict[str, np.ndarray]:
    """Maps of `rows` of a (memory-mapped) feature array, `targets[i]` the text or class of row i.

    Returns {method: (clips, frames, mels) float32, "score": s(x), "baseline_score": s(b), and
    "ig_delta" when IG ran}; `options` go to `attribute`. Clips go `batch_size` at a time.
    """
    from tqdm.auto import tqdm

    rows, targets = np.asarray(rows), np.asarray(targets)
    if len(rows) != len(targets):
        raise ValueError(f"saliency needs one target per clip: {len(rows)} clips, {len(targets)} targets")
    out: dict[str, list] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        chunk = rows[start : start + batch_size]
        x = torch.from_numpy(np.array(input_features[chunk], dtype=np.float32)).to(device)
        longer = None if is_longer is None else torch.as_tensor(np.asarray(is_longer)[chunk]).reshape(-1, 1).to(device)
        target = torch.as_tensor(targets[start : start + batch_size]).to(device)
        result = attribute(scorer, x, target, methods, longer, batch_size=batch_size, **options)
        for method, value in result.maps.items():
            out.setdefault(method, []).append(value.numpy())
        out.setdefault("score", []).append(result.scores.numpy())
        out.setdefault("baseline_score", []).append(result.baseline_scores.numpy())
        if result.ig_delta is not None:
            out.setdefault("ig_delta", []).append(result.ig_delta.numpy())
            out.setdefault("ig_steps", []).append(result.ig_steps.numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}
