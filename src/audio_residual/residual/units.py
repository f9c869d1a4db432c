"""ResiDual: learnable gains on the principal components of residual-stream units.

For a unit u with PCA mean μ and basis Φ (k orthonormal rows), RD(u) = u + Φᵀ diag(λ − 1) Φ (u − μ).
At λ = 1 this is exactly the identity, so training starts at the zero-shot model. Units:

* `head` (the paper's choice): each attention head's contribution W_O,h z_h. Because Φ_h lies in the
  column space of W_O,h, the edit is applied in head space on z_h (d_head wide, cheap):
  z_h ← z_h + B_h diag(λ − 1) A_h (z_h − m_h), with A_h = Φ_h W_O,h and B_h = W_O,h⁺ Φ_hᵀ.
* `block`: a block's whole attention (or MLP) output.
* `layer` (the earlier student project's choice): one basis and one λ per stage, shared by its blocks.

`coarse=True` learns one scalar per unit instead of one per component.

Variants (the paper's adapter, Flegyas/ResiDual, makes the other choice on each; c is the point the gains
scale around: μ, or 0 for a coarse unit with `coarse_center="zero"`):
  RD(u) = c + Φᵀ diag(λ) Φ (u − c) + [tail keep] (I − ΦᵀΦ)(u − c) − [center drop] μ
* `tail`: "keep" leaves the directions outside Φ as they are; "zero" removes them (paper: pruned
  components get gain `component_padding = 0`).
* `center`: "keep" returns the unit with its mean; "drop" returns it without μ (the paper centres the unit
  and never adds μ back). Only keep/keep is the identity at λ = 1.
* `coarse_center`: a coarse unit's one λ scales it around its mean ("mean") or around 0 ("zero": with
  the tail zeroed that is λ·u on the unit's span, the paper's coarse adapter).
* `init`: λ starts at 1 ("ones") or at 1 + N(0, 1) ("randn", the paper).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from audio_residual.analysis.stats import PCABasis, ResidualStatistics
from audio_residual.clap.hooks import ClapHooks, HookPoint
from audio_residual.io import atomic_path
from audio_residual.names import Granularity, Unit, UnitKind, choose, hook_name, parse_block, parse_hook

INITS = ("ones", "randn")
CENTERS = ("keep", "drop")
TAILS = ("keep", "zero")
COARSE_CENTERS = ("mean", "zero")


@dataclass
class ResidualConfig:
    """Which units get λ, how many components each keeps, how λ starts, and which variant of RD they apply."""

    granularity: str = "head"
    kinds: tuple[str, ...] = ("attn",)
    stages: tuple[int, ...] | None = None  # None: every stage
    k: int | None = None  # keep at most k components per unit
    evr: float | None = None  # or the fewest reaching this cumulative explained variance (paper: 0.9)
    init: str = "ones"  # "randn": λ = 1 + N(0, 1), as in the paper
    coarse: bool = False
    seed: int = 0
    center: str = "keep"  # "drop": the unit leaves without its mean μ, as in the paper
    tail: str = "keep"  # "zero": directions outside Φ are removed, as in the paper
    coarse_center: str = "mean"  # coarse units only; "zero": λ scales the unit around 0

    def __post_init__(self):
        self.kinds = tuple(self.kinds)
        self.stages = None if self.stages is None else tuple(int(s) for s in self.stages)
        self.granularity = choose(Granularity, self.granularity, "granularity")
        if not self.kinds or set(self.kinds) - set(UnitKind):
            raise ValueError(f"kinds must be a non-empty subset of {tuple(k.value for k in UnitKind)}, got {self.kinds!r}")
        self.kinds = tuple(UnitKind(kind) for kind in self.kinds)
        if self.granularity == Granularity.HEAD and UnitKind.MLP in self.kinds:
            raise ValueError("MLP units have no heads: use granularity 'block' or 'layer' for kinds with 'mlp'")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.evr is not None and not 0 < self.evr <= 1:
            raise ValueError(f"evr must be in (0, 1], got {self.evr}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be ≥ 1, got {self.k}")
        for option, value, choices in (("center", self.center, CENTERS), ("tail", self.tail, TAILS),
                                       ("coarse_center", self.coarse_center, COARSE_CENTERS)):
            if value not in choices:
                raise ValueError(f"{option} must be one of {choices}, got {value!r}")
        if self.coarse_center != "mean" and not self.coarse:
            raise ValueError("coarse_center applies to coarse units only: set coarse=True or leave it 'mean'")

    @property
    def identity_at_one(self) -> bool:
        """Whether λ = 1 leaves the model exactly as it is (only when both the mean and the tail are kept)."""
        return self.center == "keep" and self.tail == "keep"

    @property
    def label(self) -> str:
        """The unit procedure's name: "residual" (or "residual_coarse") plus one tag per non-default choice."""
        tags = [
            "around-zero" if self.coarse and self.coarse_center == "zero" else "",
            "center-drop" if self.center == "drop" else "",
            "tail-zero" if self.tail == "zero" else "",
            "init-randn" if self.init == "randn" else "",
        ]
        return "-".join(["residual_coarse" if self.coarse else "residual", *filter(None, tags)])


@dataclass
class _Site:
    """One hook point where a group of λ acts, with the fixed tensors it needs (stored as buffers)."""

    hook: str  # hook point name
    group: str  # key into ResiDual.lambdas
    kind: str  # "head" (on z, all heads of a block at once) or "vector" (on a residual-space output)
    buffers: dict[str, str] = field(default_factory=dict)  # role → buffer name
    unit: str = ""  # the unit's name for vector sites (head sites hold all heads of a block)


def _key(name: str) -> str:
    return name.replace(".", "_")


class ResiDual(nn.Module):
    """λ gains for a set of units, applied to a CLAP audio encoder by hooks (see `attached`)."""

    def __init__(self, config: ResidualConfig, units: dict[str, int], sites: list[_Site], buffers: dict[str, torch.Tensor]):
        super().__init__()
        self.config = config
        self.units = units  # unit name → number of λ it owns (k, or 1 when coarse)
        self.sites = sites
        for name, tensor in buffers.items():
            tensor = tensor.float() if tensor.is_floating_point() else tensor.long()
            self.register_buffer(name, tensor.contiguous())
        self.lambdas = nn.ParameterDict()
        for site in sites:
            if site.group not in self.lambdas:
                size = int(getattr(self, site.buffers["index"]).max()) + 1
                self.lambdas[site.group] = nn.Parameter(torch.ones(size))
        if config.init == "randn":
            generator = torch.Generator().manual_seed(config.seed)
            for param in self.lambdas.values():
                param.data += torch.randn(param.shape, generator=generator)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_statistics(cls, stats: ResidualStatistics, config: ResidualConfig) -> ResiDual:
        """Build units from statistics fitted on the training folds (the caller guarantees which)."""
        units: dict[str, int] = {}
        sites: list[_Site] = []
        buffers: dict[str, torch.Tensor] = {}
        stages = config.stages if config.stages is not None else tuple(stats.stages())
        missing = sorted(set(stages) - set(stats.stages()))
        if missing:
            raise ValueError(f"stage(s) {missing} not in the statistics (stages {stats.stages()})")

        def prune(basis: PCABasis) -> PCABasis:
            return basis.prune(k=config.k, evr=config.evr)

        for kind in config.kinds:
            bases = {n: prune(b) for n, b in stats.pca(config.granularity, kind, stages).items()}
            if config.granularity == Granularity.HEAD:
                for stage in stages:
                    for block in stats.blocks_of(stage):
                        cls._head_site(stats, block, bases, config.coarse, units, sites, buffers)
                continue
            for name, basis in bases.items():
                group = _key(name)
                units[name] = 1 if config.coarse else len(basis.eigenvalues)
                prefix = f"{group}__"
                buffers[prefix + "mean"] = basis.mean
                buffers[prefix + "components"] = basis.components
                k = len(basis.eigenvalues)
                buffers[prefix + "index"] = torch.zeros(k, dtype=torch.long) if config.coarse else torch.arange(k)
                roles = {"mean": prefix + "mean", "components": prefix + "components", "index": prefix + "index"}
                unit = Unit.parse(name)
                blocks = stats.blocks_of(unit.stage) if unit.block is None else [unit.block_name]
                hook_site = "hook_attn_out" if kind == UnitKind.ATTN else "hook_mlp_out"
                sites += [_Site(hook_name(*parse_block(block), hook_site), group, "vector", roles, name) for block in blocks]
        return cls(config, units, sites, buffers)

    @staticmethod
    def _head_site(stats, block, bases, coarse, units, sites, buffers) -> None:
        """All heads of a block share one hook on z; bases are zero-padded to the block's largest k."""
        heads, head_dim = stats.num_heads(block), stats.head_dim(block)
        w_out = stats.w_out[block]
        stage, block_index = parse_block(block)
        per_head = [bases[Unit(stage, block_index, head=h).name] for h in range(heads)]
        k_max = max(len(b.eigenvalues) for b in per_head)
        a = torch.zeros(heads, k_max, head_dim, dtype=torch.float64)
        b_map = torch.zeros(heads, head_dim, k_max, dtype=torch.float64)
        index = torch.full((heads, k_max), -1, dtype=torch.long)
        mean = stats.blocks[block]["z"].mean.view(heads, head_dim)
        next_param = 0
        for h, basis in enumerate(per_head):
            k = len(basis.eigenvalues)
            w_h = w_out[:, h * head_dim : (h + 1) * head_dim]
            a[h, :k] = basis.components @ w_h  # A_h = Φ_h W_O,h
            b_map[h, :, :k] = torch.linalg.pinv(w_h) @ basis.components.T  # B_h = W_O,h⁺ Φ_hᵀ
            units[basis.name] = 1 if coarse else k
            index[h, :k] = next_param if coarse else torch.arange(next_param, next_param + k)
            next_param += 1 if coarse else k
        group = _key(f"{block}.attn.heads")
        prefix = f"{group}__"
        buffers.update({prefix + "mean": mean, prefix + "a": a, prefix + "b": b_map, prefix + "index": index})
        roles = {"mean": prefix + "mean", "a": prefix + "a", "b": prefix + "b", "index": prefix + "index"}
        sites.append(_Site(hook_name(stage, block_index, "attn.hook_z"), group, "head", roles))

    # ----------------------------------------------------------------- application
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.lambdas.values())

    def _gain(self, site: _Site, offset: float) -> torch.Tensor:
        """λ − offset laid out like the site's components; padded slots get 0 (no effect)."""
        index = getattr(self, site.buffers["index"])
        lam = self.lambdas[site.group]
        return torch.where(index >= 0, lam[index.clamp(min=0)] - offset, torch.zeros((), device=lam.device))

    def edit(self, tensor: torch.Tensor, site: _Site) -> torch.Tensor:
        """RD applied to the activation at `site` (computed in fp32, returned in the input's dtype).

        Head sites work on z_h, whose image under W_O,h is the unit: c, μ and the tail map through W_O,h,
        so every variant of the formula in the module docstring holds for the contribution W_O,h z_h.
        Autocast is off inside: under a bf16/fp16 forward it would otherwise run the einsums in low precision.
        """
        with torch.autocast(tensor.device.type, enabled=False):
            return self._edit(tensor, site)

    def _edit(self, tensor: torch.Tensor, site: _Site) -> torch.Tensor:
        buf = {role: getattr(self, name) for role, name in site.buffers.items()}
        config = self.config
        x = tensor.float()
        around_zero = config.coarse and config.coarse_center == "zero"
        centred = x if around_zero else x - buf["mean"]
        keep_tail = config.tail == "keep"
        gain = self._gain(site, offset=1.0 if keep_tail else 0.0)
        if site.kind == "head":  # x: (..., heads, d_head)
            coords = torch.einsum("...hd,hkd->...hk", centred, buf["a"]) * gain
            change = torch.einsum("...hk,hdk->...hd", coords, buf["b"])
        else:  # x: (..., d)
            change = ((centred @ buf["components"].T) * gain) @ buf["components"]
        if keep_tail:
            out = x + change  # x + Φᵀ diag(λ − 1) Φ (x − c)
        else:
            out = change if around_zero else buf["mean"] + change  # c + Φᵀ diag(λ) Φ (x − c)
        if config.center == "drop":
            out = out - buf["mean"]
        return out.to(tensor.dtype)

    @contextlib.contextmanager
    def attached(self, model: nn.Module):
        """Apply the units to `model` inside the block; on exit the model is exactly the original."""
        hooks = ClapHooks(model)
        missing = [site.hook for site in self.sites if site.hook not in hooks.points]
        if missing:
            raise KeyError(f"model has no hook point(s) {missing[:3]}: ResiDual built for another architecture")

        def make(site: _Site):
            def fn(tensor: torch.Tensor, _point: HookPoint) -> torch.Tensor:
                return self.edit(tensor, site)

            return fn

        with hooks.hooks([([site.hook], make(site)) for site in self.sites]):
            yield model

    def lambda_table(self) -> list[dict]:
        """One row per (unit, component): which directions were amplified (λ > 1) or suppressed."""
        rows, seen = [], set()
        for site in self.sites:
            if site.group in seen:
                continue  # layer granularity hooks one group into several blocks
            seen.add(site.group)
            index = getattr(self, site.buffers["index"])
            lam = self.lambdas[site.group].detach().cpu()
            if site.kind == "head":
                stage, block, _ = parse_hook(site.hook)
                units = [(Unit(stage, block, head=h).name, index[h]) for h in range(index.shape[0])]
            else:
                units = [(site.unit, index)]
            for unit, slots in units:
                for component, slot in enumerate(slots.tolist()):
                    if slot >= 0:
                        rows.append({"unit": unit, "component": component, "lambda": float(lam[slot])})
        return rows

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path, metadata: dict | None = None) -> Path:
        """λ, bases and config in one safetensors file (no pickle); `load` needs no statistics."""
        tensors = {f"lambda.{group}": p.detach().cpu().contiguous() for group, p in self.lambdas.items()}
        tensors.update({f"buffer.{name}": b.detach().cpu().contiguous() for name, b in self.named_buffers()})
        header = {
            "config": json.dumps(asdict(self.config)),
            "units": json.dumps(self.units),
            "sites": json.dumps([asdict(s) for s in self.sites]),
            "metadata": json.dumps(metadata or {}),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ResiDual:
        tensors, header = {}, {}
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
        config = ResidualConfig(**json.loads(header["config"]))
        sites = [_Site(**s) for s in json.loads(header["sites"])]
        buffers = {n.removeprefix("buffer."): t for n, t in tensors.items() if n.startswith("buffer.")}
        module = cls(config, json.loads(header["units"]), sites, buffers)
        with torch.no_grad():
            for group, param in module.lambdas.items():
                param.copy_(tensors[f"lambda.{group}"])
        return module


def build_residual(stats: ResidualStatistics, config: ResidualConfig | None = None, **overrides) -> ResiDual:
    """Shorthand: `build_residual(stats, granularity="layer", stages=(0,))`."""
    config = config or ResidualConfig(**overrides)
    return ResiDual.from_statistics(stats, config)
