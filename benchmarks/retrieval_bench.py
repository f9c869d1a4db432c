"""Retrieval figures for `bench.py` (run them there: `python benchmarks/bench.py retrieval_memory_ratio ...`).

Targets: retrieval_memory_ratio ≤ 2.2 (blockwise evaluation's peak memory on 2N clips × 5 captions / on N:
linear, not quadratic), tap_pair_time_ratio ≤ 50 on CPU (TAP's scoring time per (clip, caption) pair / plain
dot-product scoring), residual_contrastive_step_ratio ≤ 1.3 (ResiDual's λ step with the symmetric
contrastive loss / its classification step, same model and batch).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from timing import ratio  # noqa: E402  (benchmarks/ is the script's folder)

MEMORY_CLIPS = 2000  # N: the memory figure compares 2N clips × 5 captions with N clips × 5 captions
EMBED_DIM = 512
TAP_CLIPS, TAP_FRAMES, TAP_BLOCK = 256, 32, 256  # HTSAT's 10 s input ends in 32 time frames
BATCH = 8
DOT_LOOPS = 20
REPEATS = 5



def retrieval_memory_child(clips: int) -> None:
    """In a fresh process: the growth of peak RSS (kB) while making N × 5 embeddings and evaluating them."""
    from audio_residual.tasks.retrieval import retrieval_metrics

    torch.set_grad_enabled(False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(clips, EMBED_DIM, generator=g)
    text = audio.repeat_interleave(5, 0) + torch.randn(5 * clips, EMBED_DIM, generator=g)
    retrieval_metrics(audio, text, np.repeat(np.arange(clips), 5), block=256)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)


def _peak_growth(clips: int) -> int:
    out = subprocess.run([sys.executable, __file__, "_memory_child", str(clips)], check=True, capture_output=True,
                         text=True)
    return int(out.stdout.split()[-1])


def retrieval_memory_ratio() -> float:
    """Peak-RSS growth of blockwise evaluation on 2N clips × 5 captions / on N (fresh processes)."""
    small, large = _peak_growth(MEMORY_CLIPS), _peak_growth(2 * MEMORY_CLIPS)
    full = 2 * MEMORY_CLIPS * 10 * MEMORY_CLIPS * 4 // 1024
    print(f"# retrieval_memory_ratio: {small} kB at N={MEMORY_CLIPS}, {large} kB at 2N; the whole 2N score "
          f"matrix alone would take {full} kB", file=sys.stderr)
    return large / small


def tap_pair_time_ratio() -> float:
    """Scoring every (clip, caption) pair in blocks: TAP's scorer / the dot-product scorer (CPU).

    Both scorers are built before the clock starts: TAP's per-clip preparation (keys, value map, Gram:
    O(clips · L · D²), not per pair) is timed apart and printed. TAP costs at least L frame similarities
    per pair where a dot product costs one: L = 32 bounds the ratio from below.
    """
    from audio_residual.methods.tap import TextAwarePooling
    from audio_residual.tasks.retrieval import dot_scorer

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(TAP_CLIPS, TAP_FRAMES, EMBED_DIM, generator=g)
    text = torch.randn(5 * TAP_CLIPS, EMBED_DIM, generator=g)
    tap = TextAwarePooling(EMBED_DIM).eval()

    def score_all(scorer) -> None:
        for start in range(0, len(text), TAP_BLOCK):
            scorer(slice(0, TAP_CLIPS), slice(start, min(start + TAP_BLOCK, len(text))))

    with torch.no_grad():
        start = time.perf_counter()
        tap_scorer = tap.scorer(tokens, text)
        prepare = time.perf_counter() - start
        dot = dot_scorer(tokens.mean(1), text)
        # The dot-product side runs DOT_LOOPS times per timing: one pass (~10 ms) is within scheduler jitter.
        pair_ratio = DOT_LOOPS * ratio(lambda: score_all(tap_scorer),
                                       lambda: [score_all(dot) for _ in range(DOT_LOOPS)], REPEATS)
    print(f"# tap_pair_time_ratio: {TAP_CLIPS} clips × {len(text)} captions, {TAP_FRAMES} frames, width {EMBED_DIM}, "
          f"{torch.get_num_threads()} threads; TAP's per-clip preparation {1000 * prepare / TAP_CLIPS:.2f} ms/clip",
          file=sys.stderr)
    return pair_ratio


def residual_contrastive_step_ratio() -> float:
    """ResiDual λ step (head λ on every stage, full-size random HTSAT-tiny, batch 8) with symmetric InfoNCE
    against 8 caption embeddings / the same step with cross-entropy over class embeddings."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.encode import audio_embeddings
    from audio_residual.clap.tiny import build_htsat_tiny_random
    from audio_residual.residual.units import build_residual
    from audio_residual.tasks.loss import pair_infonce

    model, _ = build_htsat_tiny_random(("dog",))
    model.eval().requires_grad_(False)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((BATCH, 1, 1001, 64)).astype(np.float32))
    with torch.no_grad():
        stats = ResidualStatistics.fit(model, x.numpy(), np.arange(2), batch_size=2)
    residual = build_residual(stats, granularity="head")
    optimizer = torch.optim.AdamW(residual.lambdas.values(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    dim = model.config.projection_dim
    captions = F.normalize(torch.randn(BATCH, dim, generator=g), dim=-1)
    classes, labels = F.normalize(torch.randn(10, dim, generator=g), dim=-1), torch.arange(BATCH) % 10
    scale = float(model.logit_scale_a.exp())

    def step(loss_of) -> Callable[[], None]:
        def run() -> None:
            with residual.attached(model):
                emb = audio_embeddings(model, x)
            loss = loss_of(emb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    return ratio(step(lambda emb: pair_infonce(emb, captions, scale)),
                 step(lambda emb: F.cross_entropy(scale * emb @ classes.T, labels)), REPEATS)


RETRIEVAL_BENCHMARKS: dict[str, Callable[[], float]] = {
    "retrieval_memory_ratio": retrieval_memory_ratio,
    "tap_pair_time_ratio": tap_pair_time_ratio,
    "residual_contrastive_step_ratio": residual_contrastive_step_ratio,
}

if __name__ == "__main__" and sys.argv[1:2] == ["_memory_child"]:
    retrieval_memory_child(int(sys.argv[2]))
