"""The statistics pass and feature extraction sharded over processes or GPUs with `torch.distributed`.

Launched by `torchrun`, one process per GPU (or CPU process, gloo), on one or several machines:

    torchrun --nproc_per_node 8 -m audio_residual.analysis.distributed --data esc50 \\
        --model laion/clap-htsat-unfused --fold 1 --out runs/esc50/stats

Feature extraction: rank 0 owns the cache (index, file) and hands every rank a strided share of the clips
still to compute; results come back to rank 0, which writes them in order, so the cache is the one a single
process writes (the cache folder must be shared by the machines, or each extracts its own). Statistics: each
rank runs every world_size-th batch of the fold's training clips and the float64 sums are all-reduced
(`ResidualStatistics.fit(distributed=True)`), so the moments equal the single-process ones to rounding.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from audio_residual.data_processing import CachedFeatures, ClipTable, FeatureCache
from audio_residual.data_processing.recipes import RECIPES


class ShardedFeatureCache(FeatureCache):
    """A `FeatureCache` whose clips are extracted by every rank of the default process group.

    Every rank calls `compute` with the same table; rank 0 reads and writes the cache, the others extract
    their share and then read the finished cache.
    """

    def compute(self, table: ClipTable, on_bad_file: str = "error", workers: int = 1) -> CachedFeatures:
        if dist.get_rank() != 0:
            while (filenames := _broadcast(None)) is not None:
                _gather(self._share(table.audio_dir, filenames, workers))
            failure = _broadcast(None)
            if failure is not None:
                raise RuntimeError(f"rank 0 stopped the feature pass: {failure}")
            return super().compute(table, on_bad_file, workers)  # reads what rank 0 wrote
        failure = None
        try:
            return super().compute(table, on_bad_file, workers)
        except Exception as err:
            failure = str(err)
            raise
        finally:
            _broadcast(None)  # releases the other ranks, also when a bad file stops the run
            _broadcast(failure)

    def _share(self, audio_dir: Path, filenames: list[str], workers: int) -> list[tuple]:
        """This rank's strided share of the clips: items rank, rank + world, ..."""
        return list(super()._clips(audio_dir, filenames[dist.get_rank() :: dist.get_world_size()], workers))

    def _clips(self, audio_dir: Path, filenames: list[str], workers: int) -> Iterator[tuple]:
        if dist.get_rank() != 0:  # only rank 0 farms clips out
            yield from super()._clips(audio_dir, filenames, workers)
            return
        _broadcast(filenames)
        shares = _gather(self._share(audio_dir, filenames, workers))
        world = len(shares)
        yield from (shares[i % world][i // world] for i in range(len(filenames)))


def _broadcast(value):
    """Rank 0's value on every rank (a list of filenames, or None for "done")."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(share: list) -> list[list] | None:
    """Every rank's share on rank 0 (None elsewhere)."""
    shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(share, shares, dst=0)
    return shares


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

    parser = argparse.ArgumentParser(prog="python -m audio_residual.analysis.distributed", description=main.__doc__)
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
                           text_config=args.text_config, cache_dir=args.cache / "models")
        cache = ShardedFeatureCache(args.cache / "features", bundle.feature_extractor, recipe=args.recipe)
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
