"""CLAP access layer: offline loading, prompts, zero-shot logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import load_clap, resolve_amp
from audio_residual.clap.zeroshot import ZeroShotClassifier, class_prompts, text_embeddings


def test_prompts_replace_underscores():
    assert class_prompts(["sea_waves", "dog"], "This is a sound of {label}.") == [
        "This is a sound of sea waves.",
        "This is a sound of dog.",
    ]


def test_offline_tokenizer_round_trips_class_names(tiny_bundle):
    text = "This is a sound of sea waves."
    ids = tiny_bundle.tokenizer(text)["input_ids"]
    assert ids[0] == tiny_bundle.tokenizer.bos_token_id and ids[-1] == tiny_bundle.tokenizer.eos_token_id
    assert tiny_bundle.tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_model_is_htsat_family(tiny_bundle):
    encoder = tiny_bundle.model.audio_model.audio_encoder
    assert len(encoder.layers) == 4
    assert [stage.downsample is not None for stage in encoder.layers] == [True, True, True, False]
    assert any(block.shift_size > 0 for stage in encoder.layers for block in stage.blocks)
    assert tiny_bundle.feature_extractor.sampling_rate == 48_000
    assert tiny_bundle.feature_extractor.truncation == "rand_trunc"
    assert not any(p.requires_grad for p in tiny_bundle.model.parameters())


def test_saved_tiny_model_loads_from_local_folder(tiny_bundle, tmp_path):
    tiny_bundle.model.save_pretrained(tmp_path)
    tiny_bundle.processor.save_pretrained(tmp_path)
    reloaded = load_clap(tmp_path, device="cpu")
    x = torch.randn(2, 1, 1001, 64)
    with torch.no_grad():
        a = audio_embeddings(tiny_bundle.model, x)
        b = audio_embeddings(reloaded.model, x)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    prompts = ["This is a sound of dog."]
    torch.testing.assert_close(text_embeddings(tiny_bundle, prompts), text_embeddings(reloaded, prompts))


def test_local_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clap(tmp_path, device="cpu")


def test_zero_shot_logits_are_scaled_cosines(tiny_bundle):
    clf = ZeroShotClassifier(tiny_bundle, ["dog", "rain", "sea_waves"])
    assert clf.class_embeddings.shape == (3, 32)
    torch.testing.assert_close(clf.class_embeddings.norm(dim=-1), torch.ones(3))
    audio = F.normalize(torch.randn(5, 32), dim=-1)
    expected = torch.exp(tiny_bundle.model.logit_scale_a.detach()) * F.cosine_similarity(
        audio[:, None], clf.class_embeddings[None], dim=-1
    )
    torch.testing.assert_close(clf.logits(audio), expected, rtol=1e-5, atol=1e-5)
    assert clf.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)


def test_template_ensemble_averages_normalised_embeddings(tiny_bundle):
    templates = ("This is a sound of {label}.", "a recording of {label}")
    clf = ZeroShotClassifier(tiny_bundle, ["dog", "rain"], templates)
    each = [text_embeddings(tiny_bundle, class_prompts(["dog", "rain"], t)) for t in templates]
    torch.testing.assert_close(clf.class_embeddings, F.normalize(each[0] + each[1], dim=-1))
    single = ZeroShotClassifier(tiny_bundle, ["dog", "rain"], templates[:1])
    assert not torch.allclose(single.class_embeddings, clf.class_embeddings)


def test_embed_batches_match_one_pass(tiny_bundle):
    clf = ZeroShotClassifier(tiny_bundle, ["dog", "rain"])
    features = torch.randn(5, 1, 1001, 64).numpy()
    rows = [4, 0, 2]
    batched = clf.embed(features, rows, batch_size=2)
    with torch.no_grad():
        direct = audio_embeddings(tiny_bundle.model, torch.from_numpy(features[rows]))
    torch.testing.assert_close(batched, direct, rtol=1e-5, atol=1e-6)


def test_amp_choice():
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        resolve_amp("fp8", torch.device("cuda"))
