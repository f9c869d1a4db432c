"""Retrieval methods on generated captioned audio with the tiny CLAP: exactness at the start, and training.

Every method runs through the one interface the study uses (`Method.fit(Context)`, `Method.scores`), on the
workspace's one official split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from audio_residual.clap.loading import ModelSource
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
from audio_residual.layout import RunLayout
from audio_residual.methods import Context, get
from audio_residual.methods.residual import ResidualChoice
from audio_residual.residual.units import ResiDual
from audio_residual.tasks import RETRIEVAL
from audio_residual.training import loop
from audio_residual.training.trainer import PRESETS, TrainConfig, fold_statistics
from audio_residual.workspace import Workspace

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    folder = make_synthetic_captions(root / "gen", n_clips=16, captions_per_clip=3, seconds=1.0, seed=0,
                                     split_fractions=(0.5, 0.25, 0.25))
    workspace = Workspace.open(folder, ModelSource("tiny", device="cpu"), cache_dir=root / "cache", captions=True)
    workspace.batch_size = 8
    return workspace


@pytest.fixture(scope="module")
def split(ws):
    (only,) = ws.splits()
    return only


def fit(ws, split, name, layout=None, logger=None, **options):
    """(method, context, fitted model) of a registered retrieval method on the official split."""
    method = get(name, "retrieval")
    ctx = Context(ws, split, RETRIEVAL, seed=0, options=method.options(options), layout=layout, logger=logger)
    return method, ctx, method.fit(ctx)


def full_scores(method, model, ctx, rows):
    """The whole (clips, captions) score matrix of `rows` through the method's blockwise scorer."""
    n_text = len(RETRIEVAL.texts(ctx.ws, rows))
    return method.scores(model, ctx, rows)(slice(0, len(rows)), slice(0, n_text))


def metrics(method, model, ctx, rows):
    return RETRIEVAL.evaluate(method.scores(model, ctx, rows), RETRIEVAL.targets(ctx.ws, rows))[0]


@pytest.fixture(scope="module")
def zero_shot(ws, split):
    method, ctx, model = fit(ws, split, "zeroshot")
    return full_scores(method, model, ctx, split.test), metrics(method, model, ctx, split.test)


@pytest.fixture
def loops(monkeypatch):
    """Every run of the one training loop, recorded: (its result, how many epochs it ran)."""
    runs = []
    real_train, real_epoch = loop.train, loop._epoch

    def recorded(*args, **kwargs):
        runs.append({"epochs": 0})
        runs[-1]["result"] = real_train(*args, **kwargs)
        return runs[-1]["result"]

    def counted(*args, **kwargs):
        runs[-1]["epochs"] += 1
        return real_epoch(*args, **kwargs)

    import audio_residual.methods.base as base
    import audio_residual.methods.lora as lora
    import audio_residual.training.trainer as trainer

    for module in (base, lora, trainer):
        monkeypatch.setattr(module, "train", recorded)
    monkeypatch.setattr(loop, "_epoch", counted)
    return runs


def test_residual_at_lambda_one_reproduces_zero_shot_scores(ws, split, zero_shot):
    config = TrainConfig(granularity="head")
    residual = ResiDual.from_statistics(fold_statistics(ws, split, None, config), config.residual_config())
    assert residual.num_parameters() > 0
    assert all(bool((p == 1).all()) for p in residual.lambdas.values())
    method = get("residual", "retrieval")
    ctx = Context(ws, split, RETRIEVAL, options=method.options())
    torch.testing.assert_close(full_scores(method, ResidualChoice(residual), ctx, split.test), zero_shot[0],
                               atol=1e-5, rtol=1e-5)
    assert metrics(method, ResidualChoice(residual), ctx, split.test) == zero_shot[1]


def test_lora_and_identity_projection_start_at_zero_shot(ws, split, zero_shot):
    for name, options in (("lora", {"ranks": 2}), ("projection", {})):
        method, ctx, model = fit(ws, split, name, epochs=0, **options)
        assert method.trainable_params(model) > 0
        torch.testing.assert_close(full_scores(method, model, ctx, split.test), zero_shot[0], atol=1e-5, rtol=1e-5)


def test_tap_starts_exactly_at_mean_pooling_of_the_frame_tokens(ws, split):
    """TAP as the study builds it (real initialisation, nothing zeroed, epoch 0 kept): every (clip, caption)
    pair's pooled vector is the mean of the clip's frame tokens through CLAP's projection, so its scores are
    the cosines of those means with the captions."""
    method, ctx, model = fit(ws, split, "tap", epochs=0)
    assert model.tap.key.weight.abs().sum() > 0  # random keys: uniform attention comes from the start itself
    tokens = ws.frame_tokens(split.test)
    texts = ws.text(RETRIEVAL.texts(ws, split.test))
    mean = tokens.mean(1)
    with torch.no_grad():
        pooled = model.tap.pooled(tokens, texts)
    torch.testing.assert_close(pooled, mean[:, None].expand_as(pooled), atol=1e-5, rtol=1e-5)
    expected = torch.nn.functional.normalize(mean, dim=-1) @ texts.T
    torch.testing.assert_close(full_scores(method, model, ctx, split.test), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["residual", "projection", "lora"])
def test_training_steps_that_change_no_parameter_leave_zero_shot_scores(ws, split, zero_shot, loops, name):
    """Two epochs of real steps (train mode, forward, backward) that cannot move a parameter (lr 0; ResiDual's
    configuration needs lr > 0, and 1e-30 moves no λ of 1 in float32) must leave the scores exactly
    zero-shot's; running statistics (BatchNorm) are state too and must not drift."""
    options = {"base": {"epochs": 2, "lr": 1e-30, "batch_size": 4}} if name == "residual" else \
        {"epochs": 2, "lr": 0.0, "batch_size": 4, **({"ranks": 2} if name == "lora" else {})}
    method, ctx, model = fit(ws, split, name, **options)
    assert [run["epochs"] for run in loops] == [2]  # one configuration (one rank), two epochs of steps
    assert len(loops[0]["result"].history) == 2
    torch.testing.assert_close(full_scores(method, model, ctx, split.test), zero_shot[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["residual", "projection", "tap", "lora"])
def test_every_method_trains_and_selects_on_validation(ws, split, loops, name):
    options = {"base": {"epochs": 2, "lr": 1e-2, "batch_size": 4}} if name == "residual" else \
        {"epochs": 2, "lr": 1e-2, "batch_size": 4, **({"ranks": 2} if name == "lora" else {})}
    method, ctx, model = fit(ws, split, name, **options)
    assert method.trainable_params(model) > 0
    (run,) = loops
    result = run["result"]
    assert run["epochs"] == 2 and len(result.history) == 2
    scores = [h["val_mean_r1"] for h in result.history]
    assert np.isfinite(scores).all() and np.isfinite([h["train_loss"] for h in result.history]).all()
    # The kept state is the selected epoch's: the first best validation score, epoch 0 included.
    every = [result.start_score, *scores]
    assert result.best_epoch == int(np.argmax(every))
    assert metrics(method, model, ctx, split.val)["mean_r1"] == pytest.approx(max(every))
    details = method.details(model)
    assert details["best_epoch"] == result.best_epoch and details["val_score"] == pytest.approx(max(every))
    test, arrays = RETRIEVAL.evaluate(method.scores(model, ctx, split.test), RETRIEVAL.targets(ws, split.test))
    assert len(arrays["t2a_ranks"]) == len(RETRIEVAL.texts(ws, split.test)) and 0 <= test["mean_r1"] <= 1


def test_a_split_without_clips_is_named(ws):
    test_rows = np.array([s == "test" for s in ws.table.splits])
    features = dataclasses.replace(ws.features, valid=ws.features.valid & ~test_rows)
    broken = dataclasses.replace(ws, features=features)
    with pytest.raises(ValueError, match=r"the test split has no clips \(4 skipped as bad audio\)"):
        broken.splits()


def test_residual_takes_the_unit_options_and_the_paper_procedure(ws, split, loops):
    _, _, layer = fit(ws, split, "residual", base={"granularity": "layer", "stages": [3], "epochs": 1, "batch_size": 4})
    _, _, head = fit(ws, split, "residual", base={"granularity": "head", "stages": [3], "epochs": 1, "batch_size": 4})
    assert 0 < layer.residual.num_parameters() < head.residual.num_parameters()
    # The paper's unit and optimiser with its epochs changed: not every preset field kept, so it is labelled by
    # its unit variant, never as the paper preset.
    residual = get("residual", "retrieval")
    assert residual.label(residual.options({"base": {**PRESETS["paper"], "epochs": 2}})) == \
        "residual-center-drop-tail-zero-init-randn"
    # The registered paper procedure is available without a grid naming it, and keeps every field of the
    # preset whatever the shared options say.
    method, ctx, paper = fit(ws, split, "residual-paper", base={"epochs": 2, "batch_size": 4})
    assert method.label(ctx.options) == "residual-paper" and paper.config.variant == "residual-paper"
    assert paper.config.epochs == PRESETS["paper"]["epochs"] and paper.config.optimizer == "schedulefree"
    assert 1 <= len(paper.result.history) <= PRESETS["paper"]["epochs"]  # patience may stop it early
    assert not all(bool((p == 1).all()) for p in paper.residual.lambdas.values())  # λ = 1 + N(0, 1)
    assert paper.residual.config.center == "drop" and paper.residual.config.tail == "zero"


def test_every_epoch_reaches_the_logger(ws, split):
    class Recorder:
        def __init__(self):
            self.records = []

        def log(self, metrics, step=None):
            self.records.append(metrics)

    recorder = Recorder()
    fit(ws, split, "projection", logger=recorder, epochs=2, batch_size=4)
    assert [r["retrieval/projection/epoch"] for r in recorder.records] == [1, 2]
    assert all("retrieval/projection/val_mean_r1" in r for r in recorder.records)


def test_finetune_is_pretrain_from_the_checkpoint_on_the_training_split(ws, split, zero_shot, tmp_path):
    method, ctx, tuned = fit(ws, split, "finetune", layout=RunLayout(tmp_path / "ft"), epochs=1, lr=1e-4, batch_size=4)
    assert (tuned.folder / "config.json").is_file()  # a --model folder with its provenance, in the study's folder
    assert (tmp_path / "ft" / "finetune") in tuned.folder.parents
    method.save(tuned, tmp_path / "pointer.safetensors")  # transfer reloads it from there, no second copy
    again = method.load(tmp_path / "pointer.safetensors", ws)
    assert (again.best_epoch, again.trainable_params) == (tuned.best_epoch, tuned.trainable_params)
    torch.testing.assert_close(method.embed(again, ws, split.test), method.embed(tuned, ws, split.test))
    audio_tower = sum(p.numel() for n, p in ws.bundle.model.named_parameters() if n.startswith("audio_"))
    assert method.trainable_params(tuned) == audio_tower + 2  # audio tower + projection + both temperatures
    assert method.details(tuned)["best_epoch"] in (0, 1)
    if tuned.best_epoch == 0:  # the kept model is the starting checkpoint: exactly zero-shot
        torch.testing.assert_close(full_scores(method, tuned, ctx, split.test), zero_shot[0], atol=1e-5, rtol=1e-5)
    # Text tower frozen: the tuned model embeds the captions exactly as the start did.
    texts = RETRIEVAL.texts(ws, split.test)
    torch.testing.assert_close(tuned.text(texts), ws.text(texts), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ws.bundle.model.parameters())  # the shared model was never trained


def test_projection_maps_into_another_text_encoders_space(ws, split, tmp_path):
    """`projection.text_model`: a local Hugging Face text encoder (here a random small BERT) is the frozen text side;
    `projection.source=pooled` reads the encoder's output before CLAP's projection."""
    from transformers import BertConfig, BertModel

    from audio_residual.clap.tiny import offline_tokenizer

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    offline_tokenizer(RETRIEVAL.texts(ws, split.train), vocab_size=300).save_pretrained(tmp_path / "bert")
    clap_dim, pooled_dim = ws.embeddings(split.test).shape[1], ws.pooled_outputs(split.test).shape[1]
    for source, in_dim in (("embedding", clap_dim), ("pooled", pooled_dim)):
        method, ctx, model = fit(ws, split, "projection", text_model=str(tmp_path / "bert"), source=source, epochs=1,
                                 batch_size=4)
        assert model.encoder.kind == "pooled" and method.trainable_params(model) == in_dim * 16 + 16
        scores = full_scores(method, model, ctx, split.test)
        assert scores.shape == (len(split.test), len(RETRIEVAL.texts(ws, split.test)))
        assert torch.isfinite(scores).all() and scores.abs().max() <= 1 + 1e-5  # cosines in the BERT space
