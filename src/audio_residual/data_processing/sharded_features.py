"""The feature cache filled by every process of a `torch.distributed` group (torchrun, one per GPU or CPU).

Rank 0 owns the cache (index, file) and hands every rank a strided share of the clips still to compute;
results come back to rank 0, which writes them in order, so the cache is the one a single process writes (the
cache folder must be shared by the machines, or each extracts its own).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from audio_residual.data_processing.datasets import ClipTable
from audio_residual.data_processing.features import CachedFeatures, FeatureCache


class ShardedFeatureCache(FeatureCache):
    """A `FeatureCache` whose clips are extracted by every rank of the default process group.

    Every rank calls `compute` with the same table; rank 0 reads and writes the cache, the others extract
    their share and then read the finished cache.
    """

    def compute(self, table: ClipTable) -> CachedFeatures:
        if dist.get_rank() != 0:
            while (filenames := _broadcast(None)) is not None:
                _gather(self._share(table.audio_dir, filenames, self.audio.workers))
            failure = _broadcast(None)
            if failure is not None:
                raise RuntimeError(f"rank 0 stopped the feature pass: {failure}")
            return super().compute(table)  # reads what rank 0 wrote
        failure = None
        try:
            return super().compute(table)
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
