"""Overhead figures of the analysis and training code, mostly on the full-size random HTSAT-tiny (CPU, batch 8).

Each figure is measured within one run and prints as `name value`. Ratios are medians of a few repeats
after a warm-up, the two sides interleaved so machine load hits both alike; `demo_seconds` is a plain
wall time. Run all, or name some:

    PYTHONPATH=src python benchmarks/bench.py [capture_overhead pca_pass_overhead ... scale_seconds] [--scale-clips N]

Targets: capture_overhead ≤ 1.15, pca_pass_overhead ≤ 1.30, pca_rss_ratio ≤ 1.10,
residual_step_overhead ≤ 1.25, cached_loading_share ≤ 0.05, demo_seconds ≤ 300 (2-core CPU),
pretrain_step_overhead ≤ 1.2, pretrain_loading_share ≤ 0.05,
prefix_cache_speedup_stage3 ≥ 3, analysis_pass_overhead ≤ 1.30, feature_workers_speedup ≥ 1.8 (2 cores),
distributed_stats_equal ≤ 1e-10, saliency_ig_passes ≤ 70 (IG at 64 steps on one clip, in forward+backward
passes of that clip), ddp_step_overhead ≤ 1.3 (2 gloo processes, one core each; ddp_step_cpu_overhead, its CPU-time
twin, has no target), accumulate_memory_ratio ≤ 0.5; the retrieval figures' targets are in retrieval_bench.py. prefix_cache_speedup (stages 2–3) has no target: weigh it against the
storage printed beside it. scale_seconds (the study at ESC-50 scale, `--scale-clips`, default 2000) is
printed without a target on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
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
import torch.nn.functional as F
from retrieval_bench import RETRIEVAL_BENCHMARKS  # noqa: E402  (benchmarks/ is the script's folder)
from timing import ratio  # noqa: E402

BATCH = 8
REPEATS = 3
RSS_CLIPS = 16  # the RSS figure compares a statistics pass over 2 × RSS_CLIPS clips with one over RSS_CLIPS
STATS_CLIPS = 2  # clips for the PCA statistics of the training-step figures (HTSAT-tiny: 4398 of 184·24 λ)
CLASSES = 10
LOADING_CLIPS = 64  # clips in the memmapped cache of the loading-share figure
LOADING_BATCH = 16
SRC = Path(__file__).resolve().parents[1] / "src"


def _child_env(**extra: str) -> dict[str, str]:
    """A subprocess's environment: this checkout's package first on its path."""
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def _model():
    from audio_residual.clap.tiny import build_htsat_tiny_random

    model, _ = build_htsat_tiny_random(("dog",))
    return model.eval()


def _features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 1001, 64)).astype(np.float32)



@torch.no_grad()
def capture_overhead() -> float:
    """Forward that keeps a reference to every head context (hook_z on all blocks) / plain forward."""
    from audio_residual.clap.encode import audio_embeddings
    from audio_residual.clap.hooks import ClapHooks

    model = _model()
    x = torch.from_numpy(_features(BATCH))
    hooks = ClapHooks(model)

    def captured() -> None:
        store = {}
        with hooks.hooks([("*.attn.hook_z", lambda z, point: store.__setitem__(point.name, z))]):
            audio_embeddings(model, x)

    return ratio(captured, lambda: audio_embeddings(model, x), REPEATS)


@torch.no_grad()
def pca_pass_overhead() -> float:
    """`ResidualStatistics.fit` over 2 batches / plain forward passes over the same clips."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.encode import audio_embeddings

    model = _model()
    features = _features(2 * BATCH)
    rows = np.arange(len(features))

    def plain() -> None:
        for start in range(0, len(rows), BATCH):
            audio_embeddings(model, torch.from_numpy(features[rows[start : start + BATCH]]))

    return ratio(lambda: ResidualStatistics.fit(model, features, rows, batch_size=BATCH), plain, REPEATS)


def _feature_file(folder: Path, clips: int) -> Path:
    """Random log-mel features of `clips` clips in a .npy file, as the feature cache stores them."""
    path = folder / "input_features.npy"
    memmap = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(clips, 1, 1001, 64))
    memmap[:] = _features(clips)
    memmap.flush()
    del memmap
    return path


def _stats_pass_peak_rss(clips: int) -> int:
    """Peak RSS (kB) of a fresh process building the model and fitting statistics on `clips` memmapped clips."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _feature_file(Path(tmp), clips)
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


# ----------------------------------------------------------------- λ training


def _frozen_model():
    model = _model()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _residual(model, features: np.ndarray, **config):
    """ResiDual (λ = 1, trainable) from statistics on a few clips; rank-deficient heads keep fewer components."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.residual.units import build_residual

    with torch.no_grad():
        stats = ResidualStatistics.fit(model, features, np.arange(len(features)), batch_size=len(features))
    return build_residual(stats, granularity="head", **config)


def _classes(dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(CLASSES, dim, generator=generator), dim=-1)
    return embeddings, torch.arange(BATCH) % CLASSES


def _train_step(embed: Callable[[], torch.Tensor], scale: float, classes, labels, optimizer) -> None:
    """One λ step as in `train_residual_fold`: `embed` runs the model with ResiDual attached."""
    emb = embed()
    loss = F.cross_entropy(scale * emb @ classes.T, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def residual_step_overhead() -> float:
    """ResiDual train step (head λ on every stage: forward, CE, backward, AdamW) / the floor of λ training.

    The floor is forward + backward of the unmodified frozen model in which one scalar gain at the input of
    stage 0 (a forward pre-hook) requires grad: activation gradients through every block, no weight grads.
    """
    from audio_residual.clap.encode import audio_embeddings
    from audio_residual.clap.hooks import audio_encoder

    model = _frozen_model()
    features = _features(BATCH)
    residual = _residual(model, features[:STATS_CLIPS])
    print(f"# residual_step_overhead: {residual.num_parameters()} λ over {len(residual.units)} heads", file=sys.stderr)
    x = torch.from_numpy(features)
    classes, labels = _classes(model.config.projection_dim)
    scale = float(model.logit_scale_a.exp())
    optimizer = torch.optim.AdamW(residual.lambdas.values(), lr=1e-2)

    def step() -> None:
        def embed() -> torch.Tensor:
            with residual.attached(model):
                return audio_embeddings(model, x)

        _train_step(embed, scale, classes, labels, optimizer)

    gain = torch.nn.Parameter(torch.ones(()))
    first_stage = audio_encoder(model).layers[0]

    def floor() -> None:
        handle = first_stage.register_forward_pre_hook(lambda _module, args: (args[0] * gain, *args[1:]))
        try:
            emb = audio_embeddings(model, x)
        finally:
            handle.remove()
        gain.grad = None
        F.cross_entropy(scale * emb @ classes.T, labels).backward()

    return ratio(step, floor, REPEATS)


def cached_loading_share() -> float:
    """Share of a λ-training epoch (tiny CLAP, batch 16) spent fetching batches from a memmapped feature cache.

    The cache is a (N, 1, 1001, 64) float32 .npy opened with mmap_mode="r", like the real one. The page cache
    cannot be dropped here, so this is the warm-cache case (the file was just written; repeated epochs).
    Median loading time / median epoch time over a few epochs after a warm-up one.
    """
    from audio_residual.clap.encode import audio_embeddings
    from audio_residual.clap.tiny import build_tiny_clap

    model, _ = build_tiny_clap(("dog",))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        path = _feature_file(Path(tmp), LOADING_CLIPS)
        features = np.load(path, mmap_mode="r")
        residual = _residual(model, np.ascontiguousarray(features[:8]))
        generator = torch.Generator().manual_seed(0)
        classes = F.normalize(torch.randn(CLASSES, model.config.projection_dim, generator=generator), dim=-1)
        labels_all = torch.arange(LOADING_CLIPS) % CLASSES
        scale = float(model.logit_scale_a.exp())
        optimizer = torch.optim.AdamW(residual.lambdas.values(), lr=1e-2)

        def epoch(seed: int) -> tuple[float, float]:
            started = time.perf_counter()
            loading = 0.0
            order = np.random.default_rng(seed).permutation(LOADING_CLIPS)
            for start in range(0, LOADING_CLIPS, LOADING_BATCH):
                rows = order[start : start + LOADING_BATCH]
                fetch = time.perf_counter()
                x = torch.from_numpy(np.ascontiguousarray(features[rows]))
                loading += time.perf_counter() - fetch

                def embed(x: torch.Tensor = x) -> torch.Tensor:
                    with residual.attached(model):
                        return audio_embeddings(model, x)

                _train_step(embed, scale, classes, labels_all[rows], optimizer)
            return loading, time.perf_counter() - started

        epoch(0)
        runs = [epoch(seed) for seed in range(1, 2 * REPEATS + 2)]
    return statistics.median(r[0] for r in runs) / statistics.median(r[1] for r in runs)


def _pretrain_setup(clips: int, folder: Path):
    """The tiny pretraining model, its optimizer and a memmapped cache of `clips` clips with 5 captions each."""
    from audio_residual.training import pretrain as P

    texts = [f"a {p} {f} that starts {o}" for p in ("low", "high") for f in ("tone", "hum") for o in ("early", "late")]
    model, processor = P.new_clap("tiny", P.caption_tokenizer(texts), seed=0)
    tokens = processor.tokenizer([texts[i % len(texts)] for i in range(5 * clips)], padding=True, return_tensors="pt")
    features = np.load(_feature_file(folder, clips), mmap_mode="r")
    data = P.CaptionedFeatures(features, np.zeros(clips, bool), tokens["input_ids"], tokens["attention_mask"],
                               np.repeat(np.arange(clips), 5), np.arange(clips), np.arange(0))  # fmt: skip
    params = P.trainable_parameters(model, "none")
    optimizer, schedule = P.optimizer_and_schedule(model, params, P.PretrainConfig(lr=1e-4), total_steps=1000)
    return P, model.train(), data, optimizer, schedule


def pretrain_step_overhead() -> float:
    """Pretraining step (fetch, forward, symmetric loss, backward, AdamW, schedule, clamp) / bare forward +
    backward of the same tiny model on the same batch (16 clips, one caption each)."""
    with tempfile.TemporaryDirectory() as tmp:
        P, model, data, optimizer, schedule = _pretrain_setup(LOADING_BATCH, Path(tmp))
        batch = P.epoch_batches(data, LOADING_BATCH, torch.Generator().manual_seed(0))[0]
        inputs = P.batch_inputs(data, batch, "cpu")

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            P.batch_loss(model, data, batch, "cpu", contextlib.nullcontext).backward()
            optimizer.step()
            schedule.step()
            P.clamp_logit_scale(model)

        def floor() -> None:
            model.zero_grad(set_to_none=True)
            audio = model.audio_projection(model.audio_model(input_features=inputs["input_features"]).pooler_output)
            text_out = model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            (audio * model.text_projection(text_out.pooler_output)).sum().backward()

        return ratio(step, floor, REPEATS)


def pretrain_loading_share() -> float:
    """Share of a pretraining epoch (tiny model, batch 16, 64 clips) spent fetching batches from the memmapped
    feature cache and the tokenized captions (warm page cache; median of a few epochs after a warm-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        P, model, data, optimizer, schedule = _pretrain_setup(LOADING_CLIPS, Path(tmp))

        def epoch(seed: int) -> tuple[float, float]:
            started, loading = time.perf_counter(), 0.0
            for batch in P.epoch_batches(data, LOADING_BATCH, torch.Generator().manual_seed(seed)):
                fetch = time.perf_counter()
                inputs = P.batch_inputs(data, batch, "cpu")
                loading += time.perf_counter() - fetch
                optimizer.zero_grad(set_to_none=True)
                P.inputs_loss(model, inputs).backward()
                optimizer.step()
                schedule.step()
                P.clamp_logit_scale(model)
            return loading, time.perf_counter() - started

        epoch(0)
        runs = [epoch(seed) for seed in range(1, REPEATS + 1)]
    return statistics.median(r[0] for r in runs) / statistics.median(r[1] for r in runs)


DDP_BATCH = 16  # the global batch of the data-parallel figure: 8 clips per process
DDP_STEPS = 11  # timed steps of each kind (median), after one warm-up step of each
MEMORY_BATCH = 32  # the contrastive batch of the accumulation memory figure


def _ddp_rank(rank: int, world: int, address: str, folder: str, out: str) -> None:
    """Rank `rank` of the overhead figure: alternately a 2-process step on the global batch and (rank 0 alone,
    rank 1 waiting) a 1-process step on half of it, the same code, model and optimizer; rank 0 writes the times."""
    import torch.distributed as dist

    from audio_residual.training.distributed import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        P, model, data, optimizer, schedule = _pretrain_setup(DDP_BATCH, Path(folder))
        batch = P.epoch_batches(data, DDP_BATCH, torch.Generator().manual_seed(0))[0]
        half = P.epoch_batches(data, DDP_BATCH // world, torch.Generator().manual_seed(0))[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def step(ranks: Ranks, contrastive) -> tuple[float, float]:
            started, cpu = time.perf_counter(), time.thread_time()
            optimizer.zero_grad(set_to_none=True)
            P.ContrastiveStep(model, data, "cpu", contextlib.nullcontext, 1, ranks)(contrastive)
            ranks.average_gradients(params)
            optimizer.step()
            schedule.step()
            return time.perf_counter() - started, time.thread_time() - cpu

        times = {"two": [], "one": []}
        for _ in range(DDP_STEPS + 1):
            dist.barrier()
            times["two"].append(step(Ranks.current(), batch))
            dist.barrier()
            if rank == 0:
                times["one"].append(step(Ranks(), half))
            dist.barrier()
        if rank == 0:
            Path(out).write_text(json.dumps({k: v[1:] for k, v in times.items()}))
    finally:
        dist.destroy_process_group()


@functools.cache
def _ddp_times() -> dict[str, list[list[float]]]:
    """(wall, CPU) seconds of rank 0's steps: "two" (2 processes, 16 clips), "one" (1 process, 8 clips)."""
    from audio_residual.analysis.distributed_stats import loopback_address

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        torch.multiprocessing.spawn(_ddp_rank, args=(2, loopback_address(), tmp, str(out)), nprocs=2)
        return json.loads(out.read_text())


def ddp_step_overhead() -> float:
    """Data-parallel pretraining step of 2 gloo CPU processes (one thread each) on a global batch of 16 (8 each:
    embed, gather with gradients, symmetric loss over 16, backward, gradient all-reduce, AdamW) / the same step of
    one process on 8 clips, in wall time: the price of the communication when each process has a core to itself
    (on a loaded machine it also counts the waits for the process the scheduler left behind)."""
    times = _ddp_times()
    return statistics.median(t[0] for t in times["two"]) / statistics.median(t[0] for t in times["one"])


def ddp_step_cpu_overhead() -> float:
    """`ddp_step_overhead` in the CPU time of rank 0's main thread: the work the data-parallel step adds (its own
    loss over 16, the copies around the collectives), not the waits on the other process, whatever the load."""
    times = _ddp_times()
    return statistics.median(t[1] for t in times["two"]) / statistics.median(t[1] for t in times["one"])


def _memory_child(accumulate: str) -> None:
    """Peak memory (kB) one pretraining step adds, in micro-batches of MEMORY_BATCH / accumulate clips: the peak RSS
    (VmHWM, reset just before the step) over the RSS before it, large tensors mapped and unmapped one by one."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        from audio_residual.training.distributed import Ranks

        P, model, data, optimizer, schedule = _pretrain_setup(MEMORY_BATCH, Path(tmp))
        batch = P.epoch_batches(data, MEMORY_BATCH, torch.Generator().manual_seed(0))[0]
        step = P.ContrastiveStep(model, data, "cpu", contextlib.nullcontext, int(accumulate), Ranks())

        def status(field: str) -> int:
            line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
            return int(line.split()[1])

        for _ in range(2):  # the second step starts as every later one: optimizer state allocated
            optimizer.zero_grad(set_to_none=True)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            before = status("VmRSS:")
            step(batch)
            optimizer.step()
        print(status("VmHWM:") - before)


def accumulate_memory_ratio() -> float:
    """Peak memory added by a pretraining step (tiny model, contrastive batch of 32 clips) at --accumulate 4 / at
    --accumulate 1, each in a fresh subprocess (glibc's mmap threshold fixed at 64 KiB so freed tensors leave RSS)."""
    peaks, env = [], _child_env(MALLOC_MMAP_THRESHOLD_="65536")
    for accumulate in (4, 1):
        out = subprocess.run([sys.executable, __file__, "_memory_child", str(accumulate)], check=True,
                             capture_output=True, text=True, env=env)  # fmt: skip
        peaks.append(int(out.stdout.split()[-1]))
    print(f"  (peak added: {peaks[0]} kB at --accumulate 4, {peaks[1]} kB at 1)", file=sys.stderr)
    return peaks[0] / peaks[1]


def demo_seconds() -> float:
    """Wall time (s) of `run_demo` into a temporary folder, in a fresh subprocess so imports count.

    A plain wall time, so it rises with other jobs on the machine: the child's CPU time and the load average
    print beside it (stderr) to tell a slow demo from a busy machine.
    """
    env = _child_env()
    with tempfile.TemporaryDirectory() as tmp:
        code = "import sys; from audio_residual.demo import run_demo; run_demo(sys.argv[1])"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "demo")], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load = os.getloadavg()[0]
    print(f"# demo_seconds: {cpu:.0f} s CPU (user+sys) in {seconds:.0f} s wall; 1-min load average {load:.1f}",
          file=sys.stderr)
    return seconds


def _prefix_speedup(stages: tuple[int, ...]) -> float:
    """Train step (head λ on `stages`) running the whole encoder / the same step from the cached input of the first.

    The cached path is `clap.encode.encode_from_stage` (the transformers stages from there on and the encoder
    tail), as λ training uses it; it is checked against the full forward before timing. Prints the per-clip
    storage of the cached input next to that of the mel features.
    """
    from audio_residual.clap.encode import audio_embeddings, encode_from_stage, stage_input

    model = _frozen_model()
    stage = min(stages)
    features = _features(BATCH)
    residual = _residual(model, features[:STATS_CLIPS], stages=stages)
    x = torch.from_numpy(features)
    classes, labels = _classes(model.config.projection_dim)
    scale = float(model.logit_scale_a.exp())
    optimizer = torch.optim.AdamW(residual.lambdas.values(), lr=1e-2)
    with torch.no_grad():
        hidden = stage_input(model, x, stage)

    def cached() -> torch.Tensor:
        return encode_from_stage(model, hidden, stage).embedding

    with torch.no_grad():
        diff = float((cached() - audio_embeddings(model, x)).abs().max())
        with residual.attached(model):
            diff = max(diff, float((cached() - audio_embeddings(model, x)).abs().max()))
    assert diff <= 1e-5, f"cached-prefix embeddings differ from the full forward by {diff}"
    per_clip, mel = hidden[0].numel() * hidden.element_size(), features[0].nbytes
    print(f"# prefix_cache (stages {stages}): stage-{stage} input {tuple(hidden.shape[1:])} = {per_clip / 1024:.0f}"
          f" KiB/clip fp32 vs mel {features.shape[1:]} = {mel / 1024:.0f} KiB/clip ({per_clip / mel:.2f}×);"
          f" max diff {diff:.1e}", file=sys.stderr)

    def step(embed: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            def attached() -> torch.Tensor:
                with residual.attached(model):
                    return embed()

            _train_step(attached, scale, classes, labels, optimizer)

        return run

    return ratio(step(lambda: audio_embeddings(model, x)), step(cached), REPEATS)


def prefix_cache_speedup() -> float:
    """λ on stages 2–3: step running the whole encoder / step from the cached stage-2 input."""
    return _prefix_speedup((2, 3))


def prefix_cache_speedup_stage3() -> float:
    """λ on stage 3 only: step running the whole encoder / step from the cached stage-3 input."""
    return _prefix_speedup((3,))


@torch.no_grad()
def analysis_pass_overhead() -> float:
    """The analysis pass (statistics + attention-pattern reservoir, one forward) / plain forwards, 2 batches."""
    from audio_residual.analysis.patterns import PatternReservoir
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.encode import audio_embeddings

    model = _model()
    features = _features(2 * BATCH)
    rows = np.arange(len(features))

    def plain() -> None:
        for start in range(0, len(rows), BATCH):
            audio_embeddings(model, torch.from_numpy(features[rows[start : start + BATCH]]))

    def analysis() -> None:
        reservoir = PatternReservoir(cap=512)
        ResidualStatistics.fit(model, features, rows, batch_size=BATCH,
                               extra_hooks=[("*.attn.hook_pattern", reservoir.hook)])

    return ratio(analysis, plain, REPEATS)


FEATURE_CLIPS = 240  # generated 5 s clips for the feature-worker figure (pool start-up is counted)
SCALE_CLIPS = 2000  # `--scale-clips N` changes it: the ESC-50 scale by default


def feature_workers_speedup() -> float:
    """Feature extraction (decode, resample, log-mel) of FEATURE_CLIPS generated clips: 1 process / 2 workers.

    One cold run each into a fresh cache (the pool's start-up counts); the two caches are checked byte-equal.
    """
    from audio_residual.clap.tiny import build_tiny_clap
    from audio_residual.data_processing import FeatureCache, load_esc50, make_synthetic_esc50
    from audio_residual.data_processing.audio_config import AudioConfig

    extractor = build_tiny_clap(())[1].feature_extractor
    with tempfile.TemporaryDirectory() as tmp:
        table = load_esc50(make_synthetic_esc50(Path(tmp) / "esc", n_classes=4, clips_per_class=FEATURE_CLIPS // 4))
        seconds, files = {}, []
        for workers in (1, 2):
            cache = FeatureCache(Path(tmp) / f"cache{workers}", extractor, AudioConfig(workers=workers))
            started = time.perf_counter()
            cache.compute(table)
            seconds[workers] = time.perf_counter() - started
            files.append(cache.store(table).features.read_bytes())
        assert files[0] == files[1], "2 workers wrote other features than 1 process"
    print(f"# feature_workers_speedup: {len(table)} clips, {seconds[1]:.1f} s in 1 process"
          f" ({len(table) / seconds[1]:.1f} clips/s), {seconds[2]:.1f} s with 2 workers", file=sys.stderr)
    return seconds[1] / seconds[2]


def distributed_stats_equal() -> float:
    """Max abs difference of every mean and covariance: statistics by 2 gloo CPU processes vs 1 process.

    Full-size random HTSAT-tiny saved as a local model folder, 5 clips in 3 batches of 2.
    """
    from audio_residual.analysis.distributed_stats import fit_on_cpu_processes
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.tiny import build_htsat_tiny_random

    model, processor = build_htsat_tiny_random(("dog",))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        path = _feature_file(Path(tmp), 5)
        rows = np.arange(5)
        shared = fit_on_cpu_processes(str(folder), ("dog",), path, rows, 2, Path(tmp) / "stats.safetensors")
        with torch.no_grad():
            single = ResidualStatistics.fit(model.eval(), np.load(path, mmap_mode="r"), rows, batch_size=2)
    return max(
        float((getattr(shared.blocks[block][kind], part) - getattr(moments, part)).abs().max())
        for block, parts in single.blocks.items()
        for kind, moments in parts.items()
        for part in ("mean", "cov")
    )


def scale_seconds() -> float:
    """Wall time (s) of `audio-residual experiment` on SCALE_CLIPS generated 5 s clips (fresh process, fresh cache).

    Full-size random HTSAT-tiny saved as a local model folder; a one-point grid (head λ on stage 3 only, lr 0.01,
    10 epochs) on folds 1–2; 2 feature workers; W&B off; head ablation on 2 clips (184 heads × clips full
    forwards would dominate on a CPU). Classes: SCALE_CLIPS/40 (50 at 2000, as ESC-50), at least 2.
    """
    import json

    from audio_residual.clap.tiny import build_htsat_tiny_random
    from audio_residual.data_processing import make_synthetic_esc50

    classes = max(2, min(50, SCALE_CLIPS // 40))
    env = _child_env()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_esc50(Path(tmp) / "esc", n_classes=classes, clips_per_class=SCALE_CLIPS // classes)
        model, processor = build_htsat_tiny_random(())
        model.save_pretrained(Path(tmp) / "model")
        processor.save_pretrained(Path(tmp) / "model")
        grid = {"lr": [0.01], "epochs": [10], "stages": [[3]], "granularity": ["head"], "fold": [1, 2]}
        (Path(tmp) / "grid.json").write_text(json.dumps(grid))
        command = [sys.executable, "-m", "audio_residual", "experiment", "--data", str(data),
                   "--model", str(Path(tmp) / "model"), "--out", str(Path(tmp) / "out"), "--cache", str(Path(tmp) / "cache"),
                   "--grid", str(Path(tmp) / "grid.json"), "--wandb", "disabled", "--workers", "2",
                   "--ablation-max-clips", "2"]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    print(f"# scale_seconds: {classes * (SCALE_CLIPS // classes)} clips, {classes} classes; 1-min load average"
          f" {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return seconds


IG_STEPS = 64
IG_BATCH = 16  # clips' path points per pass (`internal_batch_size`)


def saliency_ig_passes() -> float:
    """Integrated Gradients of one clip at IG_STEPS steps, in forward+backward passes of that clip.

    Full-size random HTSAT-tiny; IG runs its path points IG_BATCH per pass (memory bounded by the batch).
    The unit is one forward+backward of the zero-shot score on the single clip, measured in the same run.
    """
    from audio_residual.analysis.saliency import AttributionOptions, TextScore, attribute

    model = _model()
    texts = F.normalize(torch.randn(CLASSES, model.config.projection_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    scorer = TextScore(model, texts, logit_scale=10.0)
    x = torch.from_numpy(_features(1)) * 10 - 40
    target = torch.tensor([0])

    def integrated_gradients() -> None:
        attribute(scorer, x, target, ("integrated_gradients",),
                  options=AttributionOptions(steps=IG_STEPS, batch_size=IG_BATCH))

    def one_pass() -> None:
        inputs = x.clone().requires_grad_(True)
        scorer(inputs, target).sum().backward()

    return ratio(integrated_gradients, one_pass, REPEATS)


BENCHMARKS: dict[str, Callable[[], float]] = {
    "capture_overhead": capture_overhead,
    "pca_pass_overhead": pca_pass_overhead,
    "pca_rss_ratio": pca_rss_ratio,
    "residual_step_overhead": residual_step_overhead,
    "cached_loading_share": cached_loading_share,
    "demo_seconds": demo_seconds,
    "pretrain_step_overhead": pretrain_step_overhead,
    "pretrain_loading_share": pretrain_loading_share,
    "prefix_cache_speedup": prefix_cache_speedup,
    "prefix_cache_speedup_stage3": prefix_cache_speedup_stage3,
    "analysis_pass_overhead": analysis_pass_overhead,
    "feature_workers_speedup": feature_workers_speedup,
    "distributed_stats_equal": distributed_stats_equal,
    "scale_seconds": scale_seconds,
    "saliency_ig_passes": saliency_ig_passes,
    "ddp_step_overhead": ddp_step_overhead,
    "ddp_step_cpu_overhead": ddp_step_cpu_overhead,
    "accumulate_memory_ratio": accumulate_memory_ratio,
}
BENCHMARKS.update(RETRIEVAL_BENCHMARKS)  # retrieval_memory_ratio, tap_pair_time_ratio, residual_contrastive_step_ratio


def main(argv: list[str]) -> int:
    global SCALE_CLIPS
    if argv[:1] == ["_rss_child"]:
        _rss_child(argv[1])
        return 0
    if argv[:1] == ["_memory_child"]:
        _memory_child(argv[1])
        return 0
    if "--scale-clips" in argv:
        at = argv.index("--scale-clips")
        SCALE_CLIPS, argv = int(argv[at + 1]), argv[:at] + argv[at + 2:]
    unknown = [name for name in argv if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in argv or BENCHMARKS:
        value = BENCHMARKS[name]()
        print(f"{name} {value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{name} {value:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
