"""Shared fixtures: everything is generated here; no test reaches the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# `make test` runs one pytest worker per core (pytest-xdist): each then computes on one thread
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


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


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A generated ESC-50-shaped folder: 3 classes × 5 clips of 1.5 s at 16 kHz over 5 folds (3 clips per fold).
    Read only: a test that damages it works on a copy."""
    from audio_residual.data_processing import make_synthetic_esc50

    return make_synthetic_esc50(
        tmp_path_factory.mktemp("data") / "esc", n_classes=3, clips_per_class=5, seconds=1.5, sample_rate=16000
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs when this process may mount one (root), else None (the tests then fake ENOSPC)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class CliRun:
    """One command-line call: its exit code, stdout, stderr and the stderr lines that are errors."""

    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err
        self.errors = "\n".join(line for line in err.splitlines() if "error:" in line)


@pytest.fixture
def cli(capsys):
    """`cli(*argv)` runs `audio-residual ARGV` in-process: SystemExit (argparse) counts as its code, and no
    traceback may reach the user."""
    from audio_residual.cli import main

    def run(*argv) -> CliRun:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return CliRun(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="session")
def workspace_of_arrays():
    """Build a `Workspace` over in-memory log-mel inputs (no audio files), for method tests fed arrays:
    `workspace_of_arrays(bundle, features, labels, class_names, folds=None)`; every clip valid, none longer."""
    from pathlib import Path

    import numpy as np

    from audio_residual.data_processing import CachedFeatures, ClipTable
    from audio_residual.workspace import Workspace

    def build(bundle, features, labels, class_names, folds=None):
        n = len(features)
        folds = np.ones(n, dtype=np.int64) if folds is None else np.asarray(folds)
        table = ClipTable("arrays", Path("."), [f"clip{i}.wav" for i in range(n)], np.asarray(labels), folds,
                          tuple(class_names))
        features = CachedFeatures(np.asarray(features, dtype=np.float32), np.zeros(n, dtype=bool),
                                  np.ones(n, dtype=bool), [], tuple(f"clip{i}" for i in range(n)), "arrays")
        return Workspace(table, bundle, features)

    return build


@pytest.fixture(scope="session")
def laion_pt_for_captions(tmp_path_factory):
    """(a LAION-layout `.pt` of the tiny geometry, the folder its --text-config names): a small RoBERTa whose
    tokenizer knows the generated captions' words. Built by `tests/laion_source.py`, as test_laion_checkpoint does."""
    from laion_source import Geometry, laion_checkpoint, small_roberta

    from audio_residual.data_processing.synthetic_captions import CAPTION_WORDS

    config, model, tokenizer = small_roberta([CAPTION_WORDS])
    root = tmp_path_factory.mktemp("laion_pt")
    text_config = root / "roberta"
    config.save_pretrained(text_config)
    tokenizer.save_pretrained(text_config)
    path = root / "630k-audioset-best.pt"
    torch.save(laion_checkpoint(Geometry(), model, seed=3), path)
    return path, text_config


LONG_CAPTION = " ".join(["a loud slow high tone that starts early and a quiet noise that starts late"] * 40)  # 600 words


@pytest.fixture(scope="session")
def long_caption_data(tmp_path_factory):
    """Generated captioned audio (12 clips, 2 captions each) in which one clip of each split has a 600-word
    caption: longer than any text tower reads (the tiny one: 78 tokens; LAION's tokenizer: 77)."""
    import pandas as pd

    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

    root = make_synthetic_captions(tmp_path_factory.mktemp("long") / "gen", n_clips=12, captions_per_clip=2,
                                   seconds=1.0, seed=1, split_fractions=(0.5, 0.25, 0.25))
    captions = pd.read_csv(root / "captions.csv", keep_default_na=False)
    for split in ("train", "validation", "test"):
        captions.loc[captions.index[captions["split"] == split][0], "caption"] = LONG_CAPTION
    captions.to_csv(root / "captions.csv", index=False)
    return root
