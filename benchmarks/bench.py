"""Overhead figures of the analysis code on the full-size random HTSAT-tiny (CPU, batch 8).

Each figure is a ratio measured within one run (median of a few repeats after a warm-up, the two sides
interleaved so machine load hits both alike) and prints as `name value`. Run all, or name some:

    PYTHONPATH=src python benchmarks/bench.py [capture_overhead pca_pass_overhead pca_rss_ratio]

Targets: capture_overhead ≤ 1.15, pca_pass_overhead ≤ 1.30, pca_rss_ratio ≤ 1.10.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

BATCH = 8
REPEATS = 3
RSS_CLIPS = 16  # the RSS figure compares a statistics pass over 2 × RSS_CLIPS clips with one over RSS_CLIPS


def _model():
    from audio_residual.clap.tiny import build_htsat_tiny_random

    model, _ = build_htsat_tiny_random(("dog",))
    return model.eval()


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 1001, 64)).astype(np.float32)


def _ratio(numerator: Callable[[], None], denominator: Callable[[], None]) -> float:
    """median(numerator time) / median(denominator time), interleaved after one warm-up of each."""
    numerator(), denominator()
    top, bottom = [], []
    for _ in range(REPEATS):
        for fn, times in ((numerator, top), (denominator, bottom)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(top) / statistics.median(bottom)


@torch.no_grad()
def capture_overhead() -> float:
    """Forward that keeps a reference to every head context (hook_z on all blocks) / plain forward."""
    from audio_residual.clap.classifier import audio_embeddings
    from audio_residual.clap.hooks import ClapHooks

    model = _model()
    x = torch.from_numpy(_features(BATCH))
    hooks = ClapHooks(model)

    def captured() -> None:
        store = {}
        with hooks.hooks([("*.attn.hook_z", lambda z, point: store.__setitem__(point.name, z))]):
            audio_embeddings(model, x)

    return _ratio(captured, lambda: audio_embeddings(model, x))


@torch.no_grad()
def pca_pass_overhead() -> float:
    """`ResidualStatistics.fit` over 2 batches / plain forward passes over the same clips."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.classifier import audio_embeddings

    model = _model()
    features = _features(2 * BATCH)
    rows = np.arange(len(features))

    def plain() -> None:
        for start in range(0, len(rows), BATCH):
            audio_embeddings(model, torch.from_numpy(features[rows[start : start + BATCH]]))

    return _ratio(lambda: ResidualStatistics.fit(model, features, rows, batch_size=BATCH), plain)


def _stats_pass_peak_rss(clips: int) -> int:
    """Peak RSS (kB) of a fresh process building the model and fitting statistics on `clips` memmapped clips."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "features.npy"
        memmap = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(clips, 1, 1001, 64))
        memmap[:] = _features(clips)
        memmap.flush()
        del memmap
        out = subprocess.run(
            [sys.executable, __file__, "_rss_child", str(path)], check=True, capture_output=True, text=True
        )
    return int(out.stdout.split()[-1])


def _rss_child(path: str) -> None:
    from audio_residual.analysis.stats import ResidualStatistics

    torch.set_grad_enabled(False)
    features = np.load(path, mmap_mode="r")
    ResidualStatistics.fit(_model(), features, np.arange(len(features)), batch_size=BATCH)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def pca_rss_ratio() -> float:
    """Peak RSS of the statistics pass on 2N clips / on N clips, each in a fresh subprocess."""
    return _stats_pass_peak_rss(2 * RSS_CLIPS) / _stats_pass_peak_rss(RSS_CLIPS)


BENCHMARKS: dict[str, Callable[[], float]] = {
    "capture_overhead": capture_overhead,
    "pca_pass_overhead": pca_pass_overhead,
    "pca_rss_ratio": pca_rss_ratio,
}


def main(argv: list[str]) -> int:
    if argv[:1] == ["_rss_child"]:
        _rss_child(argv[1])
        return 0
    unknown = [name for name in argv if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in argv or BENCHMARKS:
        print(f"{name} {BENCHMARKS[name]():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
