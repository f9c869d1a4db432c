"""Load a CLAP model and its processor by hub id or local folder, on the best available device.

Uses `transformers`' `ClapModel` rather than the `laion-clap` package: the latter needs the network in its
constructor and pins numpy<2, while the same LAION weights are published for transformers.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from transformers import ClapModel, ClapProcessor

DEFAULT_MODEL = "laion/clap-htsat-unfused"
TINY_MODEL = "tiny"  # the tiny CLAP pretrained on generated captioned audio, shipped in the package
TINY_RANDOM_MODEL = "tiny-random"  # the offline random-initialised model of `audio_residual.clap.tiny`
TINY_PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_tiny"


@dataclass
class ClapBundle:
    """A frozen CLAP model with the processor it was trained with."""

    model: ClapModel
    processor: ClapProcessor
    model_id: str
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype on CUDA; None means plain fp32
    revision: str | None = None  # the hub revision asked for (branch, tag or commit), if any
    commit: str | None = None  # the commit the hub files were loaded from; None for local folders

    @property
    def feature_extractor(self):
        return self.processor.feature_extractor

    @property
    def enable_fusion(self) -> bool:
        return bool(self.model.config.audio_config.enable_fusion)

    @property
    def provenance(self) -> dict:
        """Which weights these are: id or path, revision asked, commit resolved on the hub, library version."""
        return {
            "model": self.model_id,
            "revision": self.revision,
            "commit": self.commit,
            "transformers": transformers.__version__,
            "enable_fusion": self.enable_fusion,
        }

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def autocast(self):
        """Autocast context for forward passes: bf16/fp16 on CUDA when asked for, a no-op elsewhere."""
        if self.amp_dtype is None or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an unknown or unavailable device is a ValueError naming it."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {str(device)!r}: use auto, cpu, cuda, cuda:N or mps")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu or auto")
    return resolved


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """`auto` is bf16 on CUDA devices that support it, else fp16 on CUDA, else off."""
    if amp in (None, "none", "off", "fp32") or device.type != "cuda":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if amp not in choices:
        raise ValueError(f"amp must be one of auto, bf16, fp16, none; got {amp!r}")
    return choices[amp]


def truncation_for(model: ClapModel) -> str:
    """The extractor's truncation a CLAP model was trained with; it also picks the mel filterbank.

    In transformers' extractor, "fusion" means HTK filters and 4 stacked channels, "rand_trunc" Slaney
    filters and 1 channel: the mode follows the model's `enable_fusion`, whatever the processor file says.
    """
    return "fusion" if model.config.audio_config.enable_fusion else "rand_trunc"


def align_truncation(model: ClapModel, processor: ClapProcessor, model_id: str) -> None:
    """Set the processor's truncation from the model, warning when the checkpoint's processor disagreed."""
    extractor = processor.feature_extractor
    wanted = truncation_for(model)
    if extractor.truncation != wanted:
        warnings.warn(
            f"{model_id}: the processor says truncation={extractor.truncation!r} but the model has "
            f"enable_fusion={model.config.audio_config.enable_fusion}, which needs truncation={wanted!r}; "
            f"using {wanted!r}",
            stacklevel=3,
        )
        extractor.truncation = wanted


def resolved_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub model's files came from, read off the cached snapshot (no network).

    transformers 5 no longer keeps it on the config (`_commit_hash`); the snapshot folder is named by it.
    """
    path = huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(path).parent.name if isinstance(path, str) else None
def _check_local_model(path: Path) -> None:
    """For a local path (one that exists, or is written as a path), refuse anything but a saved CLAP folder."""
    text = str(path)
    if not path.exists():
        if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
            raise FileNotFoundError(f"model folder not found: {path}")
        return  # a hub id such as laion/clap-htsat-unfused
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is a local path but holds no config.json: not a saved CLAP model")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}): not a saved CLAP model") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clap":
        raise ValueError(f"{path} holds a model of type {model_type!r}, not 'clap'")


def load_clap(
    model: str | Path = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    amp: str | None = "auto",
    class_names: tuple[str, ...] | None = None,
    revision: str | None = None,
) -> ClapBundle:
    """Load CLAP from a hub id (at `revision`, default the newest) or a local folder (eval mode, frozen).

    `model="tiny"` is the tiny CLAP pretrained on generated captioned audio (shipped, see `pretrain --preset
    tiny`); `model="tiny-random"` builds the random-initialised one, its tokenizer trained on `class_names`.
    """
    device = resolve_device(device)
    path = Path(model)
    if revision is not None and (str(model) in (TINY_MODEL, TINY_RANDOM_MODEL) or path.exists()):
        raise ValueError(f"revision {revision!r} applies to hub models, not to {str(model)!r}")
    commit = None
    if str(model) == TINY_RANDOM_MODEL:
        from audio_residual.clap.tiny import build_tiny_clap

        model_obj, processor = build_tiny_clap(class_names or ())
        model_id = TINY_RANDOM_MODEL
    elif str(model) == TINY_MODEL:
        model_obj = ClapModel.from_pretrained(TINY_PRETRAINED_DIR)
        processor = ClapProcessor.from_pretrained(TINY_PRETRAINED_DIR)
        model_id = TINY_MODEL
    else:
        _check_local_model(Path(model))
        try:
            model_obj = ClapModel.from_pretrained(str(model), revision=revision)
            processor = ClapProcessor.from_pretrained(str(model), revision=revision)
        except OSError as err:  # transformers' own messages run over several lines; keep the first
            raise OSError(f"cannot load CLAP model {str(model)!r}: {str(err).splitlines()[0]}") from err
        model_id = str(model)
        if not path.exists():
            commit = resolved_commit(model_id, revision)
    align_truncation(model_obj, processor, model_id)
    model_obj.to(device).eval().requires_grad_(False)
    return ClapBundle(model_obj, processor, model_id, device, resolve_amp(amp, device), revision, commit)
