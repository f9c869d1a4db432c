"""The shipped tiny pretrained CLAP (`--model tiny`) on generated data it never saw (another seed).

It must classify 10 attribute classes zero-shot at ≥ 0.5 (chance 0.1) from prompts made of attribute words,
and retrieve generated captioned clips from their captions at ≥ 5× the random R@1. Evaluation only.
"""

import json

import numpy as np
import pytest
import torch

from audio_residual.clap.loading import TINY_PRETRAINED_DIR, load_clap
from audio_residual.data_processing.captions import load_captions
from audio_residual.data_processing.synthetic_captions import (
    FAMILY_PITCH_CLASSES,
    make_attribute_classes,
    make_synthetic_captions,
)
from audio_residual.evaluation.zeroshot import zero_shot_by_fold
from audio_residual.training import pretrain as P
from audio_residual.workspace import Workspace

UNSEEN_SEED = 9_999  # the shipped model was trained on data generated with seed 0


def test_shipped_folder_says_how_it_was_made():
    provenance = json.loads((TINY_PRETRAINED_DIR / "pretraining.json").read_text())
    assert provenance["command"].startswith("audio-residual pretrain --preset tiny")
    assert provenance["generated_data"]["seed"] == 0 and provenance["recipe"]["seed"] == 0
    assert (TINY_PRETRAINED_DIR / "training_log.csv").is_file()
    assert (TINY_PRETRAINED_DIR / "model.safetensors").stat().st_size < 8_000_000


def test_zero_shot_classification_on_unseen_attribute_classes(tmp_path, single_thread):
    data = make_attribute_classes(tmp_path / "classes", FAMILY_PITCH_CLASSES, clips_per_class=6, seed=UNSEEN_SEED,
                                  seconds=2.0)
    ws = Workspace.open(data, model="tiny", cache_dir=tmp_path / "cache", device="cpu")
    assert ws.table.class_names[:2] == ("low_tone", "high_tone")  # prompt: "This is a sound of low tone."
    accuracy = float(zero_shot_by_fold(ws)["accuracy"].mean())
    assert accuracy >= 0.5, f"zero-shot accuracy {accuracy:.3f} on 10 classes (chance 0.1)"


def test_text_to_audio_retrieval_beats_random_five_fold(tmp_path, single_thread):
    root = make_synthetic_captions(tmp_path / "caps", n_clips=40, seconds=2.0, seed=UNSEEN_SEED)
    table = load_captions(root)
    bundle = load_clap("tiny", device="cpu")
    from audio_residual.data_processing import FeatureCache

    features = FeatureCache(tmp_path / "cache", bundle.feature_extractor).compute(table)
    data = P.CaptionedFeatures.build(table, features, bundle.tokenizer)
    data.validation_rows = np.arange(len(table))  # score every clip of the unseen set
    metrics = P.validation_retrieval(bundle.model, data, torch.device("cpu"))
    assert metrics["t2a_random_r1"] == pytest.approx(1 / 40)
    assert metrics["t2a_r1"] >= 5 * metrics["t2a_random_r1"], metrics
