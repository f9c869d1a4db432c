"""The statistics pass of one fold sharded over processes or GPUs with `torch.distributed` (`audio-residual stats`).

Launched by `torchrun`, one process per GPU (or CPU process, gloo), on one or several machines:

    torchrun --nproc_per_node 8 -m audio_residual stats --data esc50 \\
        --model laion/clap-htsat-unfused --fold 1 --out runs/esc50/stats

The features are extracted first by every rank (`ShardedFeatureCache`). Statistics: each rank runs every
world_size-th batch of the fold's training clips and the float64 sums are all-reduced
(`ResidualStatistics.fit(distributed=True)`), so the moments equal the single-process ones to rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from audio_residual.data_processing.sharded_features import ShardedFeatureCache
from audio_residual.layout import CacheLayout


def local_rank() -> int:
    """This process's GPU on its machine under torchrun (0 alone)."""
    return int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def process_group(cuda: bool, timeout: timedelta | None = None) -> Iterator[None]:
    """torchrun's process group for the duration (NCCL on CUDA, gloo on CPU), or a group of this one process when
    run alone; a group that already exists (processes a test or benchmark spawned) is used as it is and left alone.

    `timeout` bounds every collective: a rank that waits that long for the others (one died, or hangs) fails
    instead of blocking the job (torch's default is 30 minutes for gloo, 10 for NCCL).
    """
    if cuda:
        torch.cuda.set_device(local_rank())
    started = not dist.is_initialized()
    backend = "nccl" if cuda else "gloo"
    bounds = {} if timeout is None else {"timeout": timeout}
    if started and "RANK" in os.environ:  # under torchrun: its rendezvous
        dist.init_process_group(backend, **bounds)
    elif started:  # alone: a group of one process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **bounds)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def loopback_address() -> str:
    """A free TCP address on this machine for a group of processes spawned here (tests, benchmarks)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def _fit_rank(rank: int, world: int, init_method: str, model: str, class_names, features: str, indices, batch_size: int,
              out: str) -> None:
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.loading import load_clap

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        bundle = load_clap(model, device="cpu", amp="none", class_names=tuple(class_names))
        stats = ResidualStatistics.fit(bundle.model, np.load(features, mmap_mode="r"), indices, batch_size,
                                       distributed=True)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def fit_on_cpu_processes(model: str, class_names, features: Path, indices, batch_size: int, out: Path, world: int = 2):
    """Statistics fitted by `world` gloo processes on this machine (loopback TCP), saved to `out` and loaded.

    How the tests and the benchmark check the all-reduce against a single-process fit.
    """
    from audio_residual.analysis.stats import ResidualStatistics

    args = (world, loopback_address(), str(model), list(class_names), str(features), list(indices), batch_size, str(out))
    torch.multiprocessing.spawn(_fit_rank, args=args, nprocs=world)
    return ResidualStatistics.load(out)


def sharded_statistics(data, fold: int, out: Path, model, audio, cache_dir: Path, batch_size: int = 32) -> Path | None:
    """`audio-residual stats` under torchrun (or alone): the feature cache filled by every process (rank 0 writes
    it), then the statistics pass over fold `fold`'s training clips, sharded; rank 0 writes and returns the file."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.data_processing.sources import load_table
    from audio_residual.workspace import Workspace, tokenizer_words

    cuda = torch.cuda.is_available() if model.device == "auto" else str(model.device).startswith("cuda")
    with process_group(cuda):
        table = load_table(data)
        device = f"cuda:{local_rank()}" if cuda else "cpu"
        bundle = dataclasses.replace(model, device=device).load(tokenizer_words(table),
                                                                CacheLayout.of(cache_dir).converted_models)
        ShardedFeatureCache(cache_dir, bundle.feature_extractor, audio).compute(table)  # every rank extracts a share
        ws = Workspace.of(table, bundle, audio, cache_dir)  # reads the finished cache
        split = ws.split(fold)
        stats = ResidualStatistics.fit(
            bundle.model, ws.features.input_features, split.train, batch_size=batch_size,
            autocast=bundle.autocast, device=bundle.device, is_longer=ws.features.is_longer, distributed=True,
            metadata={"model_id": bundle.model_id, "dataset": table.name, "fold": fold, "fit_on": "train",
                      "processes": dist.get_world_size(), "provenance": ws.provenance()},
        )
        if dist.get_rank() == 0:
            return stats.save(Path(out) / f"stats_fold{fold}.safetensors")
        return None
