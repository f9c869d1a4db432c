"""Typed unit identities: one builder and parser, string forms exactly as files on disk hold them."""

import pytest

from audio_residual.names import Granularity, Unit, UnitKind, block_name, hook_name, parse_block, parse_hook


@pytest.mark.parametrize(
    ("unit", "name", "granularity"),
    [
        (Unit(2, 5, head=13), "layers.2.blocks.5.attn.head.13", Granularity.HEAD),
        (Unit(0, 1), "layers.0.blocks.1.attn", Granularity.BLOCK),
        (Unit(3, 0, "mlp"), "layers.3.blocks.0.mlp", Granularity.BLOCK),
        (Unit(1, kind=UnitKind.MLP), "layers.1.mlp", Granularity.LAYER),
        (Unit(12), "layers.12.attn", Granularity.LAYER),
    ],
)
def test_unit_names_round_trip(unit, name, granularity):
    assert unit.name == str(unit) == name
    assert Unit.parse(name) == unit
    assert unit.granularity == granularity


def test_block_and_hook_names():
    assert block_name(2, 5) == "layers.2.blocks.5" and parse_block("layers.2.blocks.5") == (2, 5)
    assert hook_name(1, 0, "attn.hook_z") == "layers.1.blocks.0.attn.hook_z"
    assert parse_hook("layers.1.blocks.0.attn.hook_z") == (1, 0, "attn.hook_z")
    assert Unit(2, 5, head=1).block_name == "layers.2.blocks.5"


@pytest.mark.parametrize("bad", ["blocks.1.attn", "layers.1.attn.head.2", "layers.1.blocks.2.mlp.head.0",
                                 "layers.1.blocks.2.attn.extra", "layers.x.attn"])
def test_malformed_unit_names_are_refused(bad):
    with pytest.raises(ValueError, match="not a residual unit name|a head belongs to one block"):
        Unit.parse(bad)


def test_impossible_units_and_kinds_are_refused():
    with pytest.raises(ValueError, match="a head belongs to one block's attention"):
        Unit(1, 0, "mlp", head=2)
    with pytest.raises(ValueError, match="a head belongs"):
        Unit(1, head=2)
    with pytest.raises(ValueError, match=r"unit kind must be one of \('attn', 'mlp'\), got 'conv'"):
        Unit(1, 0, "conv")
    with pytest.raises(ValueError, match="spans a whole stage"):
        _ = Unit(1).block_name
    with pytest.raises(ValueError, match="not a block name"):
        parse_block("layers.1.attn")


def test_residual_config_validates_with_the_enums_and_keeps_plain_strings_in_json():
    import json
    from dataclasses import asdict

    from audio_residual.residual.units import ResidualConfig

    config = ResidualConfig(granularity="block", kinds=("attn", "mlp"))
    assert config.granularity is Granularity.BLOCK and config.kinds == (UnitKind.ATTN, UnitKind.MLP)
    assert json.loads(json.dumps(asdict(config)))["granularity"] == "block"
    with pytest.raises(ValueError, match=r"granularity must be one of \('layer', 'block', 'head'\), got 'stage'"):
        ResidualConfig(granularity="stage")
    with pytest.raises(ValueError, match=r"kinds must be a non-empty subset of \('attn', 'mlp'\)"):
        ResidualConfig(kinds=("attn", "ffn"))
