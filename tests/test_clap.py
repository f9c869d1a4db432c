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


# --- text length: text is truncated the way the model was trained, never a crash on long text ------------

LONG = " ".join(["a dog barks loudly near the sea waves in the rain"] * 55)  # 605 words


def _embed_ids(bundle, ids: list[int]) -> torch.Tensor:
    """The unit text embedding of exactly these token ids (no tokenizer, no padding)."""
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        pooled = bundle.model.text_model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).pooler_output
        return F.normalize(bundle.model.text_projection(pooled), dim=-1)


def _first_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The first n tokens of `text` as a tokenizer truncating at n keeps them: <s>, n − 2 words' tokens, </s>."""
    ids = tokenizer(text, truncation=False)["input_ids"]
    return ids[: n - 1] + [tokenizer.eos_token_id]


def test_long_text_is_cut_where_the_text_tower_stops(tiny_bundle):
    """The tiny tower has 80 positions from padding_idx + 1 = 2 on: 78 tokens. A 600-word caption used to
    crash the batch (index out of range); now it embeds as its first 78 tokens, beside a short one."""
    rule = tiny_bundle.text_length
    assert rule.max_tokens == 78 and "78 tokens" in rule.rule
    assert tiny_bundle.provenance["text_length"] == {"max_tokens": 78, "rule": rule.rule}
    assert len(tiny_bundle.tokenizer(LONG, truncation=False)["input_ids"]) > 600
    both = text_embeddings(tiny_bundle, [LONG, "This is a sound of dog."])
    torch.testing.assert_close(both[:1], _embed_ids(tiny_bundle, _first_tokens(tiny_bundle.tokenizer, LONG, 78)),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1:], text_embeddings(tiny_bundle, ["This is a sound of dog."]), atol=1e-5, rtol=1e-5)


@pytest.fixture
def laion_hub_cache(tmp_path, monkeypatch):
    """A hub cache holding the tiny CLAP under LAION's hub id `laion/clap-htsat-unfused` (offline)."""
    import huggingface_hub.constants

    from audio_residual.clap.tiny import build_tiny_clap

    repo = tmp_path / "models--laion--clap-htsat-unfused"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("c" * 40)
    model, processor = build_tiny_clap(("dog", "rain"))
    model.save_pretrained(repo / "snapshots" / ("c" * 40))
    processor.save_pretrained(repo / "snapshots" / ("c" * 40))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / ("c" * 40)


def test_laions_hub_clap_reads_77_tokens_whatever_its_tower_could(laion_hub_cache, tmp_path):
    """Recognised by its hub id, a LAION CLAP reads 77 tokens as LAION's tokenizer gave it in training: a
    caption of exactly 78 tokens (which the tower could place) embeds as its first 77, as LAION embeds it."""
    bundle = load_clap("laion/clap-htsat-unfused", device="cpu")
    assert bundle.text_length.max_tokens == 77 and "laion/clap-htsat-unfused" in bundle.text_length.rule
    assert bundle.provenance["text_length"]["max_tokens"] == 77 and bundle.tokenizer.model_max_length == 77
    ids = _first_tokens(bundle.tokenizer, LONG, 78)
    text = bundle.tokenizer.decode(ids, skip_special_tokens=True)
    assert len(bundle.tokenizer(text)["input_ids"]) == 78  # fits the tower: only the rule cuts it
    laion_tokens = bundle.tokenizer(text, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():  # laion_clap's own tokenization: pad to 77, truncate at 77
        pooled = bundle.model.text_model(**{k: laion_tokens[k] for k in ("input_ids", "attention_mask")}).pooler_output
        laion = F.normalize(bundle.model.text_projection(pooled), dim=-1)
    ours = text_embeddings(bundle, [text, LONG])
    torch.testing.assert_close(ours[:1], laion, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1:], _embed_ids(bundle, _first_tokens(bundle.tokenizer, LONG, 77)),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[:1], _embed_ids(bundle, ids), atol=1e-4)  # the 78th token would matter
    # Its hub-cache folder is recognised too; a copy of the same files elsewhere reads what the tower holds.
    assert load_clap(laion_hub_cache, device="cpu").text_length.max_tokens == 77
    plain = shutil.copytree(laion_hub_cache, tmp_path / "copy")
    assert load_clap(plain, device="cpu").text_length.max_tokens == 78


@pytest.mark.parametrize("model_id, laion", [
    ("laion/clap-htsat-unfused", True), ("laion/clap-htsat-fused", True), ("laion/larger_clap_general", True),
    ("laion/larger_clap_music_and_speech", True), ("/hub/models--laion--clap-htsat-fused/snapshots/abc", True),
    ("someone/clap-htsat-unfused", False), ("tiny", False), ("laion/other-model", False),
])
def test_the_text_length_rule_recognises_laions_clap_by_id(tiny_bundle, model_id, laion):
    from audio_residual.clap.loading import text_length

    rule = text_length(model_id, tiny_bundle.tokenizer, tiny_bundle.model.text_model)
    assert rule.max_tokens == (77 if laion else 78)
    # A LAION conversion record makes any name LAION's.
    assert text_length("x", tiny_bundle.tokenizer, tiny_bundle.model.text_model, {"sha256": "0"}).max_tokens == 77


def test_a_tokenizers_own_limit_holds_below_the_tower(tiny_bundle):
    from audio_residual.clap.loading import text_length

    class Limited:
        model_max_length = 20

    rule = text_length("m", Limited(), tiny_bundle.model.text_model)
    assert rule.max_tokens == 20 and rule.rule == "the tokenizer's limit (20)"


def test_text_encoders_truncate_by_their_own_limit(tiny_bundle):
    """`--text-model` encoders: a plain RoBERTa of 40 positions with a tokenizer that sets no limit used to
    crash on a long caption; it reads 38 tokens now. CLAP's own text tower follows the bundle's rule."""
    from transformers import RobertaConfig, RobertaModel

    from audio_residual.clap.text_encoders import TextEncoder, clap_text_encoder
    from audio_residual.clap.tiny import offline_tokenizer

    tokenizer = offline_tokenizer([LONG])
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                                       pad_token_id=1)).eval()
    encoder = TextEncoder("small-roberta", model, tokenizer, "pooled")
    assert encoder.length.max_tokens == 38
    long, short = encoder.embed([LONG, "a dog"])
    ids = torch.tensor([_first_tokens(tokenizer, LONG, 38)])
    with torch.no_grad():
        expected = F.normalize(model(input_ids=ids).last_hidden_state.mean(1), dim=-1)[0]
    torch.testing.assert_close(long, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clap_text_encoder(tiny_bundle).embed([LONG, "rain"]),
                               text_embeddings(tiny_bundle, [LONG, "rain"]), atol=1e-5, rtol=1e-5)


def test_coop_prompts_are_truncated_like_zero_shot_prompts(tiny_bundle):
    """A class name longer than the text tower used to crash CoOp's forward; from the template's words the
    learner still equals the zero-shot classifier's (truncated) prompts, and an explicit n_ctx fits too."""
    from audio_residual.methods.coop import PromptLearner

    names = ["dog", LONG]
    learner = PromptLearner(tiny_bundle, names)
    with torch.no_grad():
        ours = learner(tiny_bundle.model)
    torch.testing.assert_close(ours, text_embeddings(tiny_bundle, class_prompts(names, "This is a sound of {label}.")),
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert PromptLearner(tiny_bundle, names, n_ctx=8)(tiny_bundle.model).shape == (2, 32)
    assert learner.suffix.shape[1] + 1 + learner.n_ctx == 78
    with pytest.raises(ValueError, match="n_ctx=77 leaves no room for a label"):
        PromptLearner(tiny_bundle, names, n_ctx=77)
