"""Retrieval methods on generated captioned audio with the tiny CLAP: exactness at the start, and training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
from audio_residual.evaluation.retrieval import retrieval_ranks
from audio_residual.retrieval.data import RetrievalData
from audio_residual.retrieval.methods import (
    Fit,
    fit_lora,
    fit_projection,
    fit_residual,
    fit_tap,
    split_metrics,
    zero_shot,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    folder = make_synthetic_captions(root / "gen", n_clips=16, captions_per_clip=3, seconds=1.0, seed=0,
                                     split_fractions=(0.5, 0.25, 0.25))
    return RetrievalData.open(folder, "tiny", cache_dir=root / "cache", device="cpu", batch_size=8)


def full_scores(fitted, data, split):
    return fitted.score(data, split.rows, split.texts)(slice(0, len(split.rows)), slice(0, len(split.texts)))


def test_residual_at_lambda_one_reproduces_zero_shot_scores(data):
    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    plain = zero_shot(data)
    residual = fit_residual(data, train, val, Fit(epochs=0), granularity="head")
    assert residual.trainable_params > 0 and residual.best_epoch == 0
    assert all(bool((p == 1).all()) for p in residual.module.lambdas.values())
    torch.testing.assert_close(full_scores(residual, data, test), full_scores(plain, data, test), atol=1e-5, rtol=1e-5)
    assert split_metrics(residual, data, test) == split_metrics(plain, data, test)


def test_lora_and_identity_projection_start_at_zero_shot(data):
    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    expected = full_scores(zero_shot(data), data, test)
    for fitted in (fit_lora(data, train, val, Fit(epochs=0), rank=2), fit_projection(data, train, val, Fit(epochs=0))):
        torch.testing.assert_close(full_scores(fitted, data, test), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [fit_residual, fit_projection, fit_lora])
def test_training_steps_that_change_no_parameter_leave_zero_shot_scores(data, method):
    """lr = 0: two epochs of real steps (train mode, forward, backward) must leave the scores exactly
    zero-shot's; running statistics (BatchNorm) are state too and must not drift."""
    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    fitted = method(data, train, val, Fit(epochs=2, lr=0.0, batch_size=4))
    assert len(fitted.history) == 2
    torch.testing.assert_close(full_scores(fitted, data, test), full_scores(zero_shot(data), data, test),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", [fit_residual, fit_projection, fit_tap, fit_lora])
def test_every_method_trains_and_selects_on_validation(data, method):
    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    fitted = method(data, train, val, Fit(epochs=2, lr=1e-2, batch_size=4))
    assert fitted.trainable_params > 0 and fitted.seconds > 0
    assert len(fitted.history) == 2 and fitted.best_epoch in (0, 1, 2)
    scores = [h["val_mean_r1"] for h in fitted.history]
    assert np.isfinite(scores).all() and np.isfinite([h["train_loss"] for h in fitted.history]).all()
    # The kept state is the selected epoch's: the first best validation score, epoch 0 included.
    every = [fitted.start_score, *scores]
    assert fitted.best_epoch == int(np.argmax(every))
    assert split_metrics(fitted, data, val)["mean_r1"] == pytest.approx(max(every))
    ranks = retrieval_ranks(fitted.score(data, test.rows, test.texts), len(test.rows), test.caption_clip)
    assert len(ranks.t2a) == len(test.texts)


def test_a_split_without_clips_is_named(data):
    from audio_residual.retrieval.data import caption_split

    valid = np.zeros(len(data.table), bool)
    with pytest.raises(ValueError, match="the test split has no clips"):
        caption_split(data.table, valid, "test")


def test_residual_takes_the_unit_options_and_the_paper_preset(data):
    train, val = data.split("train"), data.split("validation")
    layer = fit_residual(data, train, val, Fit(epochs=1, batch_size=4), granularity="layer", stages=(3,))
    head = fit_residual(data, train, val, Fit(epochs=1, batch_size=4), granularity="head", stages=(3,))
    assert 0 < layer.trainable_params < head.trainable_params
    paper = fit_residual(data, train, val, Fit(epochs=1, batch_size=4), preset="paper", epochs=2)
    # Not every preset field kept (epochs 2): labelled by its unit variant, never as the paper preset.
    assert paper.options["label"] == "residual-center-drop-tail-zero-init-randn"
    assert len(paper.history) == 2  # the preset's procedure with its epochs overridden
    assert not all(bool((p == 1).all()) for p in paper.module.lambdas.values())  # λ = 1 + N(0, 1)
    assert paper.module.config.center == "drop" and paper.module.config.tail == "zero"


def test_every_epoch_reaches_the_logger(data):
    class Recorder:
        def __init__(self):
            self.records = []

        def log(self, metrics, step=None):
            self.records.append(metrics)

    recorder = Recorder()
    fit_projection(data, data.split("train"), data.split("validation"), Fit(epochs=2, batch_size=4, logger=recorder))
    assert [r["retrieval/projection/epoch"] for r in recorder.records] == [1, 2]
    assert all("retrieval/projection/val_mean_r1" in r for r in recorder.records)


def test_finetune_is_pretrain_from_the_checkpoint_on_the_training_split(data, tmp_path):
    from audio_residual.retrieval.finetune import fit_pretrain_finetune

    train, val, test = (data.split(s) for s in ("train", "validation", "test"))
    fitted = fit_pretrain_finetune(data, Fit(epochs=1, lr=1e-4, batch_size=4), tmp_path / "ft")
    assert (tmp_path / "ft" / "model" / "config.json").is_file()  # a --model folder with its provenance
    audio_tower = sum(p.numel() for n, p in data.bundle.model.named_parameters() if n.startswith("audio_"))
    assert fitted.trainable_params == audio_tower + 2  # audio tower + projection + both temperatures; text frozen
    assert len(fitted.history) == 1 and fitted.best_epoch in (0, 1)
    if fitted.best_epoch == 0:  # the kept model is the starting checkpoint: exactly zero-shot
        torch.testing.assert_close(full_scores(fitted, data, test), full_scores(zero_shot(data), data, test),
                                   atol=1e-5, rtol=1e-5)
    # Text tower frozen: the tuned model embeds captions exactly as the start did.
    tuned_text = fitted.score(data, test.rows[:1], test.texts)(slice(0, 1), slice(0, len(test.texts)))
    assert tuned_text.shape == (1, len(test.texts))
