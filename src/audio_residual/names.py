"""Names of the encoder's places, built and parsed in one module (TransformerLens has `get_act_name`).

    block_name(2, 5)                      'layers.2.blocks.5'
    hook_name(2, 5, "attn.hook_z")        'layers.2.blocks.5.attn.hook_z'
    Unit(2, 5, head=13).name              'layers.2.blocks.5.attn.head.13'
    Unit(1, kind="mlp").name              'layers.1.mlp'        (a whole stage: layer granularity)
    Unit.parse('layers.2.blocks.5.attn')  Unit(stage=2, block=5, kind='attn', head=None)

The string forms are what files on disk (statistics, λ, tables) hold, so they never change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Granularity(StrEnum):
    """Which units get a PCA and λ: a whole stage, one block's output, or one attention head."""

    LAYER = "layer"
    BLOCK = "block"
    HEAD = "head"


class UnitKind(StrEnum):
    """What a unit writes into the residual stream: attention output or MLP output."""

    ATTN = "attn"
    MLP = "mlp"


def choose(enum: type[StrEnum], value, what: str) -> StrEnum:
    """`value` as a member of `enum`; else a ValueError naming the choices and the culprit."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{what} must be one of {tuple(m.value for m in enum)}, got {value!r}") from None


_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)$")
_UNIT = re.compile(r"^layers\.(?P<stage>\d+)(?:\.blocks\.(?P<block>\d+))?\.(?P<kind>attn|mlp)(?:\.head\.(?P<head>\d+))?$")


def block_name(stage: int, block: int) -> str:
    """A Swin block: `layers.{stage}.blocks.{block}`."""
    return f"layers.{stage}.blocks.{block}"


def parse_block(name: str) -> tuple[int, int]:
    """(stage, block) of a block name; a ValueError naming anything else."""
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"not a block name (layers.S.blocks.B): {name!r}")
    return int(match[1]), int(match[2])


def hook_name(stage: int, block: int, site: str) -> str:
    """A hook point of a block (`site` as in `clap.hooks.BLOCK_SITES`, e.g. `attn.hook_z`)."""
    return f"{block_name(stage, block)}.{site}"


@dataclass(frozen=True)
class Unit:
    """One residual unit: a stage's (`block` None), a block's, or one head's (`head`) attention or MLP output."""

    stage: int
    block: int | None = None
    kind: UnitKind = UnitKind.ATTN
    head: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "kind", choose(UnitKind, self.kind, "unit kind"))
        if self.head is not None and (self.block is None or self.kind != UnitKind.ATTN):
            raise ValueError(f"a head belongs to one block's attention: stage {self.stage}, block {self.block}, "
                             f"kind {self.kind.value}")

    @property
    def granularity(self) -> Granularity:
        if self.block is None:
            return Granularity.LAYER
        return Granularity.BLOCK if self.head is None else Granularity.HEAD

    @property
    def block_name(self) -> str:
        if self.block is None:
            raise ValueError(f"{self.name} spans a whole stage: it has no block")
        return block_name(self.stage, self.block)

    @property
    def name(self) -> str:
        place = f"layers.{self.stage}" if self.block is None else self.block_name
        return f"{place}.{self.kind.value}" + ("" if self.head is None else f".head.{self.head}")

    @classmethod
    def parse(cls, name: str) -> Unit:
        match = _UNIT.match(name)
        if match is None:
            raise ValueError(f"not a residual unit name: {name!r}")
        block, head = match["block"], match["head"]
        return cls(int(match["stage"]), None if block is None else int(block), match["kind"],
                   None if head is None else int(head))

    def __str__(self) -> str:
        return self.name


def parse_hook(name: str) -> tuple[int, int, str]:
    """(stage, block, site) of a hook point name."""
    match = re.match(r"^(layers\.\d+\.blocks\.\d+)\.(.+)$", name)
    if match is None:
        raise ValueError(f"not a hook point name (layers.S.blocks.B.SITE): {name!r}")
    return (*parse_block(match[1]), match[2])
