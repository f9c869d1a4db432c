"""A drawing of CLAP's audio tower (HTSAT, a Swin transformer) from its config: stages, windows, hook points.

The geometry is derived from `ClapAudioConfig` by the rules transformers builds the encoder with, so the
figure shows the model that is loaded (HTSAT-tiny, HTSAT-base or the tiny test model), not a textbook Swin.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

GRID_ORDER = "tab:blue"  # activations in the residual stream's token order
WINDOW_ORDER = "tab:orange"  # activations in shifted-window order (ClapHooks.to_grid maps them back)


@dataclass(frozen=True)
class StageGeometry:
    """One Swin stage as transformers runs it."""

    stage: int
    depth: int
    heads: int
    width: int
    grid: tuple[int, int]  # token grid (rows, columns) of the stage's residual stream
    window: int  # window side; the grid side when the grid is no larger than the configured window
    shift: int  # cyclic shift of the odd blocks; 0 when the stage is a single window

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def windows(self) -> int:
        """Windows per clip (the grid padded up to a multiple of the window)."""
        return -(-self.grid[0] // self.window) * -(-self.grid[1] // self.window)

    @property
    def shifted_blocks(self) -> tuple[int, ...]:
        return tuple(range(1, self.depth, 2)) if self.shift else ()


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def audio_config(config):
    """The `ClapAudioConfig` of a `ClapConfig`, a `ClapModel` or an audio config itself."""
    config = getattr(config, "config", config)
    return getattr(config, "audio_config", config)


def htsat_stages(config) -> list[StageGeometry]:
    """Per stage: depth, heads, width, token grid, effective window and shift (ClapAudioEncoder's rules)."""
    audio = audio_config(config)
    spec, stride = _pair(audio.spec_size), _pair(audio.patch_stride)
    rows, cols = spec[0] // stride[0], spec[1] // stride[1]
    stages = []
    for s, (depth, heads) in enumerate(zip(audio.depths, audio.num_attention_heads, strict=True)):
        grid = (rows // 2**s, cols // 2**s)
        window, shift = audio.window_size, audio.window_size // 2
        if min(grid) <= window:  # transformers: one window covering the grid, no shift
            window, shift = min(grid), 0
        stages.append(StageGeometry(s, depth, heads, audio.patch_embeds_hidden_size * 2**s, grid, window, shift))
    return stages


def _box(ax, x, y, w, h, text, gid=None, color="0.93", size=8.5, edge="0.3"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4", facecolor=color, edgecolor=edge))
    return ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, gid=gid)


def _arrow(ax, start, end, color="0.2", style="-|>", **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, **kw))


def _canvas(ax, title):
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10, loc="left")


def _shift_line(g: StageGeometry) -> str:
    if not g.shift:
        return "no shift (one window)"
    if not g.shifted_blocks:
        return "no shifted block (depth 1)"
    return f"shift {g.shift} in block{'s' * (len(g.shifted_blocks) > 1)} {', '.join(map(str, g.shifted_blocks))}"


def _pipeline(ax, audio, stages: list[StageGeometry]) -> None:
    """Input → patch embedding → stages joined by patch merging → pooled embedding."""
    spec, patch, stride = _pair(audio.spec_size), _pair(audio.patch_size), _pair(audio.patch_stride)
    n = len(stages)
    _canvas(ax, f"HTSAT as configured: {n} Swin stages, one residual stream per stage, no CLS token")
    _box(ax, 0.5, 48, 9, 44, f"log-mel\n{audio.num_mel_bins} mel bins\n↓ reshaped\n{spec[0]}×{spec[1]}\nimage\n\n"
         f"patch {patch[0]}×{patch[1]}\nstride {stride[0]}×{stride[1]}", gid="input")
    gap, width = 4.5, (100 - 12 - 11 - (n - 1) * 4.5) / n
    left = 12
    _arrow(ax, (10.3, 70), (left - 0.5, 70))
    for g in stages:
        x = left + g.stage * (width + gap)
        text = (
            f"stage {g.stage}\n{g.depth} block{'s' * (g.depth > 1)}\n{g.heads} heads × d_head {g.head_dim}\nwidth {g.width}\n"
            f"{g.grid[0]}×{g.grid[1]} tokens\nwindow {g.window}×{g.window}, {g.windows} per clip\n{_shift_line(g)}"
        )
        _box(ax, x, 48, width, 44, text, gid=f"stage{g.stage}", color="#dbe9f6", size=8)
        if g.stage < n - 1:
            _arrow(ax, (x + width + 0.5, 70), (x + width + gap - 0.5, 70), color="tab:green", linewidth=2)
            ax.text(x + width + gap / 2, 45, f"patch merging\n2×2 tokens → 1\nLN, {4 * g.width}→{2 * g.width}",
                    ha="center", va="top", fontsize=7.5, color="tab:green", gid=f"merge{g.stage}")
    last = stages[-1]
    x = left + n * (width + gap) - gap
    _arrow(ax, (x + 0.5, 70), (x + 2.3, 70))
    _box(ax, x + 2.5, 48, 97.5 - x - 2.5, 44,
         f"LayerNorm\nmean over\n{last.grid[0] * last.grid[1]} tokens\n↓\nprojection\n→ {audio.projection_dim}-d\naudio\nembedding",
         gid="output")
    ax.text(50, 14, "Each stage keeps its own residual stream (width and token grid fixed within the stage). "
            "Patch merging concatenates 2×2 neighbours through a LayerNorm and a linear map,\nso a unit of "
            "stages 0–2 reaches the embedding only through every later stage; the embedding is a mean over "
            "the last stage's tokens, not a CLS token.", ha="center", va="center", fontsize=8)


BLOCK_STEPS = (
    # (y, text of the box or None for a point on the stream, hook names, colour of those hooks)
    (94, None, ("hook_resid_pre",), GRID_ORDER),
    (86, "layernorm_before", (), None),
    (77, "cyclic shift by (−s, −s) (SW-MSA blocks)\n+ window partition: windows of w² tokens", (), None),
    (67, "per head h: softmax(q·kᵀ/√d_head + relative position bias [+ shift mask])\n"
         "ctx_h = pattern · v  (d_head per token)", ("attn.hook_pattern", "attn.hook_z"), WINDOW_ORDER),
    (57, "ctx_h · W_O,hᵀ ∈ ℝ^d  (rank ≤ d_head)", ("attn.hook_result",), WINDOW_ORDER),
    (48, "Σ_h + b_O, window reverse, roll back by (+s, +s)", ("hook_attn_out",), GRID_ORDER),
    (37, None, ("hook_resid_mid",), GRID_ORDER),
    (32, "layernorm_after", (), None),
    (22, "MLP: d → 4d → d (GELU)", ("hook_mlp_out",), GRID_ORDER),
    (8, None, ("hook_resid_post",), GRID_ORDER),
)


def _block(ax) -> None:
    """One Swin block with the hook points of `ClapHooks`, coloured by the token order they hold."""
    _canvas(ax, "One Swin block `layers.{s}.blocks.{b}` and its hook points (blue: grid order, token (i, j) = "
            "the stream's patch;\norange: window order, per shifted window)")
    stream_x = 6
    _arrow(ax, (stream_x, 99), (stream_x, 4), linewidth=2.5, style="-|>")
    ax.text(stream_x - 1.5, 52, "residual stream of stage s (grid order)", rotation=90, ha="right", va="center",
            fontsize=8, color=GRID_ORDER)
    for y in (40, 12):  # where the attention and MLP outputs are added
        ax.text(stream_x, y, "+", ha="center", va="center", fontsize=13, fontweight="bold",
                bbox={"boxstyle": "circle,pad=0.1", "facecolor": "white", "edgecolor": "0.2"})
    _arrow(ax, (stream_x, 90), (12, 86), style="-")
    _arrow(ax, (stream_x, 36), (12, 32), style="-")
    _arrow(ax, (40, 44.5), (stream_x + 1.5, 40))
    _arrow(ax, (40, 18.5), (stream_x + 1.5, 12))
    for y, text, hooks, color in BLOCK_STEPS:
        anchor = (stream_x + 1.5, y)
        if text is not None:
            _box(ax, 12, y - 3, 56, 6, text, size=7.5)
            anchor = (68.5, y)
        for i, name in enumerate(hooks):
            ty = y + (2.2 - 4.4 * i if len(hooks) > 1 else 0)
            ax.text(76, ty, name, ha="left", va="center", fontsize=8, family="monospace", color="white",
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": color, "edgecolor": "none"}, gid="hook")
            _arrow(ax, (75.5, ty), anchor, color=color, style="-", linestyle=":")
    for y in (82, 72, 62, 52, 28):
        _arrow(ax, (40, y + 1.5), (40, y - 1), style="-|>")


def _windows(ax, g: StageGeometry) -> None:
    """Stage `g`'s token grid: regular windows (solid) and the shifted blocks' windows (dashed)."""
    rows, cols = g.grid
    ax.set_xlim(-0.5, cols + 0.5)
    ax.set_ylim(rows + 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.add_patch(Rectangle((0, 0), cols, rows, fill=False, linewidth=1.5))
    ax.add_patch(Rectangle((0, 0), g.window, g.window, facecolor="tab:blue", alpha=0.25))
    for k in range(g.window, max(rows, cols), g.window):
        if k < cols:
            ax.axvline(k, color="tab:blue", linewidth=1)
        if k < rows:
            ax.axhline(k, color="tab:blue", linewidth=1)
    if g.shifted_blocks:
        ax.add_patch(Rectangle((g.shift, g.shift), g.window, g.window, facecolor="tab:orange", alpha=0.3))
        for k in range(g.shift, max(rows, cols), g.window):
            if k < cols:
                ax.axvline(k, color="tab:orange", linewidth=1, linestyle="--")
            if k < rows:
                ax.axhline(k, color="tab:orange", linewidth=1, linestyle="--")
    shifted = (f"dashed: {_shift_line(g)} (cyclic roll;\nwindows wrapping the edge are masked)"
               if g.shifted_blocks else _shift_line(g))
    ax.set_title(f"stage {g.stage}: {rows}×{cols} tokens, {g.windows} windows of {g.window}×{g.window}\n"
                 f"solid: even blocks; {shifted}", fontsize=8.5, loc="left")


def htsat_diagram(config) -> Figure:
    """CLAP's audio encoder drawn from its config: the stages, one block with its hook points, stage 0's windows.

    `config` is a `ClapConfig`, a `ClapAudioConfig` or a `ClapModel`. Every number shown is computed from it.
    """
    audio = audio_config(config)
    stages = htsat_stages(audio)
    fig = Figure(figsize=(15, 10.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(0.8, 1.35), width_ratios=(1.7, 1))
    _pipeline(fig.add_subplot(grid[0, :]), audio, stages)
    _block(fig.add_subplot(grid[1, 0]))
    _windows(fig.add_subplot(grid[1, 1]), stages[0])
    return fig
