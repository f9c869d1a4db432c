"""`audio-residual` command line: the notebooks' steps, headless."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from audio_residual.clap.loading import DEFAULT_MODEL
from audio_residual.data_processing.recipes import RECIPES
from audio_residual.layout import RunLayout
from audio_residual.retrieval.cli import add_retrieval_parser
from audio_residual.training.tracking import MODES as WANDB_MODES

WANDB_HELP = "auto: online when logged in, else disabled; offline: log locally, `wandb sync` later"

INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def _bounded(
    kind: type, low: float, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable:
    """An argparse type: a `kind` between `low` and `high` (open ends excluded), with a message stating the range."""
    rule = f"{'greater than' if low_open else 'at least'} {low:g}"
    if high is not None:
        rule += f" and {'less than' if high_open else 'at most'} {high:g}"

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


POSITIVE_INT = _bounded(int, 1)
NON_NEGATIVE_INT = _bounded(int, 0)
NON_NEGATIVE = _bounded(float, 0.0)
POSITIVE = _bounded(float, 0.0, low_open=True)
EVR = _bounded(float, 0.0, 1.0, low_open=True)  # explained-variance ratio in (0, 1]
VAL_FRACTION = _bounded(float, 0.0, 1.0, high_open=True)  # share of training clips held out, [0, 1)


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


def _common(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    parser.add_argument(
        "--data", required=data_required,
        help="dataset folder (ESC-50, UrbanSound8K, GTZAN, datasets save_to_disk, or the audio folder of --csv), 'esc50' or hf:OWNER/NAME[:config]",
    )
    parser.add_argument("--csv", type=Path, default=None, help="CSV of filename,label,fold for the --data folder")
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="hub id, local folder, 'tiny' (offline), or LAION's own checkpoint: FILE.pt or laion:NAME",
    )
    parser.add_argument(
        "--text-config", type=Path, default=None,
        help="folder with RoBERTa-base's config.json and tokenizer, for a LAION .pt offline (default: the hub)",
    )
    parser.add_argument(
        "--recipe", choices=RECIPES, default=RECIPES[0],
        help="audio path: LAION's training data (default) or its get_audio_embedding_from_filelist helper",
    )
    parser.add_argument("--revision", default=None, help="hub model revision: branch, tag or commit hash")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder")
    parser.add_argument("--workers", type=int, default=1, help="processes for feature extraction (same cache)")
    parser.add_argument("--device", type=_device, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="CUDA autocast")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    parser.add_argument("--on-bad-file", choices=["error", "skip"], default="error")
    parser.add_argument(
        "--min-seconds", type=NON_NEGATIVE, default=1.0,
        help="shorter clips are bad files (stop the run, or skipped with --on-bad-file skip); 0 accepts any",
    )
    parser.add_argument("--no-int16", action="store_true", help="skip LAION's int16 round trip of the audio")
    parser.add_argument(
        "--template", type=_template, action="append", help="prompt template with {label}; repeat to ensemble"
    )
    parser.add_argument(
        "--cache-check", choices=["content", "mtime"], default="content",
        help="how cached features recognise an unchanged audio file: content hash (default) or size+mtime (faster)",
    )


def _open(args, other_class_names: tuple[str, ...] = ()):
    """The workspace of the command's options (its provenance is written by `_write_provenance`, after the
    outputs it describes)."""
    from audio_residual.clap.zeroshot import DEFAULT_TEMPLATES
    from audio_residual.workspace import Workspace

    ws = Workspace.open(
        args.data,
        model=args.model,
        cache_dir=args.cache,
        device=args.device,
        amp=args.amp,
        on_bad_file=args.on_bad_file,
        int16_roundtrip=not args.no_int16,
        templates=tuple(args.template or DEFAULT_TEMPLATES),
        cache_check=args.cache_check,
        revision=args.revision,
        csv=args.csv,
        min_seconds=args.min_seconds,
        feature_workers=args.workers,
        other_class_names=other_class_names,
        text_config=args.text_config,
        recipe=args.recipe,
    )
    return ws


def _write_provenance(args, ws) -> None:
    """OUT/provenance.json, written once the command's outputs are: a run stopped midway leaves the
    provenance of the outputs still there, not of the run that never wrote any."""
    from audio_residual.io import write_json

    write_json(RunLayout(args.out).provenance, ws.provenance())


def _check_trainable(ws, folds=None) -> None:
    """A class with clips in one test fold only is refused now, naming it, before analysis or sweep run: the
    study's trained classifiers (linear probe and kin) need an example of every class (ResiDual alone,
    scored against CLAP's text prompts, would not)."""
    from audio_residual.data_processing.folds import check_classes_trainable

    check_classes_trainable(ws.table, ws.features.valid, folds)


def _report_skipped(ws, out: Path) -> None:
    """OUT/skipped.csv (files left out) and OUT/warnings.csv (files used but suspect: clipping, DC only).

    Each is removed when empty, so a list from an earlier run never outlives the files it named.
    """
    import pandas as pd

    from audio_residual.io import write_csv

    layout = RunLayout(out)
    lists = [
        (layout.skipped, ws.features.skipped, "skipped {n} bad file(s)"),
        (layout.warnings, ws.features.warnings, "{n} clip(s) used despite a warning (clipping, DC only)"),
    ]
    for path, entries, message in lists:
        if entries:
            write_csv(path, pd.DataFrame(entries, columns=["filename", "reason"]))
            print(f"{message.format(n=len(entries))}, listed in {path}")
        else:
            path.unlink(missing_ok=True)


def _check_folds(ws, folds, option: str) -> None:
    """Folds asked for on the command line must exist in the dataset (checked before any training)."""
    unknown = sorted(set(folds) - set(ws.table.fold_ids))
    if unknown:
        raise ValueError(f"{option}: no fold {unknown[0]} in {ws.table.name!r}: folds are {list(ws.table.fold_ids)}")


def _check_writable(path: Path, option: str) -> None:
    """Fail before any computing if results could not be written there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path} is not a writable folder ({err.strerror or err})") from err


def cmd_zeroshot(args) -> None:
    from audio_residual.evaluation.zeroshot import summarize, zero_shot_by_fold
    from audio_residual.io import write_csv

    ws = _open(args)
    print("provenance:", json.dumps(ws.provenance()))
    _report_skipped(ws, args.out)
    frame = zero_shot_by_fold(ws, batch_size=args.batch_size)
    path = write_csv(RunLayout(args.out).zeroshot, frame)
    _write_provenance(args, ws)
    print(frame.to_string(index=False))
    print(summarize(frame), f"→ {path}")


def cmd_generate(args) -> None:
    if args.captions:
        return cmd_generate_captions(args)
    from audio_residual.data_processing import make_synthetic_esc50

    path = make_synthetic_esc50(
        args.out, n_classes=args.classes, clips_per_class=args.clips_per_class, seconds=args.seconds, seed=args.seed
    )
    print(f"generated ESC-50-shaped data in {path}")


def cmd_generate_captions(args) -> None:
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

    path = make_synthetic_captions(
        args.out, n_clips=args.clips, captions_per_clip=args.captions_per_clip, seconds=args.seconds, seed=args.seed
    )
    print(f"generated captioned audio (captions.csv: filename,caption,split) in {path}")


def cmd_pretrain(args) -> None:
    from audio_residual.data_processing.captions import load_captions
    from audio_residual.training.pretrain import PretrainRecipe
    from audio_residual.training.pretrain_run import PretrainRun, PretrainSource, pretrain

    if args.preset is not None:
        from audio_residual.training.pretrain_preset import run_preset

        path = run_preset(args.preset, args.out, seed=args.seed, device=args.device)
        print(f"pretrained CLAP ({args.preset} preset) → {path}")
        return
    if args.data is None:
        raise ValueError("give --data (captioned audio) or --preset tiny")
    if args.model is not None and args.config is not None:
        raise ValueError("give --config (from scratch) or --model (continue training), not both")
    table = load_captions(args.data, export_root=Path("data") / "hf", caption_column=args.caption_column)
    recipe = PretrainRecipe(
        epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, freeze=args.freeze, seed=args.seed,
        all_captions=args.all_captions,
    )  # fmt: skip
    source = PretrainSource(config=None if args.model else (args.config or "tiny"), model=args.model, tokenizer=args.tokenizer)
    run = PretrainRun(args.out, cache_dir=args.cache, device=args.device, amp=args.amp, wandb=args.wandb,
                      eval_classification=args.eval_classification, on_bad_file=args.on_bad_file,
                      extra_provenance={"data_source": str(args.data)})  # fmt: skip
    path = pretrain(table, source, recipe, run)
    print(f"pretrained CLAP → {path} (use it as --model {path})")


def _pretrain_parser(sub) -> None:
    from audio_residual.training.pretrain import CONFIGS, FREEZE

    p = sub.add_parser("pretrain", help="train a CLAP contrastively on captioned audio → OUT/model (a --model folder)")
    p.add_argument("--data", default=None, help="captioned audio: Clotho or AudioCaps folder, folder with captions.csv, hf:OWNER/NAME")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=["tiny"], default=None, help="tiny: the shipped tiny CLAP's run (generated data)")
    p.add_argument("--config", choices=CONFIGS, default=None, help="train from scratch at this size (default tiny)")
    p.add_argument("--model", default=None, help="continue training this CLAP (hub id, folder, tiny, tiny-random)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for htsat sizes (none can be downloaded offline)")
    p.add_argument("--freeze", choices=FREEZE, default="none")
    p.add_argument("--all-captions", action="store_true",
                   help="every caption of a clip in its step (multi-positive loss), not one drawn per step")
    p.add_argument("--epochs", type=POSITIVE_INT, default=10)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32)
    p.add_argument("--accumulate", type=POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=1e-4)
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.2)
    p.add_argument("--warmup", type=VAL_FRACTION, default=0.05, help="share of the steps warming up linearly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-classification", default=None, metavar="DATA", help="labelled set scored zero-shot every epoch")
    p.add_argument("--caption-column", default=None, help="caption column of a Hugging Face dataset")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="CUDA autocast")
    p.add_argument("--on-bad-file", choices=["error", "skip"], default="error")
    p.add_argument("--wandb", choices=WANDB_MODES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=cmd_pretrain)


def cmd_analyze(args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are only written to PNG
    from audio_residual.analysis.run import run_analysis

    ws = _open(args)
    _check_folds(ws, [args.fold], "--fold")
    _report_skipped(ws, args.out)
    result = run_analysis(
        ws,
        args.fold,
        args.out,
        tokens_per_clip=args.tokens_per_clip,
        batch_size=args.batch_size,
        ablation_stages=args.ablation_stages,
        ablation_max_clips=args.ablation_max_clips,
        pattern_cap=args.pattern_cap,
    )
    _write_provenance(args, ws)
    for name, path in result.paths.items():
        print(f"{name}: {path}")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values:
        raise argparse.ArgumentTypeError("the list is empty")
    return values


def _positive_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return sorted(set(values))


def _all_methods() -> tuple[str, ...]:
    from audio_residual.experiments.baselines import ALL_METHODS

    return ALL_METHODS


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in _all_methods()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0] if unknown else text!r}; choose from {_all_methods()}")
    return names


# train-residual options that become TrainConfig fields; an option left out takes the preset's value
# (with --preset) or TrainConfig's default, hence default None below.
TRAIN_OPTIONS = ("granularity", "kinds", "stages", "k", "evr", "init", "center", "tail", "coarse_center", "optimizer",
                 "lr", "epochs", "batch_size", "schedule", "val_fraction", "patience", "tokens_per_clip", "seed")


def _train_options(parser: argparse.ArgumentParser) -> None:
    from audio_residual.residual.units import CENTERS, COARSE_CENTERS, INITS, TAILS
    from audio_residual.training.trainer import OPTIMIZERS, PRESETS, SCHEDULES

    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper: the paper's procedure (randn, 90%% EVR, mean dropped, tail zeroed, "
                             "schedule-free AdamW lr 0.8, batch 64, ≤ 30 epochs, patience 5); options given override it")
    parser.add_argument("--granularity", choices=["layer", "block", "head"], default=None, help="default head")
    parser.add_argument("--kinds", type=lambda v: tuple(v.split(",")), default=None, help="attn (default), mlp or attn,mlp")
    parser.add_argument("--stages", type=_int_list, default=None, help="e.g. 2,3 (default: all)")
    parser.add_argument("--k", type=POSITIVE_INT, default=None, help="keep at most k components per unit")
    parser.add_argument("--evr", type=EVR, default=None, help="or the fewest reaching this explained variance")
    parser.add_argument("--init", choices=INITS, default=None, help="λ starts at 1 (ones, default) or 1 + N(0, 1)")
    parser.add_argument("--center", choices=CENTERS, default=None, help="drop: units leave without their mean (paper)")
    parser.add_argument("--tail", choices=TAILS, default=None, help="zero: remove directions outside the basis (paper)")
    parser.add_argument("--coarse", action="store_true", help="one λ per unit instead of per component")
    parser.add_argument("--coarse-center", choices=COARSE_CENTERS, default=None,
                        help="coarse λ scales the unit around its mean (default) or around 0")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adamw")
    parser.add_argument("--lr", type=POSITIVE, default=None, help="default 0.01")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=None, help="default 10")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="default cosine")
    parser.add_argument("--val-fraction", type=VAL_FRACTION, default=None, help="default 0.1")
    parser.add_argument("--patience", type=POSITIVE_INT, default=None, help="stop after N epochs without gain")
    parser.add_argument("--tokens-per-clip", type=POSITIVE_INT, default=None)
    parser.add_argument("--seed", type=int, default=None, help="default 0")
    parser.add_argument("--folds", type=_int_list, default=None, help="e.g. 1,2 (default: all)")
    parser.add_argument("--wandb", choices=WANDB_MODES, default="disabled", help=WANDB_HELP)
    parser.add_argument("--force", action="store_true", help="recompute (method, fold) rows already stored")
    parser.set_defaults(batch_size=None)  # default 32, or the preset's


def _train_config(args):
    from audio_residual.training.trainer import TrainConfig

    given = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    if args.coarse:
        given["coarse"] = True
    return TrainConfig.preset(args.preset, **given) if args.preset else TrainConfig(**given)


def cmd_train_residual(args) -> None:
    from dataclasses import asdict

    from audio_residual.evaluation.report import write_report
    from audio_residual.evaluation.store import ResultsStore
    from audio_residual.experiments.residual import train_all_folds
    from audio_residual.training.tracking import RunTracker
    from audio_residual.training.trainer import run_key

    config = _train_config(args)
    ws = _open(args)
    _check_folds(ws, args.folds or [], "--folds")
    _report_skipped(ws, args.out)
    tracker = RunTracker(args.wandb, config=asdict(config), job_type="train-residual", wandb_dir=args.out)
    layout = RunLayout(args.out)
    store = ResultsStore(layout.results)
    rows = train_all_folds(ws, config, args.out, store, folds=args.folds, force=args.force, tracker=tracker)
    tracker.finish()
    write_report(store, args.out, class_names=ws.table.class_names)
    _write_provenance(args, ws)
    columns = ["fold", "accuracy", "top5", "val_accuracy", "trainable_params", "seconds"]
    if len(ws.table.class_names) <= 5:  # top-5 of at most 5 classes is always 1
        columns.remove("top5")
    print(rows[columns].to_string(index=False))
    print(f"{config.variant} results → {layout.results}; λ and figures → {layout.run(run_key(ws, config))}")


def cmd_sweep(args) -> None:
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.sweep import (
        DEFAULT_PRESET,
        choose_per_fold,
        mean_ranking,
        presets,
        run_sweep,
    )

    config = StudyConfig.from_cli(args)
    ws = _open(args)
    _check_folds(ws, config.folds, f"--grid {args.grid}")
    _report_skipped(ws, args.out)
    frame = run_sweep(ws, args.out, config, use_wandb=args.wandb)
    _write_provenance(args, ws)
    print(mean_ranking(frame).to_string(index=False))
    for preset in presets(frame):
        for fold, options in choose_per_fold(frame, preset).items():
            named = "" if preset == DEFAULT_PRESET else f" ({preset} preset)"
            print(f"fold {fold}{named}: chosen on its own validation split: {options}")
    print(f"table → {RunLayout(args.out).sweep}")


def _transfer_targets(args) -> tuple[list[str], list]:
    """Names (data and each --transfer) and tables of the transfer datasets, read before the model loads."""
    from audio_residual.experiments.study import dataset_labels
    from audio_residual.workspace import resolve_dataset

    for data in args.transfer:
        if same_dataset(data, args.data):
            raise ValueError(f"--transfer {data}: that is the --data dataset ({args.data}); transfer needs another one")
    names = dataset_labels([args.data, *args.transfer])
    return names, [resolve_dataset(data) for data in args.transfer]


def same_dataset(a, b) -> bool:
    """Whether two --data values name one dataset: the same folder however spelled (`D/`, absolute, through
    a symlink), or the same id."""
    a_path, b_path = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    if a_path.exists() and b_path.exists():
        return a_path.resolve() == b_path.resolve()
    return str(a).rstrip("/").lower() == str(b).rstrip("/").lower()


def _report_transfer_skipped(targets: dict, out: Path) -> None:
    """OUT/skipped-<target>.csv per transfer dataset with bad files left out, counted on the console."""
    import pandas as pd

    from audio_residual.io import write_csv

    for name, target in targets.items():
        path = Path(out) / f"skipped-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.csv"
        if target.features.skipped:
            write_csv(path, pd.DataFrame(target.features.skipped, columns=["filename", "reason"]))
            print(f"transfer {name}: skipped {len(target.features.skipped)} bad file(s), listed in {path}")
        else:
            path.unlink(missing_ok=True)


def cmd_experiment(args) -> None:
    from audio_residual.evaluation.transfer import target_workspace
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.protocol import Protocol
    from audio_residual.experiments.study import run_study

    config = StudyConfig.from_cli(args)
    names, tables = _transfer_targets(args)
    ws = _open(args, other_class_names=tuple(name for table in tables for name in table.class_names))
    _check_folds(ws, config.folds, f"--grid {args.grid}")
    _check_folds(ws, [args.analysis_fold], "--analysis-fold")
    _check_trainable(ws)
    if args.shots:
        try:  # a class too small for the largest k is refused now, not after the full-data study
            Protocol(max(args.shots), 0).splits(ws)
        except ValueError as err:
            raise ValueError(f"--shots {max(args.shots)}: {err}") from None
    _report_skipped(ws, args.out)
    transfer = {
        name: target_workspace(ws, table, cache_dir=args.cache, on_bad_file=args.on_bad_file,
                               int16_roundtrip=not args.no_int16, min_seconds=args.min_seconds,
                               check=args.cache_check, workers=args.workers)  # fmt: skip
        for name, table in zip(names[1:], tables, strict=True)
    }
    _report_transfer_skipped(transfer, args.out)
    outcome = run_study(
        ws, args.out, config, use_wandb=args.wandb, analysis_options={"ablation_max_clips": args.ablation_max_clips},
        transfer=transfer, name=names[0],
    )
    _write_provenance(args, ws)
    print(outcome.table)
    print(f"report → {RunLayout(args.out).report}")


def cmd_demo(args) -> None:
    from audio_residual.demo import run_demo

    report = run_demo(args.out, seed=args.seed)
    print(report.read_text(encoding="utf-8"))
    print(f"report → {report}")


def _methods_of_saliency(text: str) -> tuple[str, ...]:
    from audio_residual.analysis.saliency import METHODS

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(METHODS))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown saliency method(s) {unknown or [text]}: choose from {','.join(METHODS)}")
    return names


def cmd_saliency(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from audio_residual.analysis.saliency import METHODS
    from audio_residual.analysis.saliency_run import run_saliency

    methods = args.methods or METHODS
    adapter = None
    if args.lambdas is not None:
        from audio_residual.residual.units import ResiDual

        if not args.lambdas.is_file():
            raise FileNotFoundError(f"--lambdas file not found: {args.lambdas}")
        adapter = ResiDual.load(args.lambdas)
    ws = _open(args)
    _check_folds(ws, [args.fold], "--fold")
    _report_skipped(ws, args.out)
    result = run_saliency(
        ws, args.fold, args.out, clips=args.clips, methods=methods, adapter=adapter, analysis=args.analysis,
        steps=args.steps, ig_tolerance=args.ig_tolerance, max_steps=args.max_steps, baseline=args.baseline,
        listen=[m for m in methods if m in args.listen], batch_size=args.batch_size,
    )
    print(result.faithfulness.to_string(index=False))
    for name, path in result.paths.items():
        print(f"{name}: {path}")


def _caption_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("captioned audio (--captions)")
    group.add_argument("--captions", action="store_true",
                       help="captioned clips (captions composed from each clip's attributes) instead of classes")
    group.add_argument("--clips", type=POSITIVE_INT, default=100, help="clips to generate with --captions")
    group.add_argument("--captions-per-clip", type=POSITIVE_INT, default=5)


def _experiment_parser(sub) -> None:
    """`experiment`: the whole study's options."""
    p = sub.add_parser("experiment", help="the whole study: analysis, sweep, ResiDual, baselines → OUT/report.md")
    _common(p)
    p.add_argument("--grid", type=Path, default=None, help="JSON {option: [values]}, 'fold' included")
    p.add_argument("--val-fraction", type=VAL_FRACTION, default=0.1)
    p.add_argument("--analysis-fold", type=int, default=1)
    p.add_argument("--ablation-max-clips", type=POSITIVE_INT, default=200)
    p.add_argument(
        "--finetune-epochs", type=NON_NEGATIVE_INT, default=0, help="> 0 adds full fine-tuning (GPU advised)"
    )
    p.add_argument("--wandb", choices=WANDB_MODES, default="auto", help=WANDB_HELP)
    p.add_argument("--methods", type=_methods, default=None,
                   help="baselines, comma-separated (default: all of " + ",".join(_all_methods()) + "); ResiDual always runs")
    p.add_argument("--shots", type=_positive_list, default=None,
                   help="k-shot protocols too, e.g. 1,2,4,8,16 training clips per class (same test folds)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=1, help="k-shot draws per k (default 1)")
    p.add_argument("--transfer", nargs="+", default=[], metavar="DATA",
                   help="other datasets (as --data) scored zero-shot with each fold's adapted encoders → transfer.csv")
    p.add_argument("--saliency-clips", type=NON_NEGATIVE_INT, default=0,
                   help="> 0: saliency maps of that many analysis-fold test clips → OUT/saliency/, a report section")
    p.set_defaults(func=cmd_experiment)


def _saliency_parser(sub) -> None:
    """`saliency`: attributions over the log-mel and their faithfulness."""
    p = sub.add_parser("saliency", help="saliency maps of test clips, faithfulness.csv, figures and wavs → OUT/")
    _common(p)
    p.add_argument("--fold", type=int, default=1, help="test fold whose clips are explained")
    p.add_argument("--clips", type=POSITIVE_INT, default=4, help="test clips to explain (seeded choice)")
    p.add_argument("--lambdas", type=Path, default=None, help="ResiDual λ file (safetensors): explain the adapted model")
    p.add_argument("--methods", type=_methods_of_saliency, default=None, help="comma-separated; default: all")
    p.add_argument("--analysis", type=Path, default=None,
                   help="folder of `analyze --fold` (same fold): head attribution on its ablation's clips")
    p.add_argument("--steps", type=POSITIVE_INT, default=64, help="Integrated Gradients steps (to start with)")
    p.add_argument("--ig-tolerance", type=POSITIVE, default=0.01,
                   help="redo IG with 2×, 4×, … steps (up to --max-steps) for clips whose attributions miss "
                        "s(x) − s(baseline) by more than this share")
    p.add_argument("--max-steps", type=POSITIVE_INT, default=1024)
    p.add_argument("--baseline", choices=["floor", "time_mean", "zeros"], default="floor",
                   help="absent-sound reference for IG, gradient × input and deletion")
    p.add_argument("--listen", type=_methods_of_saliency, default=("integrated_gradients",),
                   help="methods whose most salient cells are inverted to wavs")
    p.set_defaults(func=cmd_saliency)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-residual", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy per fold → OUT/zeroshot.csv")
    _common(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("analyze", help="unit spectra, attention-pattern PCA and head ablation of one fold → OUT/")
    _common(p)
    p.add_argument("--fold", type=int, required=True, help="test fold; statistics use the other (training) folds")
    p.add_argument("--tokens-per-clip", type=POSITIVE_INT, default=None, help="subsample tokens per clip and block")
    p.add_argument("--ablation-stages", type=_int_list, default=None, help="comma-separated stages, e.g. 2,3")
    p.add_argument(
        "--ablation-max-clips", type=POSITIVE_INT, default=None, help="evaluate ablations on at most N test clips"
    )
    p.add_argument("--pattern-cap", type=POSITIVE_INT, default=512, help="attention patterns kept per block (reservoir)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("generate-data", help="write a generated ESC-50-shaped dataset (offline)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=POSITIVE_INT, default=5)
    p.add_argument("--clips-per-class", type=POSITIVE_INT, default=10)
    p.add_argument("--seconds", type=POSITIVE, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    _caption_generation_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train-residual", help="train ResiDual λ on every fold → OUT/results.csv, λ, figures")
    _common(p)
    _train_options(p)
    p.set_defaults(func=cmd_train_residual)

    p = sub.add_parser("sweep", help="grid over λ-training options (W&B sweep when logged in, else local)")
    _common(p)
    p.add_argument("--grid", type=Path, default=None, help="JSON {option: [values]}, 'fold' included")
    p.add_argument("--val-fraction", type=VAL_FRACTION, default=0.1)
    p.add_argument("--wandb", choices=WANDB_MODES, default="auto", help=WANDB_HELP)
    p.set_defaults(func=cmd_sweep)

    _experiment_parser(sub)
    _saliency_parser(sub)
    _pretrain_parser(sub)
    add_retrieval_parser(sub, POSITIVE_INT, _device)

    p = sub.add_parser("demo", help="offline end-to-end run on generated data with the tiny model")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input and environment failures (OSError) are one line on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        for option in ("out", "cache"):
            if getattr(args, option, None) is not None:
                _check_writable(getattr(args, option), f"--{option}")
        args.func(args)
    except KeyboardInterrupt:
        print(f"audio-residual {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return INTERRUPTED_EXIT
    except (OSError, ValueError) as error:
        print(f"audio-residual {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
