"""LAION's own CLAP checkpoints (the `.pt` files of LAION-AI/CLAP, hub repo `lukewys/laion_clap`) as a
transformers `ClapModel` + `ClapProcessor`.

LAION publishes its best checkpoints only in its own layout, and the `laion_clap` package pins numpy < 2;
transformers 5 no longer ships a converter (its old one loaded with `strict=False`, so a misnamed key
passed silently). Here every LAION tensor is either mapped onto a transformers tensor or listed as
deliberately unused, and every transformers tensor must be filled: anything else is an error naming the key.
The audio config is read off the tensor shapes; the text tower is RoBERTa-base, whose config and tokenizer
cannot be read off the weights, so they come from the hub (or its cache) or from a folder the user names.
A conversion is written once into a cache folder keyed by the checkpoint file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, ClapAudioConfig, ClapConfig, ClapModel, ClapProcessor

from audio_residual.clap.tiny import hub_feature_extractor
from audio_residual.io import write_json

LAION_PREFIX = "laion:"
LAION_HUB_REPO = "lukewys/laion_clap"
ROBERTA_SOURCES = ("FacebookAI/roberta-base", "roberta-base")  # LAION loads 'roberta-base' (now redirected)
LAION_TEXT_TOKENS = 77  # laion_clap's tokenizer: truncation=True, max_length=77 (what its CLAPs were trained on)
CONVERSION_VERSION = 1  # bump when the converted folders change, so stale conversions are redone
SOURCE_FILE = "laion_source.json"  # written beside the converted model: what it was made from

_AUDIO = "audio_model.audio_encoder"
_BLOCK = r"audio_branch\.layers\.(\d+)\.blocks\.(\d+)\."
# (LAION name pattern, transformers name): every LAION tensor that has a transformers counterpart.
_RENAMES = [
    (r"logit_scale_([at])", r"logit_scale_\1"),
    (r"(audio|text)_projection\.0\.(weight|bias)", r"\1_projection.linear1.\2"),
    (r"(audio|text)_projection\.2\.(weight|bias)", r"\1_projection.linear2.\2"),
    (r"text_branch\.((?:embeddings|encoder|pooler)\..+)", r"text_model.\1"),
    (r"audio_branch\.bn0\.(.+)", rf"{_AUDIO}.batch_norm.\1"),
    (r"audio_branch\.patch_embed\.(.+)", rf"{_AUDIO}.patch_embed.\1"),
    (_BLOCK + r"norm1\.(.+)", rf"{_AUDIO}.layers.\1.blocks.\2.layernorm_before.\3"),
    (_BLOCK + r"norm2\.(.+)", rf"{_AUDIO}.layers.\1.blocks.\2.layernorm_after.\3"),
    (_BLOCK + r"attn\.relative_position_bias_table",
     rf"{_AUDIO}.layers.\1.blocks.\2.attention.self.relative_position_bias_table"),
    (_BLOCK + r"attn\.proj\.(.+)", rf"{_AUDIO}.layers.\1.blocks.\2.attention.output.dense.\3"),
    (_BLOCK + r"mlp\.fc1\.(.+)", rf"{_AUDIO}.layers.\1.blocks.\2.intermediate.dense.\3"),
    (_BLOCK + r"mlp\.fc2\.(.+)", rf"{_AUDIO}.layers.\1.blocks.\2.output.dense.\3"),
    (r"audio_branch\.layers\.(\d+)\.downsample\.(.+)", rf"{_AUDIO}.layers.\1.downsample.\2"),
    (r"audio_branch\.norm\.(.+)", rf"{_AUDIO}.norm.\1"),
]
_QKV = re.compile(_BLOCK + r"attn\.qkv\.(weight|bias)")  # one fused tensor → query, key, value (in that order)
_RELATIVE_INDEX = re.compile(_BLOCK + r"attn\.relative_position_index")  # derived; checked, not copied
# LAION tensors with no transformers counterpart (or one transformers derives itself), and why they are left out.
_UNUSED = [
    (r"audio_branch\.spectrogram_extractor\..+", "torchlibrosa STFT kernels (the mel is computed by the processor)"),
    (r"audio_branch\.logmel_extractor\..+", "torchlibrosa mel filterbank (the mel is computed by the processor)"),
    (_BLOCK + r"attn_mask", "precomputed shifted-window attention mask (transformers recomputes it)"),
    (r"audio_branch\.(tscam_conv|head)\..+", "AudioSet classification head (not part of the embedding)"),
    (r"(audio|text)_transform\..+", "training-only MLP (not part of the embedding)"),
    (r"text_branch\.embeddings\.(position_ids|token_type_ids)", "derived buffer (transformers builds its own)"),
]
# transformers tensors the model derives itself: not expected from the checkpoint.
_DERIVED = re.compile(r"text_model\.embeddings\.(position_ids|token_type_ids)|.+\.relative_position_index")


class LaionCheckpointError(ValueError):
    """A LAION checkpoint cannot be converted; the message names the file and the reason, on one line."""


def is_laion_checkpoint(model: str | Path) -> bool:
    """`laion:NAME`, a path to a `.pt` file (LAION's own format), or a folder with `.pt` files and no config.json."""
    text, path = str(model), Path(model).expanduser()
    if text.startswith(LAION_PREFIX) or text.endswith(".pt"):
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.pt"))


def _single_checkpoint(folder: Path) -> Path:
    """The one `.pt` file of a folder that holds a downloaded LAION checkpoint."""
    files = sorted(folder.glob("*.pt"))
    if len(files) != 1:
        names = ", ".join(file.name for file in files)
        raise LaionCheckpointError(f"{folder} holds {len(files)} .pt files ({names}): pass one of them as --model")
    return files[0]


def fetch_laion(name: str, revision: str | None = None) -> Path:
    """The hub file `lukewys/laion_clap/NAME` (`.pt` added when missing), downloaded or from the hub cache."""
    import huggingface_hub

    filename = name if name.endswith(".pt") else f"{name}.pt"
    try:
        return Path(huggingface_hub.hf_hub_download(LAION_HUB_REPO, filename, revision=revision))
    except (OSError, ValueError) as err:  # offline, unknown file, no access: hub errors are OSErrors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(
            f"cannot fetch {LAION_PREFIX}{name} from the hub repo {LAION_HUB_REPO} ({first}); "
            f"download {filename} yourself and pass its path as --model"
        ) from err


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_laion_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, `module.` prefix removed; loaded with `weights_only=True` (no code runs)."""
    if not path.is_file():
        raise FileNotFoundError(f"LAION checkpoint not found: {path}")
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # mmap needs the zip format; older torch.save files are read whole
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0]
        raise LaionCheckpointError(
            f"{path}: refused, it needs pickled objects beyond tensors to load (weights_only=True: {first})"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaionCheckpointError(f"{path}: truncated or not a torch checkpoint ({first})") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise LaionCheckpointError(f"{path}: holds no state_dict of tensors (a {type(checkpoint).__name__})")
    bad = next((key for key, value in state.items() if not isinstance(value, torch.Tensor)), None)
    if bad is not None:
        raise LaionCheckpointError(f"{path}: state_dict entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _need(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise LaionCheckpointError(f"missing key {key!r}: not a LAION HTSAT + RoBERTa CLAP checkpoint")
    return state[key]


def infer_audio_config(state: dict[str, torch.Tensor]) -> ClapAudioConfig:
    """HTSAT's geometry from the tensor shapes (tiny, base, fusion or not).

    Stride and spectrogram size are not in any weight shape; LAION's HTSATs all use stride = patch size and
    a 256×256 image, which the stored shifted-window masks must confirm (else an error).
    """
    proj = _need(state, "audio_branch.patch_embed.proj.weight")
    embed, channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    stages = sorted({int(m.group(1)) for key in state if (m := re.match(_BLOCK, key))})
    depths = [len({int(m.group(2)) for key in state if (m := re.match(_BLOCK, key)) and int(m.group(1)) == i})
              for i in stages]
    if not stages or stages != list(range(len(stages))):
        raise LaionCheckpointError(f"audio_branch.layers: stages {stages} are not numbered 0..N-1")
    tables = [_need(state, f"audio_branch.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in stages]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    fc1 = _need(state, "audio_branch.layers.0.blocks.0.mlp.fc1.weight")
    if any(key.startswith("audio_branch.mel_conv1d.") for key in state):
        raise LaionCheckpointError("audio_branch.mel_conv1d: 1-D fusion checkpoints have no transformers model")
    config = ClapAudioConfig(
        patch_size=patch,
        patch_stride=[patch, patch],
        patch_embeds_hidden_size=embed,
        patch_embed_input_channels=channels,
        hidden_size=_need(state, "audio_branch.norm.weight").shape[0],
        depths=depths,
        num_attention_heads=[table.shape[1] for table in tables],
        window_size=window,
        num_mel_bins=_need(state, "audio_branch.bn0.weight").shape[0],
        mlp_ratio=fc1.shape[0] / fc1.shape[1],
        enable_fusion="audio_branch.patch_embed.mel_conv2d.weight" in state,
        spec_size=256,
    )
    _check_grid(state, config)
    return config


def _check_grid(state: dict[str, torch.Tensor], config: ClapAudioConfig) -> None:
    """The token grid implied by the config must match the stored shifted-window masks, stage by stage."""
    grid = config.spec_size // config.patch_stride[0]
    for stage in range(len(config.depths)):
        side = grid // 2**stage
        window = min(config.window_size, side)
        for key in (k for k in state if re.fullmatch(rf"audio_branch\.layers\.{stage}\.blocks\.\d+\.attn_mask", k)):
            expected = ((side // window) ** 2, window * window, window * window)
            if tuple(state[key].shape) != expected:
                raise LaionCheckpointError(
                    f"{key} has shape {tuple(state[key].shape)}, expected {expected} for a {config.spec_size}² "
                    f"spectrogram image in {config.patch_stride[0]}×{config.patch_stride[0]} patches"
                )


def _map_key(key: str) -> list[str] | None:
    """transformers names for a LAION key ([] when deliberately unused), or None when it is unknown."""
    if _RELATIVE_INDEX.fullmatch(key) or any(re.fullmatch(pattern, key) for pattern, _ in _UNUSED):
        return []
    for pattern, replacement in _RENAMES:
        if re.fullmatch(pattern, key):
            return [re.sub(f"^{pattern}$", replacement, key)]
    if match := _QKV.fullmatch(key):
        stage, block, kind = match.groups()
        return [f"{_AUDIO}.layers.{stage}.blocks.{block}.attention.self.{part}.{kind}" for part in ("query", "key", "value")]
    return None


def convert_state_dict(state: dict[str, torch.Tensor], model: ClapModel) -> dict[str, torch.Tensor]:
    """transformers' state dict filled from LAION's, strictly: unknown, missing or misshapen keys are errors."""
    target = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        names = _map_key(key)
        if names is None or any(name not in target for name in names):
            raise LaionCheckpointError(f"unexpected key {key!r}: no transformers counterpart and not a known unused one")
        if not names:
            continue  # deliberately unused (`_UNUSED`) or checked below (relative position index)
        pieces = tensor.chunk(3, dim=0) if len(names) == 3 else [tensor]
        for name, piece in zip(names, pieces, strict=True):
            if piece.shape != target[name].shape:
                raise LaionCheckpointError(
                    f"{key!r} has shape {tuple(tensor.shape)}, but transformers' {name} needs "
                    f"{tuple(target[name].shape)}{' per third' if len(names) == 3 else ''}"
                )
            converted[name] = piece.to(target[name].dtype)
    for match in filter(None, map(_RELATIVE_INDEX.fullmatch, state)):
        name = f"{_AUDIO}.layers.{match.group(1)}.blocks.{match.group(2)}.attention.self.relative_position_index"
        if not torch.equal(state[match.group(0)].long(), target[name].long()):
            raise LaionCheckpointError(f"{match.group(0)!r} differs from the index of a {model.config.audio_config.window_size}-window")
    missing = [name for name in target if name not in converted and not _DERIVED.fullmatch(name)]
    if missing:
        raise LaionCheckpointError(f"missing key: the checkpoint has no tensor for transformers' {missing[0]}"
                                   f" ({len(missing)} missing in all)")
    return {**target, **converted}


def load_text_source(text_config: str | Path | None) -> tuple[dict, object, str]:
    """RoBERTa-base's config (as a dict) and tokenizer, and where they came from.

    From `text_config` (a folder holding config.json and the tokenizer files) when given, else from the hub
    (or its cache) under RoBERTa-base's ids. Offline without either, the error names what is missing.
    """
    sources = (str(text_config),) if text_config is not None else ROBERTA_SOURCES
    errors = []
    for source in sources:
        try:
            config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            errors.append(f"{source}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            continue
        return config.to_dict(), tokenizer, source
    where = f"the folder {text_config}" if text_config is not None else f"the hub or its cache ({', '.join(sources)})"
    raise OSError(
        f"a LAION checkpoint's text tower is RoBERTa-base, but its config.json and tokenizer (vocab.json, "
        f"merges.txt) are not in {where}: pass --text-config DIR with a saved roberta-base, or convert once "
        f"online ({'; '.join(errors)})"
    )


_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
              "bos_token_id", "eos_token_id")


def build_config(state: dict[str, torch.Tensor], text: dict) -> ClapConfig:
    """The ClapConfig of a LAION checkpoint: audio from the shapes, text from RoBERTa's config."""
    missing = [key for key in _TEXT_KEYS if key not in text]
    if missing:
        raise LaionCheckpointError(f"text config lacks {missing[0]!r}: not a RoBERTa config")
    audio = infer_audio_config(state)
    return ClapConfig(
        text_config={key: text[key] for key in _TEXT_KEYS},
        audio_config=audio.to_dict(),
        projection_dim=_need(state, "audio_projection.0.weight").shape[0],
    )


def convert_laion(
    state: dict[str, torch.Tensor], text_config: str | Path | None = None
) -> tuple[ClapModel, ClapProcessor, str]:
    """A LAION state dict (`read_laion_state_dict`) as an eval-mode ClapModel, its processor, the text source."""
    text, tokenizer, source = load_text_source(text_config)
    config = build_config(state, text)
    words = _need(state, "text_branch.embeddings.word_embeddings.weight").shape[0]
    if len(tokenizer) != words:
        raise LaionCheckpointError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but the checkpoint's text tower embeds {words}"
        )
    model = ClapModel(config).eval()
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    tokenizer.model_max_length = LAION_TEXT_TOKENS  # LAION's tokenizer truncates at 77 (`loading.text_length`)
    extractor = hub_feature_extractor(config.audio_config.enable_fusion)
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer), source


def conversion_record(folder: str | Path) -> dict | None:
    """The source record of a converted folder named directly (what `converted_laion` wrote), else None."""
    path = Path(folder).expanduser() / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LaionCheckpointError(f"{path}: unreadable conversion record ({err})") from err
    if not isinstance(record, dict) or "sha256" not in record:
        raise LaionCheckpointError(f"{path}: not a conversion record (no sha256)")
    return record


def default_cache_dir() -> Path:
    """Where conversions go when the caller names no cache: $AUDIO_RESIDUAL_CACHE, else ~/.cache/audio-residual."""
    root = os.environ.get("AUDIO_RESIDUAL_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "audio-residual") / "laion-converted"


def converted_laion(
    model: str | Path,
    text_config: str | Path | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> tuple[Path, dict]:
    """The cached transformers folder of a LAION checkpoint (converting it on first use) and its source record.

    The folder is keyed by the file's SHA-256 and the conversion version, so a renamed copy is not redone and
    a replaced file is. The record (file name, digest, hub repo, text tower source) goes into provenance.
    """
    text = str(model)
    if text.startswith(LAION_PREFIX):
        path = fetch_laion(text.removeprefix(LAION_PREFIX), revision)
    else:
        path = Path(model).expanduser()
        path = _single_checkpoint(path) if path.is_dir() else path
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to hub models, not to the file {text!r}")
    if not path.is_file():
        raise FileNotFoundError(f"LAION checkpoint not found: {path}")
    sha = file_sha256(path)
    folder = Path(cache_dir or default_cache_dir()) / f"{sha[:24]}-v{CONVERSION_VERSION}"
    from_hub = text.startswith(LAION_PREFIX)  # hub files sit in snapshots/<commit>/: record the commit
    here = {"file": path.name, "sha256": sha, "hub_repo": LAION_HUB_REPO if from_hub else None,
            "hub_commit": path.parent.name if from_hub else None}
    if (record := conversion_record(folder)) is not None:  # converted before, maybe under another name: ours counts
        return folder, {**record, **here}
    try:
        model_obj, processor, source = convert_laion(read_laion_state_dict(path), text_config)
    except LaionCheckpointError as err:
        message = str(err)
        raise LaionCheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from err
    record = {
        **here,
        "text_tower": source,
        "conversion_version": CONVERSION_VERSION,
    }
    _save_atomically(folder, model_obj, processor, record)
    return folder, record


def _save_atomically(folder: Path, model: ClapModel, processor: ClapProcessor, record: dict) -> None:
    """Write into a temporary sibling, then rename: an interrupted conversion never looks finished."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if folder.exists() and not (folder / SOURCE_FILE).is_file():
            shutil.rmtree(folder)  # a conversion interrupted by an older version: redo it
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / SOURCE_FILE, record)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
