"""The HTSAT diagram says what the model is: its geometry matches the built encoder, its labels the config."""

from __future__ import annotations

import pytest
import torch
from transformers import ClapAudioConfig
from transformers.models.clap.modeling_clap import ClapAudioEncoder

from audio_residual.analysis.architecture import htsat_diagram, htsat_stages
from audio_residual.clap.hooks import BLOCK_SITES
from audio_residual.clap.tiny import tiny_clap_config

CONFIGS = {"tiny": lambda: tiny_clap_config().audio_config, "htsat-tiny": ClapAudioConfig}


@pytest.fixture(scope="module", params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]()


def test_geometry_matches_the_encoder_after_a_forward(config):
    encoder = ClapAudioEncoder(config).eval()
    with torch.no_grad():  # transformers fixes each block's effective window and shift on the first forward
        encoder(torch.zeros(1, 1, 1001, config.num_mel_bins))
    stages = htsat_stages(config)
    assert len(stages) == len(encoder.layers)
    for g, stage in zip(stages, encoder.layers, strict=True):
        attention = stage.blocks[0].attention.self
        assert (g.depth, g.heads, g.width, g.head_dim) == (
            len(stage.blocks), attention.num_attention_heads, stage.dim, attention.attention_head_size
        )
        assert g.grid == tuple(encoder.input_resolutions[g.stage])
        assert {int(block.window_size) for block in stage.blocks} == {g.window}
        shifted = tuple(b for b, block in enumerate(stage.blocks) if int(block.shift_size) > 0)
        assert shifted == g.shifted_blocks
        assert {int(stage.blocks[b].shift_size) for b in shifted} <= {g.shift}


def _texts(fig) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ax in fig.axes:
        for text in ax.texts:
            found.setdefault(text.get_gid(), []).append(text.get_text())
    return found


def test_diagram_labels_every_stage_merge_and_hook_point_from_the_config(config):
    stages = htsat_stages(config)
    texts = _texts(htsat_diagram(config))
    for g in stages:
        (box,) = texts[f"stage{g.stage}"]
        for label in (
            f"stage {g.stage}\n",
            f"{g.heads} heads × d_head {g.head_dim}",
            f"width {g.width}",
            f"{g.grid[0]}×{g.grid[1]} tokens",
            f"window {g.window}×{g.window}, {g.windows} per clip",
        ):
            assert label in box, (label, box)
        assert f"\n{g.depth} block" in box
        if g.shifted_blocks:
            assert f"shift {g.shift} in block" in box
        else:
            assert "no shift" in box
    merges = [s for s in range(len(stages)) if f"merge{s}" in texts]
    assert merges == list(range(len(stages) - 1))  # patch merging between stages, none after the last
    for s in merges:
        assert f"{4 * stages[s].width}→{2 * stages[s].width}" in texts[f"merge{s}"][0]
    last = stages[-1]
    (output,) = texts["output"]
    assert f"{last.grid[0] * last.grid[1]} tokens" in output and f"{config.projection_dim}-d" in output
    assert sorted(texts["hook"]) == sorted(BLOCK_SITES)  # every hook point of ClapHooks, once


def test_htsat_tiny_is_the_published_geometry():
    stages = htsat_stages(ClapAudioConfig())
    assert [(g.depth, g.heads, g.width, g.grid, g.window) for g in stages] == [
        (2, 4, 96, (64, 64), 8), (2, 8, 192, (32, 32), 8), (6, 16, 384, (16, 16), 8), (2, 32, 768, (8, 8), 8)
    ]
    assert [g.shifted_blocks for g in stages] == [(1,), (1,), (1, 3, 5), ()]  # stage 3 is a single window
