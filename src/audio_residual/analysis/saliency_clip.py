"""One clip of the saliency analysis, stored on its own so a killed run resumes where it stopped.

Everything a clip needs is computed in one go (maps of the explained model, of the randomised model and,
with an adapter, of zero-shot; deletion/insertion curves; class probabilities at x and at the baseline;
its wavs) and written atomically to `OUT/clips/clip{row}.npz`, keyed by all that decides it (model,
features of the clip, adapter, baseline, options). A rerun reads back every clip whose key matches and
computes only the others; clips do not depend on each other (random orders and SmoothGrad noise are
drawn per clip), so a resumed run gives the uninterrupted run's numbers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from audio_residual.analysis.faithfulness import FaithfulnessOptions, clip_curves
from audio_residual.analysis.listen import keep_salient, mel_to_audio, write_wav
from audio_residual.analysis.saliency import AttributionOptions, Scorer, attribute, class_probabilities
from audio_residual.io import digest, read_keyed_npz, write_npz

MODES = ("deletion", "insertion")


def module_digest(module: nn.Module | None) -> str | None:
    """A hash of a module's parameters and buffers (an adapter's λ): part of a clip's key."""
    if module is None:
        return None
    sha = hashlib.sha256()
    for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()[:16]


@dataclass(frozen=True)
class ClipJob:
    """What every clip of one run shares: the scorers, the options and where its outputs go."""

    ws: object  # the Workspace
    scorer: Scorer  # the explained (adapted, if any) model
    randomised: Scorer
    zero_shot: Scorer | None  # with an adapter: the plain model, for the before/after comparison
    methods: tuple[str, ...]
    attribution: AttributionOptions
    faithfulness: FaithfulnessOptions
    listen: tuple[str, ...]
    listen_options: tuple[float, int]  # (keep_fraction, Griffin-Lim iterations)
    root: Path
    key: str  # the run's part of every clip key

    def record(self, row: int) -> Path:
        return self.root / "clips" / f"clip{row}.npz"

    def wav(self, name: str) -> Path:
        return self.root / "wavs" / f"{name}.wav"

    def wav_names(self, row: int) -> list[str]:
        """The clip inverted, then its top cells of each `listen` method (none without `listen`)."""
        if not self.listen:
            return []
        percent = round(100 * self.listen_options[0])
        return [f"clip{row}_original", *(f"clip{row}_{m}_top{percent}" for m in self.listen)]

    def clip_key(self, row: int, target: int) -> str:
        return digest([self.key, int(row), int(target), self.ws.features.identities[int(row)]])


def _listen(job: ClipJob, row: int, maps: np.ndarray, overwrite: bool) -> None:
    """The clip's log-mel and its top cells of each `listen` method as wavs: all of them for maps just computed
    (a file there is another run's), only those missing for a record read back (a run killed mid-listen)."""
    if not job.listen:
        return
    extractor = job.ws.bundle.feature_extractor
    log_mel = np.asarray(job.ws.features.input_features[row], dtype=np.float32)[0]
    fraction, n_iter = job.listen_options
    for name, method in zip(job.wav_names(row), [None, *job.listen], strict=True):
        if not overwrite and job.wav(name).is_file():
            continue
        kept = log_mel if method is None else keep_salient(log_mel, maps[job.methods.index(method)], fraction)
        write_wav(job.wav(name), mel_to_audio(kept, extractor, n_iter=n_iter), extractor.sampling_rate)


def explain_clip(job: ClipJob, row: int, target: int) -> tuple[dict[str, np.ndarray], bool]:
    """The clip's record (read back when stored under its key, else computed and stored) and whether it was read."""
    key = job.clip_key(row, target)
    record = read_keyed_npz(job.record(row), key)
    resumed = record is not None
    if record is None:
        record = _compute(job, row, target)
        record["key"] = np.array(key)
    _listen(job, row, record["maps"], overwrite=not resumed)
    if not resumed:
        write_npz(job.record(row), record, compressed=True)  # last: a clip with a record has its wavs
    return record, resumed


def _compute(job: ClipJob, row: int, target: int) -> dict[str, np.ndarray]:
    ws, methods, options = job.ws, job.methods, job.attribution
    device = ws.bundle.device
    x = torch.from_numpy(np.array(ws.features.input_features[row : row + 1], dtype=np.float32)).to(device)
    longer = torch.as_tensor(np.asarray(ws.features.is_longer)[row : row + 1]).reshape(1, 1).to(device)
    t = torch.tensor([int(target)], device=device)
    own = attribute(job.scorer, x, t, methods, longer, options)
    randomised = attribute(job.randomised, x, t, methods, longer, options)
    maps = np.stack([own.maps[m][0].numpy() for m in methods])
    random_maps = np.stack([randomised.maps[m][0].numpy() for m in methods])
    judged = {**dict(zip(methods, maps, strict=True)),
              **{f"randomised:{m}": v for m, v in zip(methods, random_maps, strict=True)}}
    curves = clip_curves(job.scorer, x[0], int(target), judged, longer[0], job.faithfulness, row)
    names = list(curves)
    record = {
        "maps": maps, "randomised": random_maps,
        "curve_names": np.array(names), "curves": np.stack([[curves[n][m] for m in MODES] for n in names]),
        "score": own.scores.numpy(), "baseline_score": own.baseline_scores.numpy(),
        "probs_x": class_probabilities(job.scorer, x, longer)[0],
        "probs_b": class_probabilities(job.scorer, options.baseline(x), longer)[0],
    }  # fmt: skip
    if own.ig_delta is not None:
        record.update(ig_delta=own.ig_delta.numpy(), ig_steps=own.ig_steps.numpy(),
                      ig_converged=own.ig_converged.numpy())
    if job.zero_shot is not None:
        before = attribute(job.zero_shot, x, t, methods, longer, options)
        record["before"] = np.stack([before.maps[m][0].numpy() for m in methods])
    return record
