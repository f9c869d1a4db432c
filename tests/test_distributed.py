"""Two gloo processes on the CPU give the single-process statistics and feature cache; `audio-residual stats` under
torchrun (one process) or alone writes the fold's statistics from the shared cache."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import ClapFeatureExtractor

from audio_residual.analysis.distributed_stats import fit_on_cpu_processes
from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.cli import main
from audio_residual.data_processing import FeatureCache, load_esc50, make_synthetic_esc50
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.data_processing.sharded_features import ShardedFeatureCache

CLASSES = ("dog", "rain", "sea_waves")


def test_two_processes_give_the_single_process_moments(tiny_bundle, tmp_path):
    """The merge is float64, but the activations are float32 forwards that round differently on another thread
    count (the spawned processes keep torch's default, the test process may run on one): equal to float32's
    resolution of the moments' scale (a lost or doubled batch moves them by orders of magnitude more)."""
    features = np.random.default_rng(0).standard_normal((7, 1, 1001, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", features)
    rows = np.array([6, 0, 2, 5, 1, 3])  # 3 batches of 2: rank 0 runs two, rank 1 one (after priming on batch 0)
    shared = fit_on_cpu_processes("tiny-random", CLASSES, tmp_path / "x.npy", rows, 2, tmp_path / "stats.safetensors")
    single = ResidualStatistics.fit(tiny_bundle.model, features, rows, batch_size=2)
    assert shared.blocks.keys() == single.blocks.keys()
    for block, parts in single.blocks.items():
        for kind, moments in parts.items():
            assert shared.blocks[block][kind].count == moments.count
            for stat in ("mean", "cov"):
                ours, theirs = getattr(shared.blocks[block][kind], stat), getattr(moments, stat)
                scale = max(float(theirs.abs().max()), 1e-3)
                assert float((ours - theirs).abs().max()) <= 1e-6 * scale, (block, kind, stat)


def _features_rank(rank: int, world: int, init_method: str, root: str, cache_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        extractor = ClapFeatureExtractor(max_length_s=2, truncation="fusion")
        cached = ShardedFeatureCache(cache_dir, extractor, AudioConfig(on_bad_file="skip")).compute(load_esc50(root))
        assert cached.valid.sum() == len(cached.valid) - 1
    finally:
        dist.destroy_process_group()


@pytest.fixture
def table_root(tmp_path):
    root = make_synthetic_esc50(tmp_path / "esc", n_classes=2, clips_per_class=3, seed=2)
    table = load_esc50(root)
    (table.audio_dir / table.filenames[4]).write_bytes(b"broken")
    return root


def test_sharded_feature_pass_writes_the_single_process_cache(table_root, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = (2, f"tcp://127.0.0.1:{port}", str(table_root), str(tmp_path / "two"))
    torch.multiprocessing.spawn(_features_rank, args=args, nprocs=2)
    table = load_esc50(table_root)
    single = FeatureCache(tmp_path / "one", ClapFeatureExtractor(max_length_s=2, truncation="fusion"),
                          AudioConfig(on_bad_file="skip"))
    single.compute(table)
    sharded = ShardedFeatureCache(tmp_path / "two", ClapFeatureExtractor(max_length_s=2, truncation="fusion"))
    one, two = single.store(table), sharded.store(table)
    assert one.features.read_bytes() == two.features.read_bytes()
    assert json.loads(one.index.read_text()) == json.loads(two.index.read_text())


def test_stats_command_shares_the_cache_and_writes_the_fold_statistics(tmp_path, monkeypatch):
    """`torchrun -m audio_residual stats` as one process: the features land in the cache folder a `Workspace`
    reads (no recomputation there) and the moments equal a single-process fit; `audio-residual stats` alone,
    without torchrun, writes the same statistics."""
    from audio_residual.clap.loading import ModelSource
    from audio_residual.workspace import Workspace

    root = make_synthetic_esc50(tmp_path / "esc", n_classes=2, clips_per_class=5, seconds=2.0, seed=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                "LOCAL_RANK": "0"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    argv = ["stats", "--data", str(root), "--model", "tiny-random", "--fold", "2", "--cache", str(tmp_path / "cache"),
            "--amp", "none", "--batch-size", "4"]
    assert main([*argv, "--out", str(tmp_path / "stats")]) == 0
    assert not dist.is_initialized()  # the group it started is gone
    monkeypatch.setattr(FeatureCache, "_clips", lambda *a: pytest.fail("the torchrun pass left features to compute"))
    ws = Workspace.open(root, ModelSource("tiny-random", device="cpu", amp="none"), cache_dir=tmp_path / "cache")
    shared = ResidualStatistics.load(tmp_path / "stats" / "stats_fold2.safetensors")
    assert shared.metadata["processes"] == 1 and shared.metadata["fold"] == 2
    assert shared.metadata["provenance"] == ws.provenance()
    train = ws.split(2).train
    single = ResidualStatistics.fit(ws.bundle.model, ws.features.input_features, train, batch_size=4)
    for block, parts in single.blocks.items():
        for kind, moments in parts.items():
            assert shared.blocks[block][kind].count == moments.count
            assert float((shared.blocks[block][kind].mean - moments.mean).abs().max()) <= 1e-10

    for name in torchrun:  # alone: no torchrun rendezvous in the environment
        monkeypatch.delenv(name)
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    alone = ResidualStatistics.load(tmp_path / "alone" / "stats_fold2.safetensors")
    assert alone.metadata["processes"] == 1
    for block, parts in shared.blocks.items():
        for kind, moments in parts.items():
            assert torch.equal(alone.blocks[block][kind].cov, moments.cov)
