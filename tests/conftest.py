"""Shared fixtures: everything is generated here; no test reaches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def single_thread():
    """Toy-sized ops are dominated by thread hand-offs, which crawl on a busy machine: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bundle():
    from audio_residual.clap.loading import load_clap

    return load_clap("tiny-random", device="cpu", class_names=("dog", "rain", "sea_waves"))


@pytest.fixture(scope="session")
def htsat_tiny():
    """The full-size HTSAT-tiny audio tower with random weights."""
    from audio_residual.clap.tiny import build_htsat_tiny_random

    model, _ = build_htsat_tiny_random(("dog",))
    return model


@pytest.fixture(scope="session")
def synthetic_esc50(tmp_path_factory):
    """A small generated ESC-50-shaped folder: 4 classes × 10 clips of 5 s over 5 folds."""
    from audio_residual.data_processing import make_synthetic_esc50

    return make_synthetic_esc50(tmp_path_factory.mktemp("esc50"), n_classes=4, clips_per_class=10, seed=0)
