"""GPU figures: throughput and peak memory of every heavy path, and the default study extrapolated from one run.

On CUDA, on the full-size random HTSAT-tiny at bf16, batch 64 (benchmarks/gpu_check.sh runs it; docs/gpu.md):

    precision          bf16/fp16 embeddings against fp32; ResiDual at λ = 1 under bf16 (tests/test_cuda.py's bound)
    forward            clips/s and peak memory: batch 16..256, fp32 with and without TF32, bf16
    loading            the same forward fed from a memmapped cache: the project's batches (pageable copies) against
                       pinned double buffers with non-blocking copies
    residual_step      the λ step (head λ on every stage; stage 3 from the prefix cache) and its floor; host↔device
                       copies per step of the compute step and of the training loop's step
    stats_pass         the PCA statistics pass against plain forwards
    pretrain_step      one contrastive step of the htsat-tiny CLAP (RoBERTa-base text tower), one GPU; DDP over
                       the GPUs present when there are several
    retrieval_scoring  blockwise retrieval ranks (10,000 clips × 5 captions) and TAP's pair scoring
    ig                 Integrated Gradients at 64 steps
    compile            torch.compile of the audio tower: compile time and steady clips/s against eager
    experiment         `audio-residual experiment` at ESC-50 scale (2000 generated 5 s clips, the full-size random
                       model as a local folder, zero-shot + linear probe + ResiDual at one configuration on five
                       folds), per-epoch costs of the default grid's configurations, and the whole default study
                       extrapolated from them

Without CUDA (`--small`, the CPU rehearsal) every measure runs on toy sizes to prove the code path; its figures
mean nothing. Each measure is skipped, with a line saying so, when the time left (`--budget`) is under its
estimate; an error is recorded and the next measure runs. Figures accumulate in OUT/gpu_bench.json (each call
merges into it) and OUT/gpu_bench.png; the table prints last.

    python benchmarks/gpu_bench.py --out OUT [--budget S] [--small] [--device auto|cuda|cpu] [NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TARGETS = {"forward_bf16_b64_clips_per_s": (">=", 1000.0), "table1_seconds": ("<=", 600.0),
           "default_sweep_seconds": ("<=", 3600.0)}  # the targets, on one H100 or H200
CLASSES = 10


@dataclass
class Bench:
    """Where and how big: the device, the sizes (small on the CPU rehearsal), the deadline, the figures so far."""

    device: torch.device
    small: bool
    deadline: float
    out: Path
    inputs: Path | None = None  # the end-to-end run's data and model, prepared beforehand (`--prepare`)
    figures: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def batch(self) -> int:
        return 2 if self.small else 64

    def autocast(self, dtype: torch.dtype | None = torch.bfloat16):
        """bf16 autocast on CUDA (CPU: bf16 CPU autocast, to run the same code); None: fp32."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def put(self, name: str, value, unit: str = "") -> None:
        self.figures[name] = value
        self.units[name] = unit
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {name} = {shown} {unit}", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------- helpers


def seconds(bench: Bench, fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of `fn` after warm-up, the GPU synchronised around each call."""
    repeats, warmup = (1, 1) if bench.small else (repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        bench.sync()
        started = time.perf_counter()
        fn()
        bench.sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_mib(bench: Bench, fn: Callable[[], object]) -> float | None:
    """Peak GPU memory allocated while `fn` runs (MiB); None on the CPU."""
    if not bench.cuda:
        fn()
        return None
    bench.sync()
    torch.cuda.reset_peak_memory_stats(bench.device)
    fn()
    bench.sync()
    return torch.cuda.max_memory_allocated(bench.device) / 2**20


def throughput(bench: Bench, name: str, fn: Callable[[], object], clips: int, repeats: int = 5) -> float:
    """Record `name_clips_per_s` and `name_peak_mib` of `fn`, which handles `clips` clips."""
    rate = clips / seconds(bench, fn, repeats)
    bench.put(f"{name}_clips_per_s", rate, "clips/s")
    memory = peak_mib(bench, fn)
    if memory is not None:
        bench.put(f"{name}_peak_mib", memory, "MiB")
    return rate


def memcpy_counts(fn: Callable[[], object]) -> dict[str, int]:
    """Host→device and device→host copies the GPU ran during `fn()` (torch.profiler's CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [event.name.lower() for event in prof.events()]
    names = [name for name in names if "memcpy" in name]
    return {"HtoD": sum("htod" in name for name in names), "DtoH": sum("dtoh" in name for name in names)}


def log_mels(n: int, seed: int = 0) -> np.ndarray:
    """Random inputs on a log-mel's scale (dB around −40), as the feature cache stores them."""
    return (np.random.default_rng(seed).standard_normal((n, 1, 1001, 64)) * 10 - 40).astype(np.float32)


def build_model(bench: Bench, class_names=("dog",)):
    """Full-size random HTSAT-tiny (the tiny CLAP on the small rehearsal), frozen, on the bench's device."""
    from audio_residual.clap.tiny import build_htsat_tiny_random, build_tiny_clap

    model, processor = (build_tiny_clap if bench.small else build_htsat_tiny_random)(class_names)
    return model.to(bench.device).eval().requires_grad_(False), processor


def on_device(bench: Bench, features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features).to(bench.device)


def class_embeddings(model, bench: Bench) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(CLASSES, model.config.projection_dim, generator=generator), dim=-1)
    return text.to(bench.device), (torch.arange(bench.batch) % CLASSES).to(bench.device)


def fitted_residual(model, bench: Bench, features: np.ndarray, **config):
    """ResiDual (λ = 1, trainable) from statistics on `features`."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.residual.units import ResiDual, ResidualConfig

    with torch.no_grad():
        stats = ResidualStatistics.fit(model, features, np.arange(len(features)), batch_size=bench.batch,
                                       device=bench.device, autocast=bench.autocast)
    return ResiDual.from_statistics(stats, ResidualConfig(granularity="head", **config)).to(bench.device)


def arrays_workspace(bundle, features: np.ndarray, labels: np.ndarray, class_names, folds: np.ndarray):
    """A `Workspace` over in-memory log-mels (every clip valid), as tests/conftest.py's `workspace_of_arrays`."""
    from audio_residual.data_processing import CachedFeatures, ClipTable
    from audio_residual.workspace import Workspace

    n = len(features)
    table = ClipTable("arrays", Path("."), [f"clip{i}.wav" for i in range(n)], labels, folds, tuple(class_names))
    cached = CachedFeatures(features, np.zeros(n, dtype=bool), np.ones(n, dtype=bool), [],
                            tuple(f"clip{i}" for i in range(n)), "arrays")
    return Workspace(table, bundle, cached, batch_size=8)


def memmap_features(folder: Path, clips: int) -> np.ndarray:
    """`clips` random log-mels in a memmapped .npy, as the feature cache stores them (warm page cache)."""
    path = folder / "input_features.npy"
    store = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(clips, 1, 1001, 64))
    for start in range(0, clips, 256):
        store[start : start + 256] = log_mels(min(256, clips - start), seed=start)
    store.flush()
    del store
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------- measures


def precision(bench: Bench) -> None:
    """Relative error of the bf16/fp16 embeddings against fp32, and of ResiDual at λ = 1 under bf16; the bound
    tests/test_cuda.py derives (2 · u · √blocks) beside them."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.encode import audio_embeddings

    model, _ = build_model(bench)
    blocks = sum(model.config.audio_config.depths)
    features = log_mels(bench.batch, seed=1)
    x = on_device(bench, features)
    residual = fitted_residual(model, bench, features[: max(2, bench.batch // 8)])
    amps = {"bf16": torch.bfloat16, "fp16": torch.float16} if bench.cuda else {"bf16": torch.bfloat16}
    with torch.no_grad():
        reference = audio_embeddings(model, x).double()
        for name, dtype in amps.items():
            with bench.autocast(dtype):
                plain = audio_embeddings(model, x)
                with residual.attached(model):
                    edited = audio_embeddings(model, x)
            unit = float(torch.finfo(dtype).eps) / 2
            error = float((plain.double() - reference).norm() / reference.norm())
            bench.put(f"precision_{name}_relative_error", error)
            bench.put(f"precision_{name}_over_u_sqrt_blocks", error / (unit * math.sqrt(blocks)),
                      "(tests/test_cuda.py's TOLERANCE_FACTOR must stay above it)")
            bench.put(f"residual_at_one_{name}_relative_error", float((edited.double() - reference).norm() / reference.norm()))
            bench.put(f"residual_at_one_{name}_vs_plain_max_abs", float((edited - plain).abs().max()))
    clips = min(6, len(features))
    stats = {dtype: ResidualStatistics.fit(model, features, np.arange(clips), batch_size=3, device=bench.device,
                                           autocast=lambda dtype=dtype: bench.autocast(dtype))
             for dtype in (None, *amps.values())}
    for name, dtype in amps.items():
        unit = float(torch.finfo(dtype).eps) / 2
        for part, factor in (("mean", "1"), ("cov", "COVARIANCE_FACTOR")):
            worst = max(float((getattr(stats[dtype].blocks[b][k], part) - getattr(m, part)).norm() / getattr(m, part).norm())
                        for b, parts in stats[None].blocks.items() for k, m in parts.items() if k in ("z", "mlp"))
            bench.put(f"precision_stats_{name}_{part}_over_u_sqrt_blocks", worst / (unit * math.sqrt(blocks)),
                      f"(tests/test_cuda.py: {factor} × TOLERANCE_FACTOR must stay above it)")


def forward(bench: Bench) -> None:
    """The audio tower's forward on inputs already on the device: bf16 over batch sizes, fp32 with/without TF32."""
    from audio_residual.clap.encode import audio_embeddings

    model, _ = build_model(bench)
    batches = (2,) if bench.small else (16, 32, 64, 128, 256)
    features = on_device(bench, log_mels(max(batches), seed=2))

    def run(n: int, dtype) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), bench.autocast(dtype):
                audio_embeddings(model, features[:n])

        return go

    for n in batches:
        throughput(bench, f"forward_bf16_b{n}", run(n, torch.bfloat16), n)
    if not bench.cuda:
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            tag = "tf32" if tf32 else "fp32"
            throughput(bench, f"forward_{tag}_b64", run(64, None), 64)
            throughput(bench, f"forward_bf16_{tag}rest_b64", run(64, torch.bfloat16), 64)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def loading(bench: Bench) -> None:
    """The bf16 forward fed from a memmapped cache: the project's `batches` (pageable `.to(device)`) against pinned
    double buffers with non-blocking copies, and against inputs already on the device (the ceiling)."""
    from audio_residual.clap.batches import batches
    from audio_residual.clap.encode import audio_embeddings

    model, _ = build_model(bench)
    clips, n = (4, 2) if bench.small else (1024, 64)
    with tempfile.TemporaryDirectory() as tmp:
        features = memmap_features(Path(tmp), clips)
        rows = np.arange(clips)

        def embed(x: torch.Tensor) -> None:
            with torch.no_grad(), bench.autocast():
                audio_embeddings(model, x)

        def project() -> None:
            for _, x, _ in batches(features, rows, n, bench.device):
                embed(x)

        staging = [torch.empty((n, 1, 1001, 64), pin_memory=bench.cuda) for _ in range(2)]
        copied = [torch.cuda.Event() if bench.cuda else None for _ in range(2)]

        def pinned() -> None:
            for i, start in enumerate(range(0, clips, n)):
                slot = i % 2
                if copied[slot] is not None:
                    copied[slot].synchronize()  # the copy that last read this buffer is done
                chunk = rows[start : start + n]
                staging[slot][: len(chunk)].numpy()[:] = features[chunk]
                x = staging[slot][: len(chunk)].to(bench.device, non_blocking=True)
                if copied[slot] is not None:
                    copied[slot].record()
                embed(x)

        resident = on_device(bench, np.ascontiguousarray(features[:n]))
        project_rate = throughput(bench, "loading_project_batches", project, clips, repeats=3)
        pinned_rate = throughput(bench, "loading_pinned_nonblocking", pinned, clips, repeats=3)
        ceiling = clips / seconds(bench, lambda: [embed(resident) for _ in range(0, clips, n)], 3)
    bench.put("loading_resident_clips_per_s", ceiling, "clips/s")
    bench.put("loading_project_share", 1 - project_rate / ceiling, "(time share lost to loading)")
    bench.put("loading_pinned_share", 1 - pinned_rate / ceiling, "(time share lost to loading)")


def residual_step(bench: Bench) -> None:
    """λ step (forward with λ, cross-entropy, backward, AdamW) at bf16: head λ on every stage through the whole
    encoder; head λ on stage 3 from the cached stage-3 input; the floor (activation gradients, no λ)."""
    from audio_residual.clap.encode import audio_embeddings, encode_from_stage, stage_input
    from audio_residual.clap.hooks import audio_encoder

    model, _ = build_model(bench)
    features = log_mels(bench.batch, seed=3)
    x = on_device(bench, features)
    text, labels = class_embeddings(model, bench)
    scale = float(model.logit_scale_a.exp())
    with torch.no_grad(), bench.autocast():
        hidden = stage_input(model, x, 3)

    def step_of(residual, embed: Callable[[], torch.Tensor]) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(residual.lambdas.values(), lr=1e-2)

        def step() -> None:
            with bench.autocast(), residual.attached(model):
                emb = embed()
            loss = F.cross_entropy(scale * emb.float() @ text.T, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    every = fitted_residual(model, bench, features)
    bench.put("residual_step_lambdas_all_stages", every.num_parameters(), "λ")
    throughput(bench, "residual_step_all_stages", step_of(every, lambda: audio_embeddings(model, x)), bench.batch)
    last = fitted_residual(model, bench, features, stages=(3,))
    throughput(bench, "residual_step_stage3_cached", step_of(last, lambda: encode_from_stage(model, hidden, 3).embedding),
               bench.batch)
    gain = torch.nn.Parameter(torch.ones((), device=bench.device))

    def floor() -> None:
        handle = audio_encoder(model).layers[0].register_forward_pre_hook(lambda _m, args: (args[0] * gain, *args[1:]))
        try:
            with bench.autocast():
                emb = audio_embeddings(model, x)
        finally:
            handle.remove()
        gain.grad = None
        F.cross_entropy(scale * emb.float() @ text.T, labels).backward()

    throughput(bench, "residual_step_floor", floor, bench.batch)
    loop_copies(bench)


def loop_copies(bench: Bench) -> None:
    """Host↔device copies per step: the compute step (batch already on the GPU) and the training loop's step
    (`training.loop`: the batch's features and labels go over, the loss's finite check and value come back)."""
    from audio_residual.clap.loading import load_clap
    from audio_residual.tasks import CLASSIFICATION
    from audio_residual.tasks.base import TrainBatch
    from audio_residual.training import TrainConfig
    from audio_residual.training.loop import _epoch, epoch_generator
    from audio_residual.training.trainer import _steps

    names = ("dog", "rain", "sea_waves")
    bundle = load_clap("tiny-random", device=str(bench.device), amp="bf16", class_names=names)
    ws = arrays_workspace(bundle, log_mels(36, seed=4), np.arange(36) % 3, names, np.arange(36) // 12 + 1)
    split = ws.split(1, val_fraction=0.2)
    config = TrainConfig(granularity="head", batch_size=8)
    residual = fitted_residual(bundle.model, bench, np.ascontiguousarray(ws.features.input_features[split.train]))
    steps = _steps(ws, CLASSIFICATION, split, config, residual, None)
    _epoch(steps, epoch_generator(0, 1), "warm-up")
    count = len(list(steps.batches(epoch_generator(0, 2))))
    if bench.cuda:
        looped = memcpy_counts(lambda: _epoch(steps, epoch_generator(0, 2), "profiled"))
        bench.put("loop_step_htod_copies", looped["HtoD"] / count, "per step")
        bench.put("loop_step_dtoh_copies", looped["DtoH"] / count, "per step")
    rows = np.sort(split.train)[:8]
    x, longer = ws.batch(rows)
    ws.batch = lambda _rows: (x, longer)  # the batch already on the GPU
    batch = TrainBatch(rows, torch.as_tensor(ws.table.labels[rows], device=bench.device))

    def step() -> None:
        loss = steps.loss(batch)
        steps.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        steps.optimizer.step()

    step()
    if not bench.cuda:
        print("  copy counts skipped: CUDA only (the steps ran; the profiler sees no copies on a CPU)", flush=True)
        return
    computed = memcpy_counts(step)
    bench.put("compute_step_htod_copies", computed["HtoD"], "per step")
    bench.put("compute_step_dtoh_copies", computed["DtoH"], "per step")


def stats_pass(bench: Bench) -> None:
    """`ResidualStatistics.fit` (bf16, every block's z and MLP moments) against plain forwards, from a memmap."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.batches import batches
    from audio_residual.clap.encode import audio_embeddings

    model, _ = build_model(bench)
    clips = 4 if bench.small else 512
    with tempfile.TemporaryDirectory() as tmp:
        features = memmap_features(Path(tmp), clips)
        rows = np.arange(clips)

        def fit() -> None:
            ResidualStatistics.fit(model, features, rows, batch_size=bench.batch, device=bench.device,
                                   autocast=bench.autocast)

        def plain() -> None:
            for _, x, _ in batches(features, rows, bench.batch, bench.device):
                with torch.no_grad(), bench.autocast():
                    audio_embeddings(model, x)

        fitted = throughput(bench, "stats_pass", fit, clips, repeats=3)
        forwards = throughput(bench, "stats_plain_forward", plain, clips, repeats=3)
    bench.put("stats_pass_overhead", forwards / fitted, "× plain forwards")


def _pretrain_parts(config: str, batch: int, device: torch.device):
    from audio_residual.training import pretrain as P

    texts = [f"a {p} {f} that starts {o}" for p in ("low", "high") for f in ("tone", "hum") for o in ("early", "late")]
    model, processor = P.new_clap(config, P.caption_tokenizer(texts), seed=0)
    model = model.to(device).train()
    tokens = processor.tokenizer([texts[i % len(texts)] for i in range(batch)], padding=True, return_tensors="pt")
    data = P.CaptionedFeatures(log_mels(batch, seed=5), np.zeros(batch, bool), tokens["input_ids"],
                               tokens["attention_mask"], np.arange(batch), np.arange(batch), np.arange(0))
    params = P.trainable_parameters(model, "none")
    optimizer, schedule = P.optimizer_and_schedule(model, params, P.PretrainConfig(lr=1e-4), total_steps=1000)
    batch_rows = P.epoch_batches(data, batch, torch.Generator().manual_seed(0))[0]
    return P, model, data, optimizer, schedule, batch_rows


def pretrain_step(bench: Bench) -> None:
    """One contrastive pretraining step (fetch, bf16 forward of both towers, loss, backward, AdamW, schedule,
    clamp): `htsat-tiny` with its RoBERTa-base text tower on one GPU; DDP over every GPU when there are several."""
    config = "tiny" if bench.small else "htsat-tiny"
    P, model, data, optimizer, schedule, batch = _pretrain_parts(config, bench.batch, bench.device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        P.batch_loss(model, data, batch, bench.device, bench.autocast).backward()
        optimizer.step()
        schedule.step()
        P.clamp_logit_scale(model)

    throughput(bench, f"pretrain_step_{config}", step, bench.batch, repeats=3)
    world = torch.cuda.device_count() if bench.cuda else 2
    if bench.cuda and world < 2:
        print("  pretrain DDP skipped: 1 GPU here (DDP needs several)", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "ddp.json"
        torch.multiprocessing.spawn(_ddp_worker, args=(world, config, bench.batch, str(result), _free_port()),
                                    nprocs=world, join=True)
        per_step = json.loads(result.read_text())["seconds"]
    bench.put(f"pretrain_step_{config}_ddp{world}_clips_per_s", world * bench.batch / per_step, "clips/s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _PairLoss(torch.nn.Module):
    """The contrastive loss of a batch as a module's forward, so DDP sees the forward it synchronises."""

    def __init__(self, model, autocast):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        from audio_residual.training import pretrain as P

        return P.inputs_loss(self.model, inputs, self.autocast)


def _ddp_worker(rank: int, world: int, config: str, batch: int, result: str, port: int) -> None:
    """One DDP process: nccl on its GPU (gloo on the CPU rehearsal), `batch` clips per process per step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        P, model, data, optimizer, schedule, rows = _pretrain_parts(config, batch, device)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
        wrapped = DistributedDataParallel(_PairLoss(model, autocast), device_ids=[rank] if cuda else None)
        times = []
        for _ in range(6 if cuda else 2):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            wrapped(P.batch_inputs(data, rows, device)).backward()
            optimizer.step()
            schedule.step()
            P.clamp_logit_scale(model)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        if rank == 0:
            Path(result).write_text(json.dumps({"seconds": statistics.median(times[1:])}))
    finally:
        dist.destroy_process_group()


def retrieval_scoring(bench: Bench) -> None:
    """Blockwise retrieval ranks of 10,000 clips × 5 captions (512-d), and TAP's pair scoring of 2,000 clips
    (32 frames) × 10,000 captions against the dot product on the same clips."""
    from audio_residual.methods.tap import TextAwarePooling
    from audio_residual.tasks.retrieval import dot_scorer, retrieval_metrics, retrieval_ranks

    clips, tap_clips, dim = (20, 8, 32) if bench.small else (10_000, 2_000, 512)
    generator = torch.Generator().manual_seed(7)
    audio = torch.randn(clips, dim, generator=generator)
    text = (audio.repeat_interleave(5, 0) + torch.randn(5 * clips, dim, generator=generator)).to(bench.device)
    audio, owner = audio.to(bench.device), np.repeat(np.arange(clips), 5)
    took = seconds(bench, lambda: retrieval_metrics(audio, text, owner, block=256), repeats=3, warmup=1)
    bench.put("retrieval_blockwise_seconds", took, f"s ({clips} clips × 5 captions, both directions)")
    memory = peak_mib(bench, lambda: retrieval_metrics(audio, text, owner, block=256))
    if memory is not None:
        bench.put("retrieval_blockwise_peak_mib", memory, "MiB")
    tokens = torch.randn(tap_clips, 32, dim, generator=generator).to(bench.device)
    captions = torch.randn(5 * tap_clips, dim, generator=generator).to(bench.device)
    owner = np.repeat(np.arange(tap_clips), 5)
    tap = TextAwarePooling(dim).to(bench.device).eval()
    with torch.no_grad():
        tap_time = seconds(bench, lambda: retrieval_ranks(tap.scorer(tokens, captions), tap_clips, owner), 3, 1)
        dot_time = seconds(bench, lambda: retrieval_ranks(dot_scorer(tokens.mean(1), captions), tap_clips, owner), 3, 1)
        memory = peak_mib(bench, lambda: retrieval_ranks(tap.scorer(tokens, captions), tap_clips, owner))
    bench.put("tap_pairs_per_s", 2 * tap_clips * len(captions) / tap_time, "pairs/s (each pair scored in both passes)")
    bench.put("tap_over_dot_time", tap_time / dot_time, "×")
    if memory is not None:
        bench.put("tap_peak_mib", memory, "MiB")


def ig(bench: Bench) -> None:
    """Integrated Gradients at 64 steps (bf16, 64 path points per pass) of the zero-shot score, in clips/s and
    in forward+backward passes of the same clips."""
    from audio_residual.analysis.saliency import AttributionOptions, TextScore, attribute

    model, _ = build_model(bench)
    text, _ = class_embeddings(model, bench)
    clips, steps = (1, 4) if bench.small else (8, 64)
    scorer = TextScore(model, text, 10.0, autocast=bench.autocast)
    x = on_device(bench, log_mels(clips, seed=8))
    target = (torch.arange(clips) % CLASSES).to(bench.device)

    def integrated() -> None:
        attribute(scorer, x, target, ("integrated_gradients",), options=AttributionOptions(steps=steps, batch_size=bench.batch))

    def one_pass() -> None:
        inputs = x.clone().requires_grad_(True)
        scorer(inputs, target).sum().backward()

    rate = throughput(bench, f"ig{steps}", integrated, clips, repeats=3)
    bench.put(f"ig{steps}_in_passes", (clips / rate) / seconds(bench, one_pass), "fwd+bwd passes of the clips")


def compile_forward(bench: Bench) -> None:
    """torch.compile of the audio tower (bf16, batch 64): compile seconds and steady clips/s against eager."""
    if not bench.cuda:
        print("  compile skipped: CUDA only (inductor on this CPU would take minutes)", flush=True)
        return
    model, _ = build_model(bench)
    x = on_device(bench, log_mels(bench.batch, seed=9))
    compiled = torch.compile(model.audio_model)

    def run(tower) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), bench.autocast():
                tower(input_features=x)

        return go

    started = time.perf_counter()
    run(compiled)()
    bench.sync()
    bench.put("compile_first_call_seconds", time.perf_counter() - started, "s")
    eager = throughput(bench, "compile_off_forward_b64", run(model.audio_model), bench.batch)
    fast = throughput(bench, "compile_on_forward_b64", run(compiled), bench.batch)
    bench.put("compile_speedup", fast / eager, "×")


# ----------------------------------------------------------------- the study at ESC-50 scale


class EpochClock:
    """A training logger (as `RunTracker` to `train_residual_fold`) that notes when each epoch ended."""

    def __init__(self):
        self.stamps: list[float] = []

    def log(self, _record: dict) -> None:
        self.stamps.append(time.perf_counter())

    def log_lambdas(self, *_args, **_kwargs) -> None:
        pass


# (name, TrainConfig fields) in the order they are measured: the costliest and Table 1's first.
CONFIGS = (
    ("all-head", {"stages": (0, 1, 2, 3), "granularity": "head"}),
    ("stage3-head", {"stages": (3,), "granularity": "head"}),
    ("stage0-head", {"stages": (0,), "granularity": "head"}),
    ("all-layer", {"stages": (0, 1, 2, 3), "granularity": "layer"}),
    ("stage3-layer", {"stages": (3,), "granularity": "layer"}),
    ("stage0-layer", {"stages": (0,), "granularity": "layer"}),
    ("paper-all-head", {"preset": "paper", "stages": (0, 1, 2, 3), "granularity": "head"}),
)
TABLE1_CONFIG = "stage3-head"  # the configuration the end-to-end run trains on five folds
STAGE_NAMES = {(0,): "stage0", (3,): "stage3", (0, 1, 2, 3): "all"}


def experiment(bench: Bench) -> None:
    """`audio-residual experiment` end to end at ESC-50 scale, then per-epoch costs of the default grid's
    configurations on fold 1, then the five-fold Table 1 and the default sweep extrapolated from them."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = bench.inputs or work / "inputs"
        if bench.inputs is None:
            prepare(inputs, bench.small)
        ready = inputs / "ready.json"
        while not ready.is_file():  # gpu_check.sh prepares them in the background while the GPU runs the tests
            if bench.left() < 60:
                raise RuntimeError(f"{inputs} is still not ready (see prepare.log)")
            time.sleep(1)
        made = json.loads(ready.read_text())
        bench.put("e2e_generate_seconds", made["seconds"], f"s ({made['clips']} clips of {made['length']:g} s; "
                                                          "outside the end-to-end time)")
        data, model = inputs / "esc50", inputs / "model"
        _run_experiment(bench, work, data, model)
        costs = _config_costs(bench, work, data, model)
    _extrapolate(bench, costs)


def prepare(folder: Path, small: bool) -> None:
    """2000 generated 5 s clips of 50 classes (ESC-50's shape) and the random model saved as a local folder,
    then folder/ready.json (the sign the experiment waits for)."""
    from audio_residual.clap.tiny import build_htsat_tiny_random, build_tiny_clap
    from audio_residual.data_processing import load_esc50, make_synthetic_esc50

    classes, per_class, length = (3, 5, 1.0) if small else (50, 40, 5.0)
    started = time.perf_counter()
    data = make_synthetic_esc50(folder / "esc50", n_classes=classes, clips_per_class=per_class, seconds=length)
    seconds = time.perf_counter() - started
    model, processor = (build_tiny_clap if small else build_htsat_tiny_random)(load_esc50(data).class_names)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    ready = {"seconds": seconds, "clips": classes * per_class, "length": length}
    (folder / "ready.tmp").write_text(json.dumps(ready))
    (folder / "ready.tmp").rename(folder / "ready.json")


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}


def _run_experiment(bench: Bench, work: Path, data: Path, model: Path) -> None:
    """The CLI run: zero-shot, linear probe and ResiDual (head λ on stage 3, `--e2e-epochs`) on five folds."""
    import pandas as pd

    grid = {"preset": ["default"], "lr": [0.01], "epochs": [bench.figures.get("e2e_epochs", 1)], "stages": [[3]],
            "granularity": ["head"], "fold": [1, 2] if bench.small else [1, 2, 3, 4, 5]}  # the rehearsal: 2 folds
    (work / "grid.json").write_text(json.dumps(grid))
    out = work / "out"
    command = [sys.executable, "-m", "audio_residual", "experiment", "--data", str(data), "--model", str(model),
               "--out", str(out), "--cache", str(work / "cache"), "--grid", str(work / "grid.json"),
               "--wandb", "disabled", "--workers", str(min(16, os.cpu_count() or 1)), "--batch-size", str(bench.batch),
               "--methods", "zeroshot,linear_probe,residual", "--ablation-max-clips", "2" if bench.small else "32",
               "--device", str(bench.device)]
    bench.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(bench.out / "experiment.log", "w") as log:
        subprocess.run(command, check=True, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                       timeout=max(30.0, bench.left() - 20))
    wall = time.perf_counter() - started
    bench.put("e2e_experiment_seconds", wall, "s (wall, features included)")
    for name in ("report.md", "results.csv", "sweep.csv"):
        if (out / name).is_file():
            (bench.out / f"experiment_{name}").write_bytes((out / name).read_bytes())
    steps = _report_timings((out / "report.md").read_text())
    for step, value in steps.items():
        bench.put(f"e2e_step_{step}_seconds", value, "s")
    bench.put("e2e_features_and_startup_seconds", wall - sum(steps.values()), "s")
    results = pd.read_csv(out / "results.csv")
    for method, rows in results.groupby("method"):
        bench.put(f"e2e_{method}_seconds", float(rows["seconds"].sum()), f"s over {len(rows)} folds")
    sweep = pd.read_csv(out / "sweep.csv")
    bench.put("e2e_residual_run_seconds", float(sweep["seconds"].mean()), f"s per run ({len(sweep)} runs)")


def _report_timings(report: str) -> dict[str, float]:
    """The study's step timings from its report's "## Time (s)" section ("analyze 1.2, sweep 3.4, ...")."""
    lines = report.splitlines()
    at = lines.index("## Time (s)")
    line = next(text for text in lines[at + 1 :] if text.strip())
    return {part.split()[0]: float(part.split()[1]) for part in line.split(", ")}


def _config_costs(bench: Bench, work: Path, data: Path, model: Path) -> dict[str, tuple[float, float]]:
    """(fixed seconds, seconds per epoch) of one run per configuration on fold 1, 2 epochs each, in a fresh
    output folder each (statistics fitted anew: an upper bound on a sweep's later runs), on the CLI's cache."""
    from audio_residual.clap.loading import ModelSource
    from audio_residual.training import TrainConfig, train_residual_fold
    from audio_residual.workspace import Workspace

    ws = Workspace.open(data, ModelSource(str(model), device=str(bench.device)), cache_dir=work / "cache")
    ws.batch_size = bench.batch
    split = ws.split(1, val_fraction=0.1)
    estimate = 5.0 if bench.small else 15.0
    costs = {}
    for name, fields in [c for c in CONFIGS if c[0] == TABLE1_CONFIG] if bench.small else CONFIGS:
        if bench.left() < estimate:
            print(f"  config {name} skipped: {bench.left():.0f} s left, it needs about {estimate:.0f}", flush=True)
            continue
        fields = dict(fields)
        preset = fields.pop("preset", None)
        options = {**fields, "epochs": 2}
        config = TrainConfig.preset(preset, **options) if preset else TrainConfig(**options, batch_size=bench.batch)
        clock = EpochClock()
        started = time.perf_counter()
        train_residual_fold(ws, split, config, out=work / "configs" / name, logger=clock)
        total = time.perf_counter() - started
        per_epoch = clock.stamps[-1] - clock.stamps[-2]
        costs[name] = (total - 2 * per_epoch, per_epoch)
        bench.put(f"config_{name}_epoch_seconds", per_epoch, f"s per epoch ({len(split.train)} clips)")
        bench.put(f"config_{name}_fixed_seconds", total - 2 * per_epoch, "s per run besides epochs")
    return costs


def _extrapolate(bench: Bench, costs: dict[str, tuple[float, float]]) -> None:
    """Table 1 (zero-shot, linear probe, ResiDual at one configuration, 30 epochs, five folds) and the default
    sweep (training.grid.DEFAULT_GRID: 120 default runs and 30 paper runs, paper runs at their 30 epochs with no
    early stop: an upper bound) from the measured per-run costs."""
    from audio_residual.training.grid import DEFAULT_GRID, grid_points
    from audio_residual.training.trainer import PRESETS

    fixed = bench.figures.get("e2e_features_and_startup_seconds", 0.0)
    baselines = sum(bench.figures.get(f"e2e_{m}_seconds", 0.0) for m in ("zeroshot", "linear_probe"))
    for label, name in (("table1", TABLE1_CONFIG), ("table1_all_stages_head", "all-head")):
        if name in costs:
            setup, epoch = costs[name]
            bench.put(f"{label}_seconds", fixed + baselines + 5 * (setup + 30 * epoch), f"s (ResiDual {name}, extrapolated)")
    points, missing = grid_points(DEFAULT_GRID), set()
    total = 0.0
    for point in points:
        name = f"{STAGE_NAMES[tuple(point['stages'])]}-{point['granularity']}"
        paper = point.get("preset") == "paper"
        cost = costs.get(f"paper-{name}") if paper else None
        cost = cost or costs.get(name)
        if cost is None:
            missing.add(name)
            continue
        epochs = PRESETS["paper"]["epochs"] if paper else point["epochs"]
        total += cost[0] + epochs * cost[1]
    if missing:
        print(f"  default sweep not extrapolated: no measured run of {sorted(missing)}", flush=True)
        return
    bench.put("default_sweep_seconds", total, f"s ({len(points)} runs, extrapolated)")
    study = fixed + total + baselines + bench.figures.get("e2e_step_analysis_seconds", 0.0)
    bench.put("default_study_partial_seconds", study,
              "s (features, analysis, sweep, zero-shot, linear probe; the other default methods not measured)")


# ----------------------------------------------------------------- running


MEASURES: dict[str, tuple[Callable[[Bench], None], float]] = {  # name → (measure, GPU seconds it may need)
    "precision": (precision, 10),
    "forward": (forward, 20),
    "loading": (loading, 20),
    "residual_step": (residual_step, 20),
    "stats_pass": (stats_pass, 10),
    "pretrain_step": (pretrain_step, 20),
    "retrieval_scoring": (retrieval_scoring, 15),
    "ig": (ig, 15),
    "compile": (compile_forward, 60),
    "experiment": (experiment, 120),
}
DEFAULT = [name for name in MEASURES if name != "experiment"]  # `experiment` runs as its own call


def machine(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0], "device": str(device)}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    return info


def save(bench: Bench, info: dict, done: dict[str, str]) -> None:
    """Merge this call's figures into OUT/gpu_bench.json and redraw OUT/gpu_bench.png."""
    path = bench.out / "gpu_bench.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"figures": {}, "units": {}, "measures": {}}
    saved["figures"].update(bench.figures)
    saved["units"].update(bench.units)
    saved["measures"].update(done)
    saved["machine"] = info
    saved["targets"] = {k: list(v) for k, v in TARGETS.items()}
    path.write_text(json.dumps(saved, indent=1, sort_keys=True))
    draw(saved, bench.out / "gpu_bench.png")


def draw(saved: dict, path: Path) -> None:
    """Throughputs against the forward target; extrapolated study times against theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = saved["figures"]
    rates = {k.removesuffix("_clips_per_s"): v for k, v in figures.items() if k.endswith("_clips_per_s")}
    times = {k.removesuffix("_seconds"): figures[k] for k in TARGETS if k.endswith("_seconds") and k in figures}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(3.0, 0.3 * len(rates) + 1)),
                                      gridspec_kw={"width_ratios": [3, 1]})
    left.barh(list(rates), list(rates.values()), color="tab:blue")
    left.axvline(TARGETS["forward_bf16_b64_clips_per_s"][1], color="tab:red", ls="--", label="forward target")
    left.set_xscale("log")
    left.set_xlabel("clips/s (log scale)")
    left.invert_yaxis()
    left.legend(loc="lower right")
    right.bar(list(times), [v / 60 for v in times.values()], color="tab:green")
    for i, key in enumerate(times):
        right.plot([i - 0.4, i + 0.4], [TARGETS[f"{key}_seconds"][1] / 60] * 2, color="tab:red", ls="--")
    right.set_ylabel("minutes (extrapolated; red: target)")
    if not times:
        right.text(0.5, 0.5, "no extrapolation yet", ha="center", transform=right.transAxes)
    gpu = saved["machine"].get("gpu", saved["machine"]["device"])
    fig.suptitle(f"Audio-ResiDual on {gpu} (torch {saved['machine']['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(saved: dict) -> str:
    """`name value unit [target]` lines of every figure."""
    lines = []
    for name, value in sorted(saved["figures"].items()):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        target = TARGETS.get(name)
        verdict = ""
        if target is not None and isinstance(value, (int, float)):
            met = value >= target[1] if target[0] == ">=" else value <= target[1]
            verdict = f"  [target {target[0]} {target[1]:g}: {'met' if met else 'MISSED'}]"
        lines.append(f"{name} {shown} {saved['units'].get(name, '')}{verdict}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"measures, of {list(MEASURES)} (default: all but experiment)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds this call may take")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes: the CPU rehearsal (default without CUDA)")
    parser.add_argument("--e2e-epochs", type=int, default=5, help="epochs of the end-to-end run's ResiDual")
    parser.add_argument("--table", action="store_true", help="print OUT/gpu_bench.json's figures and stop")
    parser.add_argument("--prepare", action="store_true", help="write the end-to-end run's data and model into "
                        "--inputs and stop (gpu_check.sh runs it in the background)")
    parser.add_argument("--inputs", type=Path, help="the prepared data and model of `experiment`")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads((args.out / "gpu_bench.json").read_text())))
        return 0
    if args.prepare:
        prepare(args.inputs, args.small or not torch.cuda.is_available())
        return 0
    unknown = [n for n in args.names if n not in MEASURES]
    if unknown:
        parser.error(f"unknown measure(s) {unknown}; choose from {list(MEASURES)}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    small = args.small or device.type != "cuda"
    bench = Bench(device, small, time.perf_counter() + args.budget, args.out, args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine(device)
    print(f"gpu_bench on {info.get('gpu', device)}{' (small: a rehearsal, figures mean nothing)' if small else ''}",
          flush=True)
    if "experiment" in (args.names or DEFAULT):
        bench.put("e2e_epochs", 1 if small else args.e2e_epochs, "epochs")
    done = {}
    for name in args.names or DEFAULT:
        measure, estimate = MEASURES[name]
        if not small and bench.left() < estimate:
            done[name] = f"skipped: {bench.left():.0f} s left, it needs about {estimate:.0f}"
            print(f"{name}: {done[name]}", flush=True)
            continue
        print(f"{name}:", flush=True)
        started = time.perf_counter()
        try:
            measure(bench)
            done[name] = f"done in {time.perf_counter() - started:.1f} s"
        except Exception as error:  # noqa: BLE001 — one broken measure must not cost the others their figures
            traceback.print_exc()
            done[name] = f"error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{name}: {done[name]}", flush=True)
        if bench.cuda:
            torch.cuda.empty_cache()
        save(bench, info, done)
    saved = json.loads((args.out / "gpu_bench.json").read_text())
    print("\n" + table(saved), flush=True)
    return 1 if any(v.startswith("error") for v in done.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
