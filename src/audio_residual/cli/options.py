"""The command line's one vocabulary: every option shared by several commands is declared here once, with one
default, and turned into the value the library takes (`AudioConfig`, `ModelSource`, `Workspace`, `StudyConfig`).

A command declares the groups it needs (`data`, `model`, `audio`, `study`, ...), so `--recipe` or `--min-seconds`
means the same thing, with the same default, wherever it appears, and reaches every clip the command embeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from audio_residual.clap.loading import DEFAULT_MODEL
from audio_residual.data_processing.audio import BAD_FILE_POLICIES
from audio_residual.data_processing.audio_config import CHECK_MODES
from audio_residual.data_processing.recipes import RECIPES
from audio_residual.layout import RunLayout

WANDB_MODES = ("auto", "online", "offline", "disabled")
WANDB_HELP = "auto: online when logged in, else disabled; offline: log locally, `wandb sync` later"
AMP_MODES = ("auto", "bf16", "fp16", "none")


def bounded(kind: type, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
            ) -> Callable:
    """An argparse type: a `kind` between `low` and `high` (open ends excluded), with a message stating the range."""
    shown = str if kind is int else "{:g}".format  # an integer bound in full: 4294967295, not 4.29497e+09
    rule = f"{'greater than' if low_open else 'at least'} {shown(low)}"
    if high is not None:
        rule += f" and {'less than' if high_open else 'at most'} {shown(high)}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        below = value < low or (low_open and value == low)
        above = high is not None and (value > high or (high_open and value == high))
        if below or above:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {rule}")
        return value

    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
NON_NEGATIVE = bounded(float, 0.0)
POSITIVE = bounded(float, 0.0, low_open=True)
EVR = bounded(float, 0.0, 1.0, low_open=True)  # explained-variance ratio in (0, 1]
FRACTION = bounded(float, 0.0, 1.0, high_open=True)  # a share in [0, 1)
SEED = bounded(int, 0, 2**32 - 1)  # what numpy's legacy RandomState and scikit-learn accept; torch takes more


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def positive_list(text: str) -> list[int]:
    values = int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return sorted(set(values))


def names(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def method_option(text: str) -> tuple[str, str, object]:
    """`NAME.KEY=VALUE`: one option of one method; VALUE is read as JSON when it parses, else as a string."""
    target, sep, value = text.partition("=")
    method, dot, key = target.partition(".")
    if not (sep and dot and method and key):
        raise argparse.ArgumentTypeError(f"{text!r}: write METHOD.OPTION=VALUE, e.g. lora.lr=1e-4")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return method, key, tuple(parsed) if isinstance(parsed, list) else parsed


def _template(text: str) -> str:
    from audio_residual.clap.zeroshot import check_template

    try:
        return check_template(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device(text: str) -> str:
    from audio_residual.clap.loading import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# --- option groups ---------------------------------------------------------------------------------------------
def data(parser: argparse.ArgumentParser, captions: bool = False, required: bool = True) -> None:
    """--data (labelled: --csv; captioned: --caption-column)."""
    if captions:
        parser.add_argument("--data", required=required,
                            help="captioned audio: a Clotho or AudioCaps folder, a folder with captions.csv, or "
                                 "hf:OWNER/NAME")
        parser.add_argument("--caption-column", default=None, help="caption column of a Hugging Face dataset")
    else:
        parser.add_argument("--data", required=required,
                            help="dataset folder (ESC-50, UrbanSound8K, GTZAN, datasets save_to_disk, or the audio "
                                 "folder of --csv), 'esc50' or hf:OWNER/NAME[:config]")
        parser.add_argument("--csv", type=Path, default=None, help="CSV of filename,label,fold for the --data folder")


def model(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL) -> None:
    """--model, --revision, --text-config, --device, --amp."""
    parser.add_argument("--model", default=default,
                        help="hub id, local folder, 'tiny' (offline), or LAION's own checkpoint: FILE.pt or laion:NAME")
    parser.add_argument("--revision", default=None, help="hub model revision: branch, tag or commit hash")
    parser.add_argument("--text-config", type=Path, default=None,
                        help="folder with RoBERTa-base's config.json and tokenizer, for a LAION .pt offline "
                             "(default: the hub)")
    parser.add_argument("--device", type=_device, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="CUDA autocast")


def audio(parser: argparse.ArgumentParser) -> None:
    """How clips become CLAP inputs (`AudioConfig`) and where their features are cached."""
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="audio path: LAION's training data (default) or its get_audio_embedding_from_filelist "
                             "helper")
    parser.add_argument("--no-int16", action="store_true", help="skip LAION's int16 round trip of the audio")
    parser.add_argument("--min-seconds", type=NON_NEGATIVE, default=1.0,
                        help="shorter clips are bad files (stop the run, or skipped with --on-bad-file skip); "
                             "0 accepts any")
    parser.add_argument("--on-bad-file", choices=BAD_FILE_POLICIES, default="error")
    parser.add_argument("--cache-check", choices=CHECK_MODES, default="content",
                        help="how cached features recognise an unchanged audio file: content hash (default) or "
                             "size+mtime (faster)")
    parser.add_argument("--workers", type=POSITIVE_INT, default=1, help="processes for feature extraction")


def output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def batch(parser: argparse.ArgumentParser, default: int | None = 32) -> None:
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=default,
                        help="clips per forward pass, and per ResiDual training step")


def templates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", type=_template, action="append",
                        help="prompt template with {label}; repeat to ensemble")


def wandb(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wandb", choices=WANDB_MODES, default="auto", help=WANDB_HELP)


def common(parser: argparse.ArgumentParser, captions: bool = False) -> None:
    """What every command that embeds a dataset takes: data, model, audio, output, batch size, templates."""
    data(parser, captions)
    model(parser)
    audio(parser)
    output(parser)
    batch(parser)
    templates(parser)


def study(parser: argparse.ArgumentParser, task: str) -> None:
    """The study's options: methods and their options, ResiDual's grid, the split, transfer, W&B."""
    from audio_residual.methods import default_methods, registry

    known = ",".join(registry(task))
    parser.add_argument("--methods", type=names, default=None,
                        help=f"comma-separated, of {known} (default: {','.join(default_methods(task))})")
    parser.add_argument("--method-option", type=method_option, action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="one option of one method, e.g. lora.ranks=[2,4] or tap.attn_dim=32; repeatable")
    parser.add_argument("--grid", type=Path, default=None,
                        help="ResiDual's grid, JSON {option: [values]} ('fold' and 'preset' included)")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None,
                        help="epochs of every method that trains in epochs (default: each method's own)")
    parser.add_argument("--val-fraction", type=FRACTION, default=0.1,
                        help="share of the training folds held out for validation (labelled data)")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--transfer", nargs="+", default=[], metavar="DATA",
                        help="labelled datasets (as --data) scored zero-shot with each fold's adapted encoders → "
                             "transfer.csv")
    wandb(parser)


# --- from arguments to library values --------------------------------------------------------------------------
def audio_config(args):
    from audio_residual.data_processing.audio_config import AudioConfig

    return AudioConfig(recipe=args.recipe, int16_roundtrip=not args.no_int16, min_seconds=args.min_seconds,
                       cache_check=args.cache_check, workers=args.workers, on_bad_file=args.on_bad_file)


def model_source(args):
    from audio_residual.clap.loading import ModelSource

    return ModelSource(args.model, revision=args.revision, text_config=args.text_config, device=args.device,
                       amp=args.amp)


def open_workspace(args, captions: bool = False, other_class_names: tuple[str, ...] = ()):
    """The workspace of the command's options (its provenance is written by `write_provenance`, after the outputs
    it describes)."""
    from audio_residual.clap.zeroshot import DEFAULT_TEMPLATES
    from audio_residual.workspace import Workspace

    ws = Workspace.open(args.data, model_source(args), audio_config(args), cache_dir=args.cache,
                        templates=tuple(getattr(args, "template", None) or DEFAULT_TEMPLATES), captions=captions,
                        csv=getattr(args, "csv", None), caption_column=getattr(args, "caption_column", None),
                        other_class_names=other_class_names)
    ws.batch_size = args.batch_size or ws.batch_size
    return ws


def study_config(args, task: str, **fields):
    """The `StudyConfig` of a study command's options (`fields`: the command's own, e.g. shots)."""
    from audio_residual.experiments.config import StudyConfig, read_grid

    base = {"batch_size": args.batch_size, "val_fraction": args.val_fraction, "seed": args.seed}
    shared = {}
    if args.epochs is not None:
        base["epochs"] = shared["epochs"] = args.epochs
    options: dict[str, dict] = {}
    for method, key, value in args.method_option:
        options.setdefault(method, {})[key] = value
    return StudyConfig(task=task, methods=args.methods, grid=read_grid(args.grid), base=base, options=options,
                       shared=shared, seed=args.seed, **fields)


def write_provenance(args, ws) -> None:
    """OUT/provenance.json, written once the command's outputs are: a run stopped midway leaves the provenance of
    the outputs still there, not of the run that never wrote any."""
    from audio_residual.io import write_json

    write_json(RunLayout(args.out).provenance, ws.provenance())


def check_folds(ws, folds, option: str) -> None:
    """Folds asked for on the command line must exist in the dataset (checked before any training)."""
    known = [s.fold for s in ws.splits()]
    unknown = sorted(set(folds) - set(known))
    if unknown:
        raise ValueError(f"{option}: no fold {unknown[0]} in {ws.table.name!r}: folds are {known}")


def check_writable(path: Path, option: str) -> None:
    """Fail before any computing if results could not be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path} is not a writable folder ({err.strerror or err})") from err
