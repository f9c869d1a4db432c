"""Small random-initialised CLAPs that need no download: for tests, the offline demo and benchmarks.

The tiny model keeps HTSAT's family traits (4 stages, shifted window attention, patch merging, the real
48 kHz / 64-mel processor) at a fraction of the width, so every code path of the real model is exercised.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapProcessor,
    ClapTextConfig,
    RobertaTokenizerFast,
)

PROMPT_WORDS = "This is a sound of the an a sound recording of audio clip"


def tiny_clap_config(vocab_size: int = 512, enable_fusion: bool = False) -> ClapConfig:
    """4 stages (depths 2,1,2,1; heads 2,2,4,4; widths 16..128) on the real 48 kHz 64-mel input.

    8×8 patches and 4×4 windows (HTSAT: 4×4 and 8×8) make a 32×32 token grid, 16× cheaper than HTSAT's.
    `enable_fusion` adds the fusion branch of `laion/clap-htsat-fused` (local crops of clips over 10 s).
    """
    audio = ClapAudioConfig(
        depths=[2, 1, 2, 1],
        num_attention_heads=[2, 2, 4, 4],
        patch_size=8,
        patch_stride=(8, 8),
        patch_embeds_hidden_size=16,
        hidden_size=128,
        window_size=4,
        spec_size=256,
        num_mel_bins=64,
        enable_fusion=enable_fusion,
    )
    text = ClapTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    )
    # With the default init (std ∝ 0.02) the tiny text tower collapses: every class prompt embeds to
    # cosine 0.9995 with every other, so no class can be told apart. A wider init keeps them distinct.
    return ClapConfig(
        text_config={**text.to_dict(), "initializer_factor": 8.0},
        audio_config=audio.to_dict(),
        projection_dim=32,
        initializer_factor=8.0,
    )


def htsat_tiny_config(vocab_size: int = 512, enable_fusion: bool = False) -> ClapConfig:
    """The full-size HTSAT-tiny audio tower of `laion/clap-htsat-unfused` (`enable_fusion`: of
    `laion/clap-htsat-fused`) with a small text tower."""
    return _full_size_config(ClapAudioConfig(enable_fusion=enable_fusion), vocab_size)


def htsat_base_config(vocab_size: int = 512) -> ClapConfig:
    """The full-size HTSAT-base audio tower of `laion/larger_clap_general` (stage widths 128..1024, 18 blocks)."""
    audio = ClapAudioConfig(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)
    return _full_size_config(audio, vocab_size)


# The audio towers of the published checkpoints, as their config.json files give them.
REAL_GEOMETRIES = {
    "laion/clap-htsat-unfused": htsat_tiny_config,
    "laion/clap-htsat-fused": functools.partial(htsat_tiny_config, enable_fusion=True),
    "laion/larger_clap_general": htsat_base_config,
}


def _full_size_config(audio: ClapAudioConfig, vocab_size: int) -> ClapConfig:
    text = ClapTextConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    return ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict())


def offline_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> RobertaTokenizerFast:
    """A byte-level BPE with RoBERTa's special tokens, trained on the given texts (class names, prompts)."""
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([PROMPT_WORDS, *texts], trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def hub_feature_extractor(enable_fusion: bool) -> ClapFeatureExtractor:
    """The extractor of the hub checkpoints (50–14000 Hz; the class defaults start at 0 Hz).

    Truncation follows the model: "fusion" (HTK filters, 4 channels) or "rand_trunc" (Slaney, 1 channel).
    """
    truncation = "fusion" if enable_fusion else "rand_trunc"
    return ClapFeatureExtractor(frequency_min=50, frequency_max=14_000, truncation=truncation, padding="repeatpad")


def _build(config: ClapConfig, class_names: Iterable[str], seed: int) -> tuple[ClapModel, ClapProcessor]:
    names = [str(name).replace("_", " ") for name in class_names]
    tokenizer = offline_tokenizer(names, vocab_size=config.text_config.vocab_size)
    extractor = hub_feature_extractor(config.audio_config.enable_fusion)
    torch.manual_seed(seed)
    model = ClapModel(config).eval()
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def build_tiny_clap(
    class_names: Iterable[str] = (), seed: int = 0, enable_fusion: bool = False
) -> tuple[ClapModel, ClapProcessor]:
    """The tiny CLAP and its processor; same seed and class names give the same weights."""
    return _build(tiny_clap_config(enable_fusion=enable_fusion), class_names, seed)


def build_htsat_tiny_random(class_names: Iterable[str] = (), seed: int = 0) -> tuple[ClapModel, ClapProcessor]:
    """Full-size HTSAT-tiny with random weights, for exactness tests and benchmarks."""
    return _build(htsat_tiny_config(), class_names, seed)


def build_real_geometry_random(
    model_id: str, class_names: Iterable[str] = (), seed: int = 0
) -> tuple[ClapModel, ClapProcessor]:
    """Random weights in the audio geometry of a published checkpoint (a key of `REAL_GEOMETRIES`)."""
    if model_id not in REAL_GEOMETRIES:
        raise ValueError(f"no geometry for {model_id!r}: known are {sorted(REAL_GEOMETRIES)}")
    return _build(REAL_GEOMETRIES[model_id](), class_names, seed)
