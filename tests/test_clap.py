"""CLAP access layer: offline loading, prompts, zero-shot logits; a damaged model folder is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


# --- model folders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_data) -> Path:
    """The tiny random CLAP for small_data's classes, saved as a model folder."""
    from audio_residual.data_processing import load_esc50

    bundle = load_clap("tiny-random", device="cpu", class_names=load_esc50(small_data).class_names)
    folder = tmp_path_factory.mktemp("model") / "clap"
    bundle.model.save_pretrained(folder)
    bundle.processor.save_pretrained(folder)
    return folder


def _damaged(saved_model: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    shutil.copytree(saved_model, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    if case == "projection_dim":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "projection_dim": 2 * config["projection_dim"]}))
    elif case == "no_tokenizer":
        for path in folder.iterdir():
            if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                path.unlink()
    else:
        weights.write_bytes({"truncated": data[: len(data) // 2], "header_only": data[:header], "empty": b"",
                             "garbage": b"<html>Not Found</html>" * 50}[case])
    return folder


@pytest.mark.parametrize("case, expected", [
    ("truncated", "model.safetensors is damaged"),
    ("header_only", "model.safetensors is damaged"),
    ("empty", "model.safetensors is damaged"),
    ("garbage", "model.safetensors is damaged"),
    ("projection_dim", "its weights do not match its config.json (config.json says projection_dim=64, the weights have 32)"),
    ("no_tokenizer", "gives different prompts the same ids: the folder lacks the model's tokenizer files"),
])
def test_damaged_model_folders_are_one_line_errors(saved_model, small_data, tmp_path, cli, case, expected):
    folder = _damaged(saved_model, tmp_path, case)
    run = cli("zeroshot", "--data", small_data, "--model", folder, "--device", "cpu", "--out", tmp_path / "out",
              "--cache", tmp_path / "cache")
    assert run.code == 2 and expected in run.errors and len(run.errors.splitlines()) == 1, run.err
    assert case in run.errors or str(folder) in run.errors


def test_the_saved_model_itself_loads(saved_model):
    assert load_clap(saved_model, device="cpu").model.config.projection_dim == 32


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused(tiny_bundle):
    from audio_residual.clap.loading import check_tokenizer

    class Wide:
        all_special_ids = [0]

        def __len__(self):
            return tiny_bundle.model.config.text_config.vocab_size + 1

        def __call__(self, text):
            return {"input_ids": [len(text)]}

    with pytest.raises(ValueError, match="tokenizer has 513 tokens but the text config's vocab_size is 512"):
        check_tokenizer(tiny_bundle.model, Wide(), "m")
