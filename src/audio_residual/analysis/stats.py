"""Streaming first and second moments of every residual unit, and exact PCA bases derived from them.

One pass over the training clips accumulates, per Swin block, the mean and covariance (float64) of
  * the concatenated head contexts z (heads·d_head = d): each head's block of it gives that head's
    contribution statistics, since contribution_h = W_O,h z_h (rank ≤ d_head: PCA in head space is cheap);
  * the attention output W_O z + b_O, whose moments follow exactly from those of z;
  * the MLP output.
Memory is a few d×d matrices per block, whatever the number of clips. Units are then pooled per layer
(stage) when asked: moments of a mixture, weighted by token counts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from audio_residual.clap.batches import batches, model_inputs
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks, HookFn, HookPoint, NameFilter
from audio_residual.io import atomic_path
from audio_residual.names import Granularity, Unit, UnitKind, block_name, choose, parse_block


class StreamingMoments:
    """Mean and covariance of row vectors, accumulated batch by batch.

    Rows are centred on a fixed shift (the first batch's mean) before the float32 cross product, so the
    float64 running sums do not suffer from cancellation when the mean is large.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)

    def set_shift(self, rows: torch.Tensor) -> None:
        """Centre on these rows' mean: every process of a sharded pass takes it from the same first batch."""
        self.shift = rows.reshape(-1, rows.shape[-1]).float().mean(0).detach()

    def update(self, rows: torch.Tensor) -> None:
        if self.shift is None:
            self.set_shift(rows)
        rows = rows.reshape(-1, rows.shape[-1]).float()
        centred = rows - self.shift.to(rows.device)
        with torch.autocast(rows.device.type, enabled=False):  # the hooks fire inside a bf16/fp16 forward
            outer = centred.T @ centred
        self.sum += centred.sum(0).double().cpu()
        self.sum_outer += outer.double().cpu()
        self.count += rows.shape[0]

    def all_reduce(self, group=None) -> None:
        """Sum count and float64 sums over the processes of `group` (each must share the same shift)."""
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        parts = [self.sum, self.sum_outer, torch.tensor([float(self.count)], dtype=torch.float64)]
        reduced = []
        for part in parts:
            part = part.to(device)
            dist.all_reduce(part, group=group)
            reduced.append(part.cpu())
        self.sum, self.sum_outer, self.count = reduced[0], reduced[1], int(reduced[2].item())

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no rows were accumulated")
        centred_mean = self.sum / self.count
        cov = self.sum_outer / self.count - torch.outer(centred_mean, centred_mean)
        return centred_mean + self.shift.double().cpu(), (cov + cov.T) / 2


@dataclass
class Moments:
    """Mean, covariance and token count of one unit's vectors."""

    mean: torch.Tensor  # (d,) float64
    cov: torch.Tensor  # (d, d) float64
    count: int

    @staticmethod
    def pool(parts: Sequence[Moments]) -> Moments:
        """Moments of the union of the parts' tokens (law of total covariance)."""
        total = sum(p.count for p in parts)
        mean = sum(p.mean * p.count for p in parts) / total
        cov = sum((p.cov + torch.outer(p.mean - mean, p.mean - mean)) * p.count for p in parts) / total
        return Moments(mean, cov, total)


@dataclass
class PCABasis:
    """PCA of one unit in residual space: rows of `components` are eigenvectors, largest variance first."""

    name: str
    mean: torch.Tensor  # (d,)
    components: torch.Tensor  # (k, d), orthonormal rows
    eigenvalues: torch.Tensor  # (k,), descending
    total_variance: float  # trace of the covariance (all directions, kept or not)

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        return self.eigenvalues / self.total_variance

    def prune(self, k: int | None = None, evr: float | None = None) -> PCABasis:
        """Keep the first k components, or the fewest whose cumulative EVR reaches `evr`."""
        keep = len(self.eigenvalues)
        if evr is not None:
            cumulative = torch.cumsum(self.explained_variance_ratio, 0)
            keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor(evr, dtype=cumulative.dtype))) + 1)
        if k is not None:
            keep = min(keep, k)
        return PCABasis(self.name, self.mean, self.components[:keep], self.eigenvalues[:keep], self.total_variance)


FP32_EPS = float(torch.finfo(torch.float32).eps)


def resolvable(eigenvalues: torch.Tensor, dim: int, rel_tol: float | None = None) -> torch.Tensor:
    """Mask of the (descending) eigenvalues of a dim×dim covariance that float32 can tell from zero.

    `StreamingMoments` forms the cross products in float32, so every covariance entry carries a rounding
    error of order eps₃₂ times the largest variance λ_max. An error matrix E with entries that small has
    ‖E‖₂ ≤ dim · eps₃₂ · λ_max, and by Weyl's inequality a direction with no variance at all can show an
    eigenvalue up to ‖E‖₂. Eigenvalues at or below `rel_tol · λ_max` (default dim · eps₃₂, about 1e-4 for
    HTSAT's 768-wide stage 3) are therefore noise: keeping them would spend λ on directions the data do
    not have (a unit fitted on n tokens has rank ≤ n − 1 and now keeps at most that many components).
    """
    tol = dim * FP32_EPS if rel_tol is None else rel_tol
    return eigenvalues > tol * max(float(eigenvalues[0]), 1e-300)


def pca_from_moments(name: str, moments: Moments, rel_tol: float | None = None) -> PCABasis:
    """Exact PCA by eigendecomposition; directions float32 cannot resolve (see `resolvable`) are dropped."""
    values, vectors = torch.linalg.eigh(moments.cov)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = resolvable(values, len(values), rel_tol)
    return PCABasis(name, moments.mean, vectors[:, keep].T.contiguous(), values[keep], float(values.clamp(min=0).sum()))


class _MomentPass:
    """What one statistics pass shares with its hooks, kept in one place so `fit` reads as its steps.

    The hooks see batch·windows rows, so they need the clips in the current forward (`batch`) to regroup
    tokens per clip; the token sampler is reseeded per batch number, so a sharded pass draws the same
    tokens as one process; `priming` makes a forward only set the shifts (see `StreamingMoments`).
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor, torch.Tensor | None], object],
        tokens_per_clip: int | None,
        seed: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ):
        self.embed = embed
        self.tokens_per_clip = tokens_per_clip
        self.seed = seed
        self.autocast = autocast
        self.accumulators: dict[str, dict[str, StreamingMoments]] = {}
        self.generator = torch.Generator()
        self.batch = 0  # clips in the current forward pass: the hooks see batch·windows rows
        self.priming = False
        self.stats_hooks: list[tuple[NameFilter, HookFn]] = [
            ("*.attn.hook_z", self.accumulate("z")),
            ("*.hook_mlp_out", self.accumulate("mlp")),
        ]

    def take(self, tensor: torch.Tensor, width: int) -> torch.Tensor:
        """The clip's tokens, or `tokens_per_clip` of them drawn uniformly, to save time on big stages."""
        tokens = tensor.reshape(self.batch, -1, width)  # z arrives as (..., heads, d_head): concatenate heads
        if self.tokens_per_clip is None or self.tokens_per_clip >= tokens.shape[1]:
            return tokens
        pick = torch.randperm(tokens.shape[1], generator=self.generator)[: self.tokens_per_clip]
        return tokens[:, pick.to(tokens.device)]

    def accumulate(self, kind: str) -> HookFn:
        """A hook feeding one kind of vector (z or mlp) of every block it sees into that block's moments."""

        def hook(tensor: torch.Tensor, point: HookPoint) -> None:
            key = block_name(point.stage, point.block)
            moments = self.accumulators.setdefault(key, {})
            if kind not in moments:
                moments[kind] = StreamingMoments(point.width)
            if self.priming:
                moments[kind].set_shift(self.take(tensor, point.width))
            else:
                moments[kind].update(self.take(tensor, point.width))

        return hook

    def run(self, number: int, x: torch.Tensor, longer: torch.Tensor | None) -> None:
        """One forward of batch `number`, its token draws seeded by the number alone (not by the process)."""
        self.batch = len(x)
        self.generator.manual_seed(self.seed * 1_000_003 + number)
        with self.autocast():
            self.embed(x, longer)

    def collect(
        self,
        hooks: ClapHooks,
        input_features: np.ndarray,
        indices: np.ndarray,
        batch_size: int,
        device: torch.device | str,
        is_longer: np.ndarray | None,
        extra_hooks: Sequence[tuple[NameFilter, HookFn]],
        distributed: bool,
    ) -> None:
        """Run this process's batches through the hooks; with `distributed`, all-reduce the sums after."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        numbers = range(rank, -(-len(indices) // batch_size), world)
        # This process's batches back to back: only the overall last batch can be short, and it comes last.
        chunks = [indices[n * batch_size : (n + 1) * batch_size] for n in numbers]
        mine = np.concatenate(chunks or [indices[:0]])
        if rank != 0:
            with hooks.hooks(self.stats_hooks):  # the shifts come from batch 0, as in one process
                self.priming = True
                self.run(0, *model_inputs(input_features, indices[:batch_size], device, is_longer))
                self.priming = False
        with hooks.hooks([*self.stats_hooks, *extra_hooks]):
            steps = batches(input_features, mine, batch_size, device, is_longer, desc="PCA statistics")
            for number, (_, x, longer) in zip(numbers, steps, strict=True):
                self.run(number, x, longer)
        if distributed:
            for key in sorted(self.accumulators):
                for kind in sorted(self.accumulators[key]):
                    self.accumulators[key][kind].all_reduce()


def _block_moments(
    hooks: ClapHooks, accumulators: dict[str, dict[str, StreamingMoments]]
) -> tuple[dict[str, dict[str, Moments]], dict[str, torch.Tensor], dict[str, int]]:
    """Per block: moments of z, of the attention output (exact, via W_O and b_O) and of the MLP output.

    Also W_O (float64, for the head-space route) and the head count of each block the pass reached.
    """
    blocks, w_out, heads = {}, {}, {}
    for s, b, layer in hooks.blocks():
        key = block_name(s, b)
        if key not in accumulators:  # a forward from a cached stage input skips the earlier stages
            continue
        z_mean, z_cov = accumulators[key]["z"].mean_cov()
        count = accumulators[key]["z"].count
        w = layer.attention.output.dense.weight.detach().double().cpu()
        bias = layer.attention.output.dense.bias.detach().double().cpu()
        mlp_mean, mlp_cov = accumulators[key]["mlp"].mean_cov()
        blocks[key] = {
            "z": Moments(z_mean, z_cov, count),
            "attn": Moments(w @ z_mean + bias, w @ z_cov @ w.T, count),
            "mlp": Moments(mlp_mean, mlp_cov, accumulators[key]["mlp"].count),
        }
        w_out[key] = w
        heads[key] = layer.attention.self.num_attention_heads
    return blocks, w_out, heads


class ResidualStatistics:
    """Per-block moments of head contexts, attention outputs and MLP outputs of one fitted index set."""

    def __init__(self, blocks: dict[str, dict[str, Moments]], w_out: dict[str, torch.Tensor], metadata: dict):
        self.blocks = blocks  # "layers.{s}.blocks.{b}" → {"z": ..., "attn": ..., "mlp": ...}
        self.w_out = w_out  # "layers.{s}.blocks.{b}" → W_O (d, d), float64, for head-space mapping
        self.metadata = metadata

    # ----------------------------------------------------------------- fitting
    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        model,
        input_features: np.ndarray,
        indices: Sequence[int] | np.ndarray,
        batch_size: int = 16,
        tokens_per_clip: int | None = None,
        seed: int = 0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        device: torch.device | str = "cpu",
        is_longer: np.ndarray | None = None,
        metadata: dict | None = None,
        extra_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
        forward: Callable[[torch.Tensor, torch.Tensor | None], object] | None = None,
        distributed: bool = False,
    ) -> ResidualStatistics:
        """One pass over `input_features[indices]` (the training folds only: the caller says which).

        `tokens_per_clip` subsamples that many tokens per clip and block (uniformly, seeded per batch) to
        save time on big stages; None uses every token. `extra_hooks` ride along in the same forward (the
        analysis fills its attention-pattern reservoir there). `forward(x, is_longer)` replaces the full
        forward on each batch of `input_features`, e.g. `StagePrefix.forward` on the cached stage inputs
        (`input_features=prefix.hidden`): only the blocks it runs get statistics. With `distributed`, in
        an initialised `torch.distributed` group, each process runs every world_size-th batch and the float64
        sums are all-reduced, so every process returns the single-process result.
        """
        indices = np.asarray(indices)
        if len(indices) == 0:
            raise ValueError("statistics need at least one clip: the index set is empty")
        hooks = ClapHooks(model)
        embed = forward if forward is not None else (lambda x, longer: audio_embeddings(model, x, longer))
        moment_pass = _MomentPass(embed, tokens_per_clip, seed, autocast)
        moment_pass.collect(
            hooks, input_features, indices, batch_size, device, is_longer, extra_hooks, distributed
        )
        blocks, w_out, heads = _block_moments(hooks, moment_pass.accumulators)
        meta = {
            "clips": int(len(indices)),
            "tokens_per_clip": tokens_per_clip,
            "tokens_seen": {key: parts["z"].count for key, parts in blocks.items()},
            "heads": heads,
            "dtype": "float64",
            **(metadata or {}),
        }
        return cls(blocks, w_out, meta)

    # ----------------------------------------------------------------- units
    def num_heads(self, block: str) -> int:
        return int(self.metadata["heads"][block])

    def head_dim(self, block: str) -> int:
        return self.w_out[block].shape[1] // self.num_heads(block)

    def head_moments(self, block: str, head: int) -> Moments:
        """Moments of head `head`'s contribution W_O,h z_h in residual space (rank ≤ d_head)."""
        z = self.blocks[block]["z"]
        cut = slice(head * self.head_dim(block), (head + 1) * self.head_dim(block))
        w = self.w_out[block][:, cut]
        return Moments(w @ z.mean[cut], w @ z.cov[cut, cut] @ w.T, z.count)

    def stages(self) -> list[int]:
        return sorted({parse_block(key)[0] for key in self.blocks})

    def blocks_of(self, stage: int) -> list[str]:
        return [key for key in self.blocks if parse_block(key)[0] == stage]

    def unit_moments(self, granularity: str, kind: str = "attn", stages: Sequence[int] | None = None) -> dict[str, Moments]:
        """Moments of every unit at a granularity: `layer` pools a stage's blocks, `head` splits attention."""
        granularity = choose(Granularity, granularity, "granularity")
        kind = choose(UnitKind, kind, "unit kind")
        stages = self.stages() if stages is None else list(stages)
        units: dict[str, Moments] = {}
        for stage in stages:
            if granularity == Granularity.LAYER:
                units[Unit(stage, kind=kind).name] = Moments.pool([self.blocks[k][kind] for k in self.blocks_of(stage)])
                continue
            for block in self.blocks_of(stage):
                _, b = parse_block(block)
                if granularity == Granularity.BLOCK:
                    units[Unit(stage, b, kind).name] = self.blocks[block][kind]
                elif kind == UnitKind.MLP:
                    raise ValueError("MLP units have no heads: use granularity 'block' or 'layer'")
                else:
                    for h in range(self.num_heads(block)):
                        units[Unit(stage, b, head=h).name] = self.head_moments(block, h)
        return units

    def head_pca(self, block: str, head: int) -> PCABasis:
        """PCA of a head's contribution via its d_head×d_head context covariance, mapped through W_O,h.

        With Σ_z = V D Vᵀ, the contribution covariance is (W V D^½)(W V D^½)ᵀ, so the SVD of the
        d×d_head matrix W V D^½ gives its eigenvectors (U) and eigenvalues (S²) without a d×d eigh.
        """
        z = self.blocks[block]["z"]
        cut = slice(head * self.head_dim(block), (head + 1) * self.head_dim(block))
        w = self.w_out[block][:, cut]
        values, vectors = torch.linalg.eigh(z.cov[cut, cut])
        u, singular, _ = torch.linalg.svd(w @ (vectors * values.clamp(min=0).sqrt()), full_matrices=False)
        eigenvalues = singular**2
        keep = resolvable(eigenvalues, len(values))  # the covariance accumulated in float32 is d_head wide
        name = Unit(*parse_block(block), head=head).name
        return PCABasis(name, w @ z.mean[cut], u[:, keep].T.contiguous(), eigenvalues[keep], float(eigenvalues.sum()))

    def pca(self, granularity: str, kind: str = "attn", stages: Sequence[int] | None = None) -> dict[str, PCABasis]:
        """Exact PCA of every unit at a granularity (`head` uses the cheap head-space route)."""
        if granularity == Granularity.HEAD and kind == UnitKind.ATTN:
            stages = self.stages() if stages is None else list(stages)
            return {
                basis.name: basis
                for stage in stages
                for block in self.blocks_of(stage)
                for basis in (self.head_pca(block, h) for h in range(self.num_heads(block)))
            }
        return {name: pca_from_moments(name, m) for name, m in self.unit_moments(granularity, kind, stages).items()}

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """safetensors with the moments, W_O per block and JSON metadata (model, dataset, fold, tokens…)."""
        tensors, counts = {}, {}
        for block, parts in self.blocks.items():
            for kind, m in parts.items():
                tensors[f"{block}.{kind}.mean"] = m.mean.contiguous()
                tensors[f"{block}.{kind}.cov"] = m.cov.contiguous()
                counts[f"{block}.{kind}"] = m.count
            tensors[f"{block}.w_out"] = self.w_out[block].contiguous()
        metadata = {"metadata": json.dumps(self.metadata), "counts": json.dumps(counts)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ResidualStatistics:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
        tensors = load_file(str(path))
        counts = json.loads(header["counts"])
        blocks: dict[str, dict[str, Moments]] = {}
        for unit, count in counts.items():
            block, kind = unit.rsplit(".", 1)
            blocks.setdefault(block, {})[kind] = Moments(tensors[f"{unit}.mean"], tensors[f"{unit}.cov"], count)
        w_out = {block: tensors[f"{block}.w_out"] for block in blocks}
        return cls(blocks, w_out, json.loads(header["metadata"]))
