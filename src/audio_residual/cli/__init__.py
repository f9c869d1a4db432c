"""`audio-residual` command line: the notebooks' steps, headless (`python -m audio_residual` too, for torchrun).

Every command takes its shared options from one vocabulary (`cli.options`); the study commands are in
`cli.study`, the rest in `cli.tools`.
"""

from __future__ import annotations

import argparse
import os
import sys

from audio_residual.cli import options, study, tools

INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
DATA_PARALLEL = ("pretrain", "stats")  # the commands that split their work over torchrun's processes


def check_world(args: argparse.Namespace) -> None:
    """Under torchrun a command that does not split its work (`pretrain --preset` included) would run once per
    process into the same OUT: refuse it."""
    world = os.environ.get("WORLD_SIZE", "1")
    preset = getattr(args, "preset", None) is not None
    if (args.command not in DATA_PARALLEL or preset) and world.isdigit() and int(world) > 1:
        raise ValueError(f"{'--preset' if preset else 'this command'} runs in one process, not under torchrun "
                         f"(WORLD_SIZE={world}); only pretrain (without --preset) and stats run data-parallel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-residual", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    study.add_parsers(sub)
    tools.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input and environment failures (OSError) are one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        check_world(args)
        for option in ("out", "cache"):
            if getattr(args, option, None) is not None:
                options.check_writable(getattr(args, option), f"--{option}")
        args.func(args)
    except KeyboardInterrupt:
        print(f"audio-residual {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (OSError, ValueError) as error:
        print(f"audio-residual {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
