"""Named hook points on the upstream transformers HTSAT encoder, in the spirit of TransformerLens.

Every Swin block `layers.{s}.blocks.{b}` of `ClapAudioEncoder` exposes these points (no model code is
copied: each is a PyTorch hook on an existing transformers module):

| name suffix         | shape                              | layout  | hooked where                               |
|---------------------|------------------------------------|---------|--------------------------------------------|
| `hook_resid_pre`    | (batch, tokens, d)                 | grid    | block input                                |
| `attn.hook_pattern` | (batch·windows, heads, w², w²)     | windows | input of `attention.self.dropout`          |
| `attn.hook_z`       | (batch·windows, w², heads, d_head) | windows | input of `attention.output` (head contexts)|
| `attn.hook_result`  | (batch·windows, w², heads, d)      | windows | z_h · W_O,hᵀ per head; opt-in, costs heads×|
| `hook_attn_out`     | (batch, tokens, d)                 | grid    | input of `drop_path` (attention output)    |
| `hook_resid_mid`    | (batch, tokens, d)                 | grid    | input of `layernorm_after` (read only)     |
| `hook_mlp_out`      | (batch, tokens, d)                 | grid    | output of `output` (the MLP's second dense)|
| `hook_resid_post`   | (batch, tokens, d)                 | grid    | block output                               |

"grid" tokens are in the encoder's row-major (frequency×time image) order; "windows" tokens are in the
shifted-window order attention sees. `ClapHooks.to_grid` undoes the window partition and cyclic shift.
Exact identities (tested): Σ_h result_h + b_O = attention output, resid_pre + attn_out + mlp_out = resid_post.
A hook function receives `(tensor, hook_point)` and may return a replacement tensor of the same shape.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from audio_residual.clap.encode import audio_embeddings, audio_encoder
from audio_residual.names import hook_name

HookFn = Callable[[torch.Tensor, "HookPoint"], torch.Tensor | None]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None

BLOCK_SITES = (
    "hook_resid_pre",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)
OPT_IN_SITES = ("attn.hook_result",)  # cached only when named explicitly
READ_ONLY_SITES = ("attn.hook_result", "hook_resid_mid")


@dataclass(frozen=True)
class HookPoint:
    """One named place in the encoder: which block, which site, and the block's geometry."""

    name: str
    stage: int
    block: int
    site: str
    layer: nn.Module  # the transformers ClapAudioLayer (Swin block)
    num_heads: int
    head_dim: int
    width: int

    @property
    def w_out(self) -> torch.Tensor:
        """The attention output projection W_O, (d, heads·d_head): column slice h belongs to head h."""
        return self.layer.attention.output.dense.weight

    @property
    def b_out(self) -> torch.Tensor:
        return self.layer.attention.output.dense.bias


def make_filter(names: NameFilter) -> Callable[[str], bool]:
    """None → every default point; a string is a glob (`layers.2.*.attn.hook_z`); a list is exact names."""
    if names is None:
        return lambda name: not name.endswith(OPT_IN_SITES)
    if isinstance(names, str):
        return lambda name: fnmatch.fnmatchcase(name, names)
    if callable(names):
        return names
    wanted = set(names)
    return wanted.__contains__


class ClapHooks:
    """Hook points of a CLAP audio encoder, with `hooks(...)` and `run_with_cache(...)`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.encoder = audio_encoder(model)
        self.points: dict[str, HookPoint] = {}
        for s, stage in enumerate(self.encoder.layers):
            for b, layer in enumerate(stage.blocks):
                attn = layer.attention.self
                for site in BLOCK_SITES:
                    name = hook_name(s, b, site)
                    self.points[name] = HookPoint(
                        name, s, b, site, layer, attn.num_attention_heads, attn.attention_head_size, stage.dim
                    )

    @property
    def names(self) -> list[str]:
        return list(self.points)

    def select(self, names: NameFilter) -> list[str]:
        keep = make_filter(names)
        selected = [name for name in self.points if keep(name)]
        if isinstance(names, (list, tuple)):
            unknown = sorted(set(names) - set(self.points))
            if unknown:
                raise KeyError(f"unknown hook point(s) {unknown[:5]}; see ClapHooks.names")
        return selected

    def blocks(self) -> Iterator[tuple[int, int, nn.Module]]:
        for s, stage in enumerate(self.encoder.layers):
            for b, layer in enumerate(stage.blocks):
                yield s, b, layer

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[NameFilter, HookFn]]):
        """Attach hook functions to the named points for the duration of the block; always detached after."""
        per_block: dict[tuple[int, int], dict[str, list[HookFn]]] = {}
        for names, fn in fwd_hooks:
            for name in self.select(names):
                point = self.points[name]
                per_block.setdefault((point.stage, point.block), {}).setdefault(point.site, []).append(fn)
        handles = []
        try:
            for (s, b), sites in per_block.items():
                handles += self._attach(s, b, sites)
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _attach(self, s: int, b: int, sites: dict[str, list[HookFn]]) -> list:
        layer = self.encoder.layers[s].blocks[b]
        point = {site: self.points[hook_name(s, b, site)] for site in BLOCK_SITES}

        def apply(site: str, tensor: torch.Tensor) -> torch.Tensor:
            for fn in sites.get(site, ()):
                replaced = fn(tensor, point[site])
                if replaced is not None:
                    if site in READ_ONLY_SITES:
                        raise RuntimeError(f"{point[site].name} is read-only: its hook must return None")
                    if replaced.shape != tensor.shape:
                        raise ValueError(f"hook on {point[site].name} changed shape {tensor.shape}→{replaced.shape}")
                    tensor = replaced
            return tensor

        def pre_args(site: str):
            def hook(_module, args):
                return (apply(site, args[0]), *args[1:])

            return hook

        def head_context(_module, args):
            ctx = args[0]
            z = apply("attn.hook_z", ctx.view(*ctx.shape[:-1], point["attn.hook_z"].num_heads, -1))
            if "attn.hook_result" in sites:
                w = layer.attention.output.dense.weight
                apply("attn.hook_result", torch.einsum("nthd,chd->nthc", z, w.view(w.shape[0], z.shape[-2], -1)))
            return (z.reshape(ctx.shape), *args[1:])

        def mlp_out(_module, _args, output):
            return apply("hook_mlp_out", output)

        def resid_post(_module, _args, output):
            return (apply("hook_resid_post", output[0]), *output[1:])

        wanted = set(sites)
        handles = []
        if "hook_resid_pre" in wanted:
            handles.append(layer.register_forward_pre_hook(pre_args("hook_resid_pre")))
        if "attn.hook_pattern" in wanted:
            handles.append(layer.attention.self.dropout.register_forward_pre_hook(pre_args("attn.hook_pattern")))
        if wanted & {"attn.hook_z", "attn.hook_result"}:
            handles.append(layer.attention.output.register_forward_pre_hook(head_context))
        if "hook_attn_out" in wanted:
            handles.append(layer.drop_path.register_forward_pre_hook(pre_args("hook_attn_out")))
        if "hook_resid_mid" in wanted:
            handles.append(layer.layernorm_after.register_forward_pre_hook(pre_args("hook_resid_mid")))
        if "hook_mlp_out" in wanted:
            handles.append(layer.output.register_forward_hook(mlp_out))
        if "hook_resid_post" in wanted:
            handles.append(layer.register_forward_hook(resid_post))
        return handles

    def run_with_cache(
        self,
        input_features: torch.Tensor,
        names: NameFilter = None,
        is_longer: torch.Tensor | None = None,
        detach: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Audio embeddings and only the requested activations (`names`: glob, list or predicate)."""
        cache: dict[str, torch.Tensor] = {}

        def store(tensor: torch.Tensor, point: HookPoint) -> None:
            cache[point.name] = tensor.detach() if detach else tensor

        with self.hooks([(self.select(names), store)]):
            embeds = audio_embeddings(self.model, input_features, is_longer)
        return embeds, cache

    def to_grid(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Window-layout activations (batch·windows, w², ...) → (batch, height, width, ...) in grid order.

        Undoes the window partition and the block's cyclic shift, so token (i, j) is the same
        time-frequency patch as in the residual stream. Must be called after a forward pass (transformers
        resets window and shift sizes for small grids on the first call).
        """
        point = self.points[name]
        height, width = self.encoder.input_resolutions[point.stage]
        window, shift = int(point.layer.window_size), int(point.layer.shift_size)
        height_pad, width_pad = -(-height // window) * window, -(-width // window) * window
        rest = tensor.shape[2:]
        per_image = (height_pad // window) * (width_pad // window)
        grid = tensor.reshape(-1, height_pad // window, width_pad // window, window, window, *rest)
        grid = grid.transpose(2, 3).reshape(tensor.shape[0] // per_image, height_pad, width_pad, *rest)
        if shift > 0:
            grid = torch.roll(grid, shifts=(shift, shift), dims=(1, 2))
        return grid[:, :height, :width]
