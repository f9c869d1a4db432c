"""Data-parallel training over a `torch.distributed` group (torchrun; NCCL on CUDA, gloo on CPU).

Every rank draws the same seeded batches and embeds its share of each; the shares are all-gathered with their
gradients, so every rank computes the loss of the global batch (the contrastive loss sees every rank's
negatives, as open_clip's `gather_features` with gather-with-grad). The backward of the gather sends each rank
the gradient of its own embeddings from every rank's copy of the loss (world × its share of the global batch's
gradient); the mean of the ranks' parameter gradients is then exactly the global batch's gradient, for the
embedding path and for the parameters the loss uses directly (CLAP's temperatures) alike.

The process group itself is `analysis.distributed_stats.process_group` (the statistics pass's). Collectives that
fail because a peer died or stopped answering raise `PeerLost`, a `ConnectionError`: one line on the command
line, never a hang (the group's timeout bounds every wait).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from audio_residual.analysis.distributed_stats import process_group

__all__ = ["PeerLost", "Ranks", "process_group"]


class PeerLost(ConnectionError):
    """A collective failed: another process of the job died, hung past the timeout, or the network broke."""


@contextlib.contextmanager
def collective(what: str, rank: int, world: int) -> Iterator[None]:
    """Turn a failed collective inside the block into `PeerLost`, naming the step and how to go on."""
    try:
        yield
    except RuntimeError as error:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
        text = str(error)
        if not (isinstance(error, dist.DistError) or any(k in text for k in ("gloo", "Connection", "timed out",
                                                                              "Timed out", "NCCL"))):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise PeerLost(f"rank {rank} of {world} lost the other processes during {what} ({first[:200]}): a process "
                       "died or stopped answering; the job stops. Rerun the same command: it resumes from the last "
                       "epoch's checkpoint") from None  # fmt: skip


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the sum over ranks of the gradient of its own rows (an all-reduce
    of the gathered gradient, then this rank's slice: the reduce-scatter gloo lacks)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group: its rank among `world` (rank 0 of 1 without a group)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, histories, models and W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def bounds(self, n: int) -> list[int]:
        """Where each rank's share of n items starts, and the end: contiguous shares as `np.array_split` cuts them."""
        return [0, *np.cumsum([len(part) for part in np.array_split(np.arange(n), self.world)]).tolist()]

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (the first n % world ranks take one more)."""
        edges = self.bounds(n)
        return slice(edges[self.rank], edges[self.rank + 1])

    def sizes(self, n: int) -> list[int]:
        """Every rank's share size of n items, in rank order (what `gather` takes)."""
        return np.diff(self.bounds(n)).tolist()

    def collective(self, what: str) -> contextlib.AbstractContextManager:
        """A block whose collectives may fail for a lost peer (`collective`); nothing to watch in one process."""
        return collective(what, self.rank, self.world) if self.distributed else contextlib.nullcontext()

    @staticmethod
    def device() -> torch.device:
        """Where the group's collectives take tensors: the current GPU for NCCL, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def gather(self, local: torch.Tensor, sizes: list[int], grad: bool = False) -> torch.Tensor:
        """Every rank's `local` rows (rank r holds sizes[r] of them), concatenated in rank order on every rank, on
        the group's device.

        With `grad`, differentiable: the backward brings each rank the gradient of its rows from every rank's
        loss. Shares of unequal size are padded for the collective.
        """
        if not self.distributed:
            return local
        local = local.to(self.device())
        width = max(sizes)
        padded = torch.cat([local, local.new_zeros((width - len(local), *local.shape[1:]))]) if len(local) < width else local
        with collective("the all-gather of embeddings", self.rank, self.world):
            if grad:
                parts = _GatherWithGrad.apply(padded, self.rank, self.world).unbind(0)
            else:
                parts = [torch.empty_like(padded) for _ in range(self.world)]
                dist.all_gather(parts, padded.detach().contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def average_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """The mean over ranks of every parameter's gradient, in one all-reduce.

        A parameter without a gradient on some rank counts zero there; one without a gradient on every rank keeps
        none (AdamW then leaves it alone, as a single process would).
        """
        if not self.distributed:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        device, dtype = params[0].device, torch.float32
        for p in params:  # summed in float32, or float64 for a model trained in float64
            dtype = torch.promote_types(dtype, p.dtype)
        flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(dtype) for p in params]
                         + [flags])  # fmt: skip
        with collective("the gradient all-reduce", self.rank, self.world):
            dist.all_reduce(flat)
        offset = 0
        for p, some in zip(params, flat[-len(params):].tolist(), strict=True):
            grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype) / self.world
            offset += p.numel()
            if some:
                p.grad = grad

    def sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """`tensor` summed over the ranks (in place), on every rank."""
        if self.distributed:
            with collective(what, self.rank, self.world):
                dist.all_reduce(tensor)
        return tensor

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor], what: str = "the start") -> None:
        """Rank 0's values of `tensors` (parameters, buffers) on every rank, in place: the replicas start alike.
        One broadcast per dtype, of the tensors of that dtype flattened."""
        if not self.distributed:
            return
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                groups.setdefault(t.dtype, []).append(t)
        with torch.no_grad(), collective(what, self.rank, self.world):
            for group in groups.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self.device())
                dist.broadcast(flat, src=0)
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def broadcast_json(self, value, what: str):
        """Rank 0's JSON-able `value` on every rank (validation figures, a refusal): sent as UTF-8 bytes, no pickle."""
        if not self.distributed:
            return value
        device = self.device()
        data = json.dumps(value).encode() if self.main else b""
        with collective(what, self.rank, self.world):
            size = torch.tensor([len(data)], dtype=torch.int64, device=device)
            dist.broadcast(size, src=0)
            buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if self.main
                      else torch.empty(int(size), dtype=torch.uint8, device=device))  # fmt: skip
            dist.broadcast(buffer, src=0)
        return value if self.main else json.loads(buffer.cpu().numpy().tobytes().decode())

    def barrier(self, what: str) -> None:
        if self.distributed:
            with collective(what, self.rank, self.world):
                dist.barrier()
