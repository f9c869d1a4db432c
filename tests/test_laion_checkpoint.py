"""LAION's own `.pt` checkpoints: strict conversion, equality with LAION's forward, cache, provenance, errors."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from laion_source import (
    HTSAT_BASE,
    HTSAT_TINY,
    Geometry,
    laion_audio_embedding,
    laion_checkpoint,
    laion_text_embedding,
    small_roberta,
)
from transformers import ClapAudioConfig

from audio_residual.clap import laion
from audio_residual.clap.laion import LaionCheckpointError, converted_laion, infer_audio_config
from audio_residual.clap.loading import load_clap
from audio_residual.cli import main

CLASSES = ("dog", "rain", "sea_waves", "crying_baby")


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """A small RoBERTa text tower, and the folder with its config and tokenizer (what --text-config names)."""
    config, model, tokenizer = small_roberta(CLASSES)
    folder = tmp_path_factory.mktemp("roberta")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


def _save(tmp_path, checkpoint, name="630k-audioset-best.pt"):
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def _audio(bundle, mel, longer):
    model = bundle.model
    with torch.no_grad():
        pooled = model.audio_model(input_features=mel, is_longer=longer[:, None]).pooler_output
        return F.normalize(model.audio_projection(pooled), dim=-1)


def _text(bundle, tokens):
    model = bundle.model
    with torch.no_grad():
        pooled = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(model.text_projection(pooled.pooler_output), dim=-1)


@pytest.mark.parametrize("fusion", [False, True], ids=["non-fusion", "fusion"])
def test_converted_model_matches_laions_forward(roberta, tmp_path, single_thread, fusion):
    text_model, text_dir = roberta
    geometry = Geometry(fusion=fusion)
    checkpoint = laion_checkpoint(geometry, text_model, seed=1)
    bundle = load_clap(_save(tmp_path, checkpoint), device="cpu", text_config=text_dir, cache_dir=tmp_path / "c")
    assert bundle.enable_fusion is fusion
    assert bundle.feature_extractor.truncation == ("fusion" if fusion else "rand_trunc")

    torch.manual_seed(0)
    level = torch.tensor([-2.0, 0.0, 2.0])[:, None, None, None]  # three clips at different loudness
    mel = torch.randn(3, 4 if fusion else 1, 1001, 64) * level.exp() + 3 * level
    longer = torch.tensor([True, False, True]) if fusion else torch.zeros(3, dtype=torch.bool)
    ours = _audio(bundle, mel, longer)
    with torch.no_grad():
        theirs = laion_audio_embedding(checkpoint, geometry, mel, longer)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours @ ours.T).min() < 0.95  # the clips embed apart: the comparison is not of near-constants

    tokens = bundle.tokenizer([f"This is a sound of {c.replace('_', ' ')}" for c in CLASSES], padding=True,
                              return_tensors="pt")
    with torch.no_grad():
        theirs_text = laion_text_embedding(checkpoint, text_model, tokens)
    torch.testing.assert_close(_text(bundle, tokens), theirs_text, atol=1e-5, rtol=0)
    assert bundle.model.logit_scale_t.item() == pytest.approx(checkpoint["state_dict"]["module.logit_scale_t"].item())


def test_captions_are_truncated_at_77_tokens_as_laion_tokenizes_them(roberta, tmp_path, single_thread):
    """LAION's tokenizer pads and truncates every text at 77 tokens (`laion_clap`'s `tokenizer`): a caption of
    78 tokens (the small tower could place it) and one of 600 words (it could not: that crashed) embed as
    LAION embeds their first 77 tokens. The converted folder, named directly, is still LAION's."""
    from audio_residual.clap.zeroshot import text_embeddings

    text_model, text_dir = roberta
    checkpoint = laion_checkpoint(Geometry(), text_model, seed=7)
    bundle = load_clap(_save(tmp_path, checkpoint), device="cpu", text_config=text_dir, cache_dir=tmp_path / "c")
    assert bundle.text_length.max_tokens == 77 and "LAION" in bundle.provenance["text_length"]["rule"]
    tokenizer = bundle.tokenizer
    long = " ".join(["crying baby dog rain sea waves"] * 100)
    ids = tokenizer(long, truncation=False)["input_ids"]
    just_over = tokenizer.decode(ids[:77] + [tokenizer.eos_token_id], skip_special_tokens=True)
    assert len(tokenizer(just_over)["input_ids"]) == 78 <= text_model.config.max_position_embeddings - 2
    laion_tokens = tokenizer([just_over, long, "dog"], padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt")
    with torch.no_grad():
        theirs = laion_text_embedding(checkpoint, text_model, laion_tokens)
    torch.testing.assert_close(text_embeddings(bundle, [just_over, long, "dog"]), theirs, atol=1e-5, rtol=0)
    (folder,) = (tmp_path / "c").iterdir()
    direct = load_clap(folder, device="cpu")
    assert direct.text_length.max_tokens == 77 and direct.provenance["laion_checkpoint"]["sha256"] == \
        laion.file_sha256(tmp_path / "630k-audioset-best.pt")


def test_a_swapped_query_and_key_would_be_caught(roberta, tmp_path, single_thread):
    """The forward comparison is sensitive to the qkv split order (what a wrong mapping would break)."""
    text_model, text_dir = roberta
    checkpoint = laion_checkpoint(Geometry(), text_model, seed=2)
    bundle = load_clap(_save(tmp_path, checkpoint), device="cpu", text_config=text_dir, cache_dir=tmp_path / "c")
    attention = bundle.model.audio_model.audio_encoder.layers[0].blocks[0].attention.self
    with torch.no_grad():
        query = attention.query.weight.clone()
        attention.query.weight.copy_(attention.key.weight)
        attention.key.weight.copy_(query)
    mel = torch.randn(2, 1, 1001, 64, generator=torch.Generator().manual_seed(0))
    longer = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        theirs = laion_audio_embedding(checkpoint, Geometry(), mel, longer)
    assert (_audio(bundle, mel, longer) - theirs).abs().max() > 1e-3


def test_htsat_tiny_geometry_is_inferred_from_shapes(roberta):
    """630k-audioset-best's audio tower: transformers' ClapAudioConfig defaults, read off the tensors."""
    checkpoint = laion_checkpoint(HTSAT_TINY, roberta[0])
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    config = infer_audio_config(state).to_dict()
    defaults = ClapAudioConfig().to_dict()
    for key in ("hidden_size", "depths", "num_attention_heads", "patch_embeds_hidden_size", "window_size",
                "patch_size", "patch_stride", "spec_size", "num_mel_bins", "mlp_ratio", "enable_fusion"):
        assert config[key] == defaults[key], key


def test_htsat_base_layout_converts_and_matches(roberta, single_thread):
    """The full-size HTSAT-base of LAION's music checkpoints (converted in memory: the file path is tested above)."""
    text_model, text_dir = roberta
    checkpoint = laion_checkpoint(HTSAT_BASE, text_model, seed=3)
    state = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    model, _, _ = laion.convert_laion(state, text_config=text_dir)
    audio = model.config.audio_config
    assert (audio.hidden_size, audio.depths, audio.patch_embeds_hidden_size) == (1024, [2, 2, 12, 2], 128)
    mel = torch.randn(1, 1, 1001, 64, generator=torch.Generator().manual_seed(0))
    longer = torch.zeros(1, dtype=torch.bool)
    with torch.no_grad():
        theirs = laion_audio_embedding(checkpoint, HTSAT_BASE, mel, longer)
    torch.testing.assert_close(_audio(SimpleNamespace(model=model), mel, longer), theirs, atol=1e-5, rtol=0)


def test_conversion_is_cached_by_digest_and_recorded(roberta, tmp_path, monkeypatch):
    text_model, text_dir = roberta
    checkpoint = laion_checkpoint(Geometry(), text_model, seed=4)
    path = _save(tmp_path, checkpoint)
    cache = tmp_path / "cache"
    bundle = load_clap(path, device="cpu", text_config=text_dir, cache_dir=cache)
    record = bundle.provenance["laion_checkpoint"]
    assert record["file"] == "630k-audioset-best.pt" and record["text_tower"] == str(text_dir)
    assert record["sha256"] == laion.file_sha256(path) and bundle.provenance["model"] == "630k-audioset-best.pt"

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(laion, "convert_laion", refuse)
    copy = tmp_path / "renamed.pt"
    shutil.copy(path, copy)
    again = load_clap(copy, device="cpu", cache_dir=cache)  # same bytes: the cached conversion, no text config
    assert again.provenance["laion_checkpoint"] == {**record, "file": "renamed.pt"}
    assert [p.name for p in cache.iterdir()] == [f"{record['sha256'][:24]}-v{laion.CONVERSION_VERSION}"]
    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(path, folder / path.name)  # a folder holding only the .pt is that checkpoint
    assert load_clap(folder, device="cpu", cache_dir=cache).provenance["laion_checkpoint"] == record
    shutil.copy(path, folder / "second.pt")
    with pytest.raises(LaionCheckpointError, match=r"holds 2 \.pt files \(630k-audioset-best\.pt, second\.pt\)"):
        load_clap(folder, device="cpu", cache_dir=cache)

    monkeypatch.undo()
    checkpoint["state_dict"]["module.logit_scale_a"] += 1.0  # a changed file is converted afresh
    _save(tmp_path, checkpoint)
    changed = load_clap(path, device="cpu", text_config=text_dir, cache_dir=cache)
    assert changed.provenance["laion_checkpoint"]["sha256"] != record["sha256"]
    assert len(list(cache.iterdir())) == 2


def _convert(tmp_path, checkpoint, text_dir, name="bad.pt"):
    return converted_laion(_save(tmp_path, checkpoint, name), text_config=text_dir, cache_dir=tmp_path / "c")


def test_an_unknown_key_is_named(roberta, tmp_path):
    checkpoint = laion_checkpoint(Geometry(), roberta[0])
    checkpoint["state_dict"]["module.audio_branch.layers.0.blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(LaionCheckpointError, match=r"bad\.pt: unexpected key 'audio_branch\.layers\.0\.blocks\.0\.attn\.extra\.weight'"):
        _convert(tmp_path, checkpoint, roberta[1])


def test_a_missing_key_is_named(roberta, tmp_path):
    checkpoint = laion_checkpoint(Geometry(), roberta[0])
    del checkpoint["state_dict"]["module.audio_branch.layers.1.blocks.0.mlp.fc2.bias"]
    with pytest.raises(LaionCheckpointError, match=r"missing key: .*layers\.1\.blocks\.0\.output\.dense\.bias"):
        _convert(tmp_path, checkpoint, roberta[1])


def test_a_misshapen_tensor_is_named(roberta, tmp_path):
    checkpoint = laion_checkpoint(Geometry(), roberta[0])
    checkpoint["state_dict"]["module.audio_branch.layers.2.blocks.1.attn.proj.weight"] = torch.zeros(64, 63)
    with pytest.raises(LaionCheckpointError, match=r"'audio_branch\.layers\.2\.blocks\.1\.attn\.proj\.weight' has shape"):
        _convert(tmp_path, checkpoint, roberta[1])


def test_a_truncated_file_is_refused(roberta, tmp_path):
    path = _save(tmp_path, laion_checkpoint(Geometry(), roberta[0]))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LaionCheckpointError, match=r"630k-audioset-best\.pt: truncated or not a torch checkpoint"):
        converted_laion(path, text_config=roberta[1], cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_a_pickle_needing_more_than_tensors_is_refused(roberta, tmp_path):
    checkpoint = laion_checkpoint(Geometry(), roberta[0])
    checkpoint["args"] = argparse.Namespace(lr=1e-4)  # an object: only an unrestricted unpickler builds it
    with pytest.raises(LaionCheckpointError, match=r"bad\.pt: refused, it needs pickled objects beyond tensors"):
        _convert(tmp_path, checkpoint, roberta[1])
    del checkpoint["args"]
    checkpoint["state_dict"]["module.audio_branch.note"] = "a string"  # loads, but is no tensor
    with pytest.raises(LaionCheckpointError, match=r"entry 'module\.audio_branch\.note' is a str, not a tensor"):
        _convert(tmp_path, checkpoint, roberta[1])


def test_offline_without_roberta_names_what_is_missing(roberta, tmp_path):
    path = _save(tmp_path, laion_checkpoint(Geometry(), roberta[0]))
    with pytest.raises(OSError, match=r"RoBERTa-base.*--text-config DIR"):
        converted_laion(path, cache_dir=tmp_path / "c")  # tests run with HF_HUB_OFFLINE=1 and no such cache
    with pytest.raises(OSError, match=re.escape(str(tmp_path / "nowhere"))):
        converted_laion(path, text_config=tmp_path / "nowhere", cache_dir=tmp_path / "c")


def test_cli_error_is_one_line_and_exit_2(roberta, small_data, tmp_path, capsys):
    path = _save(tmp_path, laion_checkpoint(Geometry(), roberta[0]), "bad.pt")
    path.write_bytes(b"not a checkpoint")
    code = main(["zeroshot", "--data", str(small_data), "--model", str(path), "--out", str(tmp_path / "out"),
                 "--cache", str(tmp_path / "cache"), "--text-config", str(roberta[1])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bad.pt" in err


def test_laion_hub_name_offline_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match=r"laion:630k-audioset-best.*lukewys/laion_clap.*pass its path"):
        converted_laion("laion:630k-audioset-best", cache_dir=tmp_path)


def test_a_laion_checkpoint_runs_through_the_commands(roberta, tmp_path, capsys):
    """zeroshot, analyze and train-residual on a LAION `.pt`, converted once into --cache/models.

    (`experiment` opens its workspace the same way; it was run on such a file by hand, too slow for the suite.)
    """
    from audio_residual.data_processing import make_synthetic_esc50

    data = make_synthetic_esc50(tmp_path / "esc50", n_classes=3, clips_per_class=5, seed=0)
    path = _save(tmp_path, laion_checkpoint(Geometry(), roberta[0], seed=5))
    cache = tmp_path / "cache"
    common = ["--data", str(data), "--model", str(path), "--cache", str(cache), "--device", "cpu",
              "--batch-size", "8", "--text-config", str(roberta[1])]
    assert main(["zeroshot", *common, "--out", str(tmp_path / "zs"), "--recipe", "laion-filelist"]) == 0
    provenance = json.loads((tmp_path / "zs" / "provenance.json").read_text())
    assert provenance["laion_checkpoint"]["sha256"] == laion.file_sha256(path)
    assert provenance["recipe"] == "laion-filelist" and provenance["model"] == path.name
    assert len(list((cache / "models").iterdir())) == 1

    common = common[:-2]  # converted now: the cache serves it without the text config
    assert main(["analyze", *common, "--out", str(tmp_path / "an"), "--fold", "1", "--pattern-cap", "16",
                 "--ablation-stages", "3", "--ablation-max-clips", "2", "--tokens-per-clip", "50"]) == 0
    assert main(["train-residual", *common, "--out", str(tmp_path / "tr"), "--granularity", "layer", "--epochs",
                 "1", "--folds", "1", "--val-fraction", "0.2", "--tokens-per-clip", "50"]) == 0
    assert json.loads((tmp_path / "tr" / "provenance.json").read_text())["laion_checkpoint"]["file"] == path.name
    capsys.readouterr()


def test_laion_hub_name_is_fetched_from_lukewys_and_recorded(roberta, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    _save(snapshot, laion_checkpoint(Geometry(), roberta[0], seed=6), "630k-best.pt")
    asked = []

    def download(repo, filename, revision=None):
        asked.append((repo, filename, revision))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    bundle = load_clap("laion:630k-best", device="cpu", text_config=roberta[1], cache_dir=tmp_path / "c")
    assert asked == [("lukewys/laion_clap", "630k-best.pt", None)]
    record = bundle.provenance["laion_checkpoint"]
    assert (record["hub_repo"], record["hub_commit"], record["file"]) == ("lukewys/laion_clap", "0123abcd", "630k-best.pt")
