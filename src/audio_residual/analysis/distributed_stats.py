"""The statistics pass of one fold sharded over processes or GPUs with `torch.distributed`, and its torchrun CLI.

Launched by `torchrun`, one process per GPU (or CPU process, gloo), on one or several machines:

    torchrun --nproc_per_node 8 -m audio_residual.analysis.distributed_stats --data esc50 \\
        --model laion/clap-htsat-unfused --fold 1 --out runs/esc50/stats

The features are extracted first by every rank (`ShardedFeatureCache`). Statistics: each rank runs every
world_size-th batch of the fold's training clips and the float64 sums are all-reduced
(`ResidualStatistics.fit(distributed=True)`), so the moments equal the single-process ones to rounding.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from audio_residual.data_processing.recipes import RECIPES
from audio_residual.data_processing.sharded_features import ShardedFeatureCache
from audio_residual.layout import CacheLayout


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

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (world, f"tcp://127.0.0.1:{port}", str(model), list(class_names), str(features), list(indices), batch_size, str(out))
    torch.multiprocessing.spawn(_fit_rank, args=args, nprocs=world)
    return ResidualStatistics.load(out)


def main(argv: list[str] | None = None) -> None:
    """torchrun entry: sharded feature extraction, then the sharded statistics pass of one fold's training clips."""
    from audio_residual.analysis.stats import ResidualStatistics
    from audio_residual.clap.loading import load_clap
    from audio_residual.workspace import Workspace, resolve_dataset

    parser = argparse.ArgumentParser(prog="python -m audio_residual.analysis.distributed_stats", description=main.__doc__)
    parser.add_argument("--data", required=True, help="dataset folder or 'esc50'")
    parser.add_argument("--model", default="laion/clap-htsat-unfused",
                        help="hub id, local folder, 'tiny' or a LAION .pt (convert it once beforehand, e.g. by zeroshot)")
    parser.add_argument("--text-config", type=Path, default=None, help="RoBERTa-base folder for a LAION .pt offline")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0], help="audio path (see the main CLI)")
    parser.add_argument("--fold", type=int, default=1, help="statistics of this fold's training clips")
    parser.add_argument("--out", type=Path, required=True, help="folder for stats_fold{K}.safetensors")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder (shared)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="feature-extraction processes per rank")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        table = resolve_dataset(args.data)
        bundle = load_clap(args.model, device="cuda" if cuda else "cpu", amp=args.amp, class_names=table.class_names,
                           text_config=args.text_config, cache_dir=CacheLayout.of(args.cache).converted_models)
        cache = ShardedFeatureCache(args.cache, bundle.feature_extractor, recipe=args.recipe)
        ws = Workspace(table, bundle, cache.compute(table, workers=args.workers))
        split = ws.split(args.fold)
        stats = ResidualStatistics.fit(
            bundle.model, ws.features.input_features, split.train, batch_size=args.batch_size,
            autocast=bundle.autocast, device=bundle.device, is_longer=ws.features.is_longer, distributed=True,
            metadata={"model_id": bundle.model_id, "dataset": table.name, "fold": args.fold, "fit_on": "train",
                      "processes": dist.get_world_size()},
        )
        if dist.get_rank() == 0:
            path = stats.save(args.out / f"stats_fold{args.fold}.safetensors")
            print(f"statistics of fold {args.fold} ({len(split.train)} clips, {dist.get_world_size()} processes) → {path}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
