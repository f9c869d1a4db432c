"""Load a CLAP model and its processor by hub id or local folder, on the best available device.

Uses `transformers`' `ClapModel` rather than the `laion-clap` package: the latter needs the network in its
constructor and pins numpy<2, while the same LAION weights are published for transformers.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import ClapModel, ClapProcessor

from audio_residual.clap.laion import LAION_TEXT_TOKENS

DEFAULT_MODEL = "laion/clap-htsat-unfused"
TINY_MODEL = "tiny"  # the tiny CLAP pretrained on generated captioned audio, shipped in the package
TINY_RANDOM_MODEL = "tiny-random"  # the offline random-initialised model of `audio_residual.clap.tiny`
TINY_PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_tiny"
# LAION's CLAPs on the hub, as an id (`laion/clap-htsat-unfused`) or a hub-cache folder (`models--laion--...`).
LAION_HUB_CLAP = re.compile(r"(^|[/\\])(laion/|models--laion--)(clap-htsat-|larger_clap_)")
VERY_LONG = 1_000_000  # a tokenizer's model_max_length at or above this means "no limit" (transformers: 1e30)


@dataclass(frozen=True)
class TextLength:
    """How many tokens (specials included) a model's text side reads, and why: longer text is truncated."""

    max_tokens: int
    rule: str

    def describe(self) -> dict:
        return {"max_tokens": self.max_tokens, "rule": self.rule}


def position_limit(text_model: torch.nn.Module) -> int | None:
    """Tokens a text tower's absolute position embeddings can number; None without any (relative positions).

    RoBERTa-style embeddings (they carry a `padding_idx`) number tokens from padding_idx + 1, so they hold
    max_position_embeddings − padding_idx − 1 tokens (514 positions: 512 tokens); others one token per position.
    """
    for module in text_model.modules():
        table = getattr(module, "position_embeddings", getattr(module, "position_embedding", None))
        if isinstance(table, torch.nn.Embedding):
            padding = getattr(module, "padding_idx", None)
            return table.num_embeddings - (padding + 1 if isinstance(padding, int) else 0)
    return None


def text_length(model_id: str, tokenizer, text_model: torch.nn.Module, source: dict | None = None) -> TextLength:
    """The one rule for the maximum text length of a loaded model: text is truncated the way it was trained.

    LAION's CLAPs read 77 tokens, as `laion_clap`'s tokenizer truncated every caption in training (positions
    past 77 were never trained; their hub tokenizers nevertheless say 512). They are recognised by
    - the conversion record (`source`, `laion_source.json`) of a `.pt` converted by `clap/laion.py`, whether
      loaded as the `.pt`, `laion:NAME` or the converted folder itself;
    - the hub id of LAION's hub CLAPs, `laion/clap-htsat-*` and `laion/larger_clap_*` (also inside a path,
      e.g. a hub-cache folder `models--laion--clap-htsat-unfused/...`).
    Any other model reads its tokenizer's limit (`model_max_length`), capped by what its text tower's position
    embeddings can number (`position_limit`). `load_clap` writes the result into the tokenizer's limit, so a
    model fine-tuned from a LAION CLAP and saved with its processor keeps 77 through that rule.
    """
    limit = position_limit(text_model)
    if source is not None or LAION_HUB_CLAP.search(str(model_id)):
        what = "a converted LAION .pt" if source is not None else f"LAION's {model_id}"
        tokens = LAION_TEXT_TOKENS if limit is None else min(LAION_TEXT_TOKENS, limit)
        return TextLength(tokens, f"{what}: truncated at {tokens} tokens, as LAION's tokenizer did in training")
    own = int(min(getattr(tokenizer, "model_max_length", None) or VERY_LONG, VERY_LONG))
    said = f"the tokenizer's limit ({own})" if own < VERY_LONG else "the tokenizer sets no limit"
    if limit is None or own <= limit:
        return TextLength(own, said if limit is not None or own < VERY_LONG else f"{said} (relative positions)")
    return TextLength(limit, f"{said}, capped at the {limit} tokens the text tower's position embeddings number")


def tokenize(tokenizer, texts, length: TextLength):
    """Padded, truncated token ids and mask (PyTorch tensors) of `texts` under `length`: never longer than
    the model reads, whatever the text."""
    return tokenizer(list(texts), padding=True, truncation=True, max_length=length.max_tokens, return_tensors="pt")


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
    source: dict | None = None  # a converted LAION `.pt`: its file name, SHA-256 and text tower (clap/laion.py)
    text_rule: TextLength | None = None  # the text length rule decided at load (`text_length`); None: decide now

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
            "text_length": self.text_length.describe(),
            **({"laion_checkpoint": self.source} if self.source is not None else {}),
        }

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def text_length(self) -> TextLength:
        """How much of a text the model reads (`text_length`): longer captions and prompts are truncated."""
        if self.text_rule is not None:
            return self.text_rule
        return text_length(self.model_id, self.tokenizer, self.model.text_model, self.source)

    def tokenize(self, texts):
        """Token ids and mask of `texts` on the model's device, truncated by `text_length`."""
        return tokenize(self.tokenizer, texts, self.text_length).to(self.device)

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
    _check_weights(path, config)


def _check_weights(path: Path, config: dict) -> None:
    """Before transformers prints its load report: `model.safetensors` readable, projection as configured."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return  # sharded or .bin weights: transformers checks those
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = set(handle.keys())
            stored = handle.get_slice("text_projection.linear2.weight").get_shape()[0] if (
                "text_projection.linear2.weight" in keys) else None
    except SafetensorError as err:
        raise weights_error(path, err) from None
    wanted = config.get("projection_dim", 512)
    if stored is not None and stored != wanted:
        raise ValueError(f"cannot load CLAP model {str(path)!r}: its weights do not match its config.json "
                         f"(config.json says projection_dim={wanted}, the weights have {stored})")


def load_clap(
    model: str | Path = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    amp: str | None = "auto",
    class_names: tuple[str, ...] | None = None,
    revision: str | None = None,
    text_config: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> ClapBundle:
    """Load CLAP from a hub id (at `revision`, default the newest) or a local folder (eval mode, frozen).

    `model="tiny"` is the tiny CLAP pretrained on generated captioned audio (shipped, see `pretrain --preset
    tiny`); `model="tiny-random"` builds the random-initialised one, its tokenizer trained on `class_names`.
    A LAION `.pt` file or `laion:NAME` is converted once into `cache_dir` (see `clap/laion.py`), its text
    tower's config and tokenizer taken from `text_config` (a folder) or RoBERTa-base on the hub.
    """
    device = resolve_device(device)
    model, source = _resolve_laion(model, text_config, cache_dir, revision)
    if source is not None:
        revision = None  # it named the LAION hub file's revision, now resolved
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
        except (SafetensorError, RuntimeError) as err:
            raise weights_error(model, err) from err
        model_id = str(model) if source is None else source["file"]
        if not path.exists():
            commit = resolved_commit(model_id, revision)
    align_truncation(model_obj, processor, model_id)
    check_tokenizer(model_obj, processor.tokenizer, model_id)
    model_obj.to(device).eval().requires_grad_(False)
    rule = text_length(model_id, processor.tokenizer, model_obj.text_model, source)
    if rule.max_tokens < VERY_LONG:  # saved with the processor, a fine-tuned copy keeps the limit
        processor.tokenizer.model_max_length = rule.max_tokens
    return ClapBundle(model_obj, processor, model_id, device, resolve_amp(amp, device), revision, commit, source,
                      rule)


@dataclass(frozen=True)
class ModelSource:
    """Which CLAP a command runs, and where: hub id, local folder, `tiny`, or LAION's `.pt` (`text_config`: the
    RoBERTa-base folder it needs offline), at a hub `revision`, on `device` with `amp` autocast on CUDA."""

    model: str | Path = DEFAULT_MODEL
    revision: str | None = None
    text_config: str | Path | None = None
    device: str = "auto"
    amp: str = "auto"

    def load(self, class_names: tuple[str, ...] = (), cache_dir: str | Path | None = None) -> ClapBundle:
        """The bundle; `class_names` train the offline random model's tokenizer (`tiny-random`), `cache_dir`
        holds converted LAION checkpoints."""
        return load_clap(self.model, device=self.device, amp=self.amp, class_names=class_names,
                         revision=self.revision, text_config=self.text_config, cache_dir=cache_dir)


def _resolve_laion(model, text_config, cache_dir, revision) -> tuple[str | Path, dict | None]:
    """A LAION checkpoint becomes the folder of its cached conversion; any other model passes unchanged."""
    from audio_residual.clap.laion import conversion_record, converted_laion, is_laion_checkpoint

    if not is_laion_checkpoint(model):
        if text_config is not None:
            raise ValueError(f"text_config applies to LAION .pt checkpoints, not to {str(model)!r}")
        record = conversion_record(model)  # a converted folder named directly is still that checkpoint
        if record is not None and revision is not None:
            raise ValueError(f"revision {revision!r} applies to hub models, not to {str(model)!r}")
        return model, record
    return converted_laion(model, text_config=text_config, cache_dir=cache_dir, revision=revision)


def weights_error(model: str | Path, err: Exception) -> ValueError:
    """One line for weights transformers cannot load: a damaged `model.safetensors` (truncated, empty, not
    safetensors) or weights whose shapes disagree with `config.json` (e.g. `projection_dim`)."""
    weights = Path(model) / "model.safetensors" if Path(model).exists() else "its model.safetensors"
    if isinstance(err, SafetensorError):
        return ValueError(f"cannot load CLAP model {str(model)!r}: {weights} is damaged ({str(err).splitlines()[0]}); "
                          "download it again")
    return ValueError(f"cannot load CLAP model {str(model)!r}: its weights do not match its config.json "
                      f"({str(err).splitlines()[0]})")


def check_tokenizer(model: ClapModel, tokenizer, model_id: str) -> None:
    """Refuse a tokenizer that cannot be the model's: ids beyond the text tower's vocabulary, or one that
    gives two different prompts the same ids (transformers builds a 5-token one when a folder has no
    tokenizer files; every class would then score alike, silently at chance)."""
    vocab_size = model.config.text_config.vocab_size
    if len(tokenizer) > vocab_size:
        raise ValueError(f"{model_id}: the tokenizer has {len(tokenizer)} tokens but the text config's vocab_size is "
                         f"{vocab_size}: they are not from the same model")
    first, second = (tokenizer(text)["input_ids"] for text in ("This is a sound of dog.", "This is a sound of rain."))
    special = set(tokenizer.all_special_ids)
    if first == second or set(first) <= special:
        raise ValueError(f"{model_id}: its tokenizer ({len(tokenizer)} tokens, text config vocab_size {vocab_size}) "
                         "gives different prompts the same ids: the folder lacks the model's tokenizer files")
