"""Which time-frequency cells of the input log-mel drive a CLAP score: gradient-based attributions (Captum).

A `Scorer` is a differentiable score per clip, score(x) for log-mels x (batch, channels, frames, mels):
the scaled cosine of the audio embedding with a target text (a class prompt or a caption), or one logit of
an audio classifier (fine-tuning, LoRA); `all_scores` gives every target's at once. Adapters that act by
hooks (ResiDual's λ) stay attached while it runs, so every method explains the adapted model when given one.

Every method attributes the offset from a baseline, δ = x − b (b: a reference log-mel with "nothing" in it,
see `saliency_baselines`), so "gradient × input" is δ ⊙ ∂s/∂x and Integrated Gradients integrates from b to
x: its attributions sum to s(x) − s(b) (completeness). Methods (Captum): `gradient` ∂s/∂x (Simonyan et al.
2014), `gradient_x_input` δ ⊙ ∂s/∂x, `smoothgrad` ∂s/∂x averaged over noisy copies (Smilkov et al. 2017),
`integrated_gradients` (Sundararajan et al. 2017). Maps sum the attribution over input channels: (clips,
frames, mels). Gradients are kept signed: a positive gradient says a louder cell raises the score.

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

from audio_residual.analysis.saliency_baselines import Baseline
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import ClapBundle
from audio_residual.clap.zeroshot import ZeroShotClassifier, text_embeddings

METHODS = ("gradient", "gradient_x_input", "smoothgrad", "integrated_gradients")
# What a map's values are: gradients are per dB of the input, the δ-weighted maps per cell (IG sums to Δs).
UNITS = {"gradient": "logit per dB", "smoothgrad": "logit per dB", "gradient_x_input": "logit per cell",
         "integrated_gradients": "logit per cell"}  # fmt: skip


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

    def all_scores(self, x: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, targets): the score of every text or class (its softmax: the class probabilities)."""
        with self.attached():
            return self.logits(x, is_longer)

    def score(self, x, target, is_longer=None) -> torch.Tensor:
        return self.logits(x, is_longer).gather(1, target.long()[:, None])[:, 0]

    def logits(self, x, is_longer=None) -> torch.Tensor:  # pragma: no cover - abstract
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

    def logits(self, x, is_longer=None) -> torch.Tensor:
        with self._autocast():
            embeds = audio_embeddings(self.encoder, x, is_longer)
        return self.logit_scale * embeds.float() @ self.texts.T


class LogitScore(Scorer):
    """The logits of a classifier module mapping (input_features, is_longer) → (batch, classes) logits."""

    def __init__(self, classifier: nn.Module, adapter=None, autocast=None):
        super().__init__(adapter, autocast)
        self.encoder = classifier

    def logits(self, x, is_longer=None) -> torch.Tensor:
        with self._autocast():
            return self.encoder(x, is_longer).float()


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


@torch.no_grad()
def class_probabilities(scorer: Scorer, x: torch.Tensor, is_longer: torch.Tensor | None = None) -> np.ndarray:
    """(batch, targets) softmax of every target's score: how the model reads each input."""
    return scorer.all_scores(x.float(), is_longer).float().softmax(-1).cpu().numpy()


@dataclass(frozen=True)
class AttributionOptions:
    """How `attribute` runs. `steps`: IG's integration points (Gauss-Legendre) to start with; with
    `ig_tolerance` (e.g. 0.01) a clip whose attributions miss s(x) − s(b) by more than that share of
    |s(x) − s(b)| is redone at 2×, 4×, … the steps up to `max_steps` (a clip that still misses is kept at
    `max_steps` and reported as not converged). `noise_samples` and `noise_level` (× the batch's dB range,
    Smilkov et al.'s 10–20 %) for SmoothGrad. At most `batch_size` clips go through one pass."""

    baseline: Baseline = Baseline()
    steps: int = 64
    ig_tolerance: float | None = None
    max_steps: int = 1024
    noise_samples: int = 16
    noise_level: float = 0.15
    batch_size: int = 8
    seed: int = 0


@dataclass
class Attribution:
    """Attributions of one batch: `maps[method]` (clips, frames, mels) and what checks them."""

    maps: dict[str, torch.Tensor]
    scores: torch.Tensor  # s(x), (clips,)
    baseline_scores: torch.Tensor  # s(b)
    ig_delta: torch.Tensor | None = None  # Σ IG − (s(x) − s(b)), per clip (Captum's convergence delta)
    ig_steps: torch.Tensor | None = None  # the IG steps each clip ended with (see `AttributionOptions`)
    ig_converged: torch.Tensor | None = None  # |ig_delta| ≤ ig_tolerance · |s(x) − s(b)| (all True without a tolerance)
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # (clips, channels, frames, mels)


def ig_within(gap: torch.Tensor, change: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Whether each clip's completeness gap is within `tolerance` of its |s(x) − s(b)|: the rule, exactly."""
    return gap.abs() <= tolerance * change.abs()


def _integrated_gradients(forward, delta, args, change, options: AttributionOptions):
    """IG at `options.steps`; clips not `ig_within` the tolerance are redone with twice the steps until they
    are or `max_steps` is reached. Returns (attributions, gaps, steps per clip, converged per clip)."""
    ig = IntegratedGradients(forward)
    todo = torch.arange(delta.shape[0], device=delta.device)
    raw, gap = torch.zeros_like(delta), torch.zeros(delta.shape[0], device=delta.device)
    used = torch.zeros(delta.shape[0], dtype=torch.long)
    steps, tolerance = options.steps, options.ig_tolerance
    while len(todo):
        part_args = tuple(None if a is None else a[todo] for a in args)
        part, part_gap = ig.attribute(
            delta[todo], baselines=0.0, n_steps=steps, additional_forward_args=part_args,
            internal_batch_size=max(options.batch_size, len(todo)), return_convergence_delta=True,
        )
        raw[todo], gap[todo], used[todo.cpu()] = part.detach(), part_gap.detach().float(), steps
        if tolerance is None or 2 * steps > options.max_steps:
            break
        missed = ~ig_within(gap[todo].cpu(), change[todo.cpu()], tolerance)
        todo, steps = todo[missed.to(todo.device)], 2 * steps
    converged = torch.ones(len(used), dtype=torch.bool) if tolerance is None else ig_within(gap.cpu(), change, tolerance)
    return raw, gap, used, converged


def _method(name, forward, delta, args, result, options: AttributionOptions) -> torch.Tensor:
    if name == "gradient":
        return Saliency(forward).attribute(delta, additional_forward_args=args, abs=False)
    if name == "gradient_x_input":
        return InputXGradient(forward).attribute(delta, additional_forward_args=args)
    if name == "smoothgrad":
        x = (delta + args[0]).detach()
        sigma = options.noise_level * float(x.amax() - x.amin())
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(options.seed)
            return NoiseTunnel(Saliency(forward)).attribute(
                delta, nt_type="smoothgrad", nt_samples=options.noise_samples, stdevs=sigma, abs=False,
                nt_samples_batch_size=max(1, options.batch_size // delta.shape[0]), additional_forward_args=args,
            )
    change = result.scores - result.baseline_scores
    raw, gap, used, converged = _integrated_gradients(forward, delta, args, change, options)
    result.ig_delta, result.ig_steps, result.ig_converged = gap.cpu(), used, converged
    return raw


def attribute(
    scorer: Scorer,
    x: torch.Tensor,
    target: torch.Tensor,
    methods: Sequence[str] = METHODS,
    is_longer: torch.Tensor | None = None,
    options: AttributionOptions | None = None,
) -> Attribution:
    """Attributions of `scorer` for the clips `x` (batch, channels, frames, mels) and their targets."""
    options = options or AttributionOptions()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown saliency method(s) {unknown}: choose from {METHODS}")
    if is_longer is not None and bool(is_longer.any()) and x.shape[1] > 1:
        raise ValueError("saliency of fusion clips over 10 s: their channels are not on one time axis")
    x = x.detach().float()
    base = options.baseline(x)
    target = target.to(x.device).long()

    def forward(delta, base_, target_, is_longer_=None):
        return scorer(base_ + delta, target_, is_longer_)

    args = (base, target, is_longer)
    delta = (x - base).requires_grad_(True)
    with torch.no_grad():
        scores, base_scores = forward(delta, *args), forward(torch.zeros_like(delta), *args)
    result = Attribution({}, scores.detach().cpu(), base_scores.detach().cpu())
    for method in methods:
        raw = _method(method, forward, delta, args, result, options).detach().float()
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
    options: AttributionOptions | None = None,
    device: torch.device | str = "cpu",
    desc: str = "saliency",
) -> dict[str, np.ndarray]:
    """Maps of `rows` of a (memory-mapped) feature array, `targets[i]` the text or class of row i.

    Returns {method: (clips, frames, mels) float32, "score": s(x), "baseline_score": s(b), and "ig_delta",
    "ig_steps", "ig_converged" when IG ran}. Clips go `options.batch_size` at a time.
    """
    from tqdm.auto import tqdm

    rows, targets = np.asarray(rows), np.asarray(targets)
    if len(rows) != len(targets):
        raise ValueError(f"saliency needs one target per clip: {len(rows)} clips, {len(targets)} targets")
    options = options or AttributionOptions()
    out: dict[str, list] = {}
    batch_size = options.batch_size
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        chunk = rows[start : start + batch_size]
        x = torch.from_numpy(np.array(input_features[chunk], dtype=np.float32)).to(device)
        longer = None if is_longer is None else torch.as_tensor(np.asarray(is_longer)[chunk]).reshape(-1, 1).to(device)
        target = torch.as_tensor(targets[start : start + batch_size]).to(device)
        result = attribute(scorer, x, target, methods, longer, options)
        for method, value in result.maps.items():
            out.setdefault(method, []).append(value.numpy())
        out.setdefault("score", []).append(result.scores.numpy())
        out.setdefault("baseline_score", []).append(result.baseline_scores.numpy())
        if result.ig_delta is not None:
            out.setdefault("ig_delta", []).append(result.ig_delta.numpy())
            out.setdefault("ig_steps", []).append(result.ig_steps.numpy())
            out.setdefault("ig_converged", []).append(result.ig_converged.numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}
