"""Linear projection into a frozen text space, and the text encoders it can target (all offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5Model,
    ViTConfig,
    ViTModel,
)

from audio_residual.clap.text_encoders import clap_text_encoder, load_text_encoder
from audio_residual.clap.tiny import offline_tokenizer
from audio_residual.clap.zeroshot import text_embeddings
from audio_residual.methods.projection import LinearProjection
from audio_residual.tasks.loss import pair_infonce
from audio_residual.tasks.retrieval import retrieval_metrics

pytestmark = pytest.mark.usefixtures("single_thread")
TEXTS = ["a dog barks twice", "rain falls on a roof", "waves on the sea shore"]


def test_identity_start_is_the_plain_cosine_and_the_temperature_is_optional():
    g = torch.Generator().manual_seed(0)
    audio, text = torch.randn(4, 6, generator=g), F.normalize(torch.randn(5, 6, generator=g), dim=-1)
    fixed = LinearProjection(6, 6, logit_scale=10.0, identity=True)
    torch.testing.assert_close(fixed.logits(audio, text), 10.0 * F.normalize(audio, dim=-1) @ text.T)
    assert fixed.num_parameters == 6 * 6 + 6
    assert LinearProjection(6, 3, learn_temperature=True).num_parameters == 6 * 3 + 3 + 1
    with pytest.raises(ValueError, match="equal widths"):
        LinearProjection(6, 3, identity=True)


def test_projection_learns_a_map_into_another_space():
    """Captions live in a 5-d space reached from the 8-d audio features by an unknown linear map:
    trained with symmetric InfoNCE the projection goes from near chance to near-perfect retrieval."""
    g = torch.Generator().manual_seed(0)
    n = 40
    audio = torch.randn(n, 8, generator=g)
    text = F.normalize(audio @ torch.randn(8, 5, generator=g) + 0.05 * torch.randn(n, 5, generator=g), dim=-1)
    torch.manual_seed(0)
    proj = LinearProjection(8, 5, logit_scale=10.0, learn_temperature=True)
    before = retrieval_metrics(proj(audio).detach(), text, np.arange(n))["mean_r1"]
    optimizer = torch.optim.Adam(proj.parameters(), lr=0.05)
    for _ in range(200):
        loss = pair_infonce(proj(audio), text, proj.scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = retrieval_metrics(proj(audio).detach(), text, np.arange(n))["mean_r1"]
    assert before < 0.3 and after > 0.8
    assert float(proj.scale.detach()) != pytest.approx(10.0)  # the temperature was trained


def _save_with_tokenizer(model, folder):
    model.save_pretrained(folder)
    offline_tokenizer(TEXTS, vocab_size=300).save_pretrained(folder)
    return str(folder)


def test_a_bert_encoder_is_mean_pooled(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    encoder = load_text_encoder(_save_with_tokenizer(bert, tmp_path / "bert"))
    emb = encoder.embed(TEXTS, batch_size=2)
    assert encoder.kind == "pooled" and emb.shape == (3, 16) and encoder.dim == 16
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert float((emb @ emb.T)[0, 1]) < 0.9999  # different texts, different embeddings
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_clips_text_tower_is_loaded_from_a_whole_clip_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=12,
    )
    clip = CLIPModel(config).eval()
    encoder = load_text_encoder(_save_with_tokenizer(clip, tmp_path / "clip"))
    tokens = encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(clip.text_projection(clip.text_model(**tokens).pooler_output), dim=-1)
    assert encoder.kind == "features" and encoder.dim == 12
    torch.testing.assert_close(encoder.embed(TEXTS), expected, atol=1e-5, rtol=1e-5)


def test_standalone_towers_and_encoder_decoders(tmp_path):
    torch.manual_seed(0)
    tower = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=300, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       max_position_embeddings=32, projection_dim=6))
    encoder = load_text_encoder(_save_with_tokenizer(tower, tmp_path / "tower"))
    assert encoder.kind == "tower" and encoder.embed(TEXTS).shape == (3, 6)
    t5 = T5Model(T5Config(vocab_size=300, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    encoder = load_text_encoder(_save_with_tokenizer(t5, tmp_path / "t5"))
    assert encoder.kind == "pooled" and encoder.embed(TEXTS).shape == (3, 8)


def test_clap_text_tower_matches_zero_shot_text_embeddings(tiny_bundle):
    encoder = clap_text_encoder(tiny_bundle)
    torch.testing.assert_close(encoder.embed(TEXTS, batch_size=2), text_embeddings(tiny_bundle, TEXTS),
                               atol=1e-5, rtol=1e-5)


def test_models_that_are_not_text_encoders_are_named(tmp_path):
    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=16))
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"'.*vit' is not a text encoder \(it has no tokenizer\)"):
        load_text_encoder(str(tmp_path / "vit"))
    with pytest.raises(ValueError, match="is not a text encoder .*takes pixel_values"):
        load_text_encoder(_save_with_tokenizer(vit, tmp_path / "vit_tok"))
    with pytest.raises(ValueError, match="could not be loaded"):
        load_text_encoder(str(tmp_path / "nothing"))
