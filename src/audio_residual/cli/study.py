"""The study commands: `experiment` and `retrieval` (the whole study of a task), `sweep` (ResiDual's grid),
`train-residual` (one ResiDual configuration on every fold) and `zeroshot`. All of them run the one study runner
(`experiments.study.Study`) on a workspace built from the shared options (`cli.options`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from audio_residual.cli import options as opt
from audio_residual.layout import RunLayout

# train-residual options that become TrainConfig fields; an option left out takes the preset's value (with
# --preset) or TrainConfig's default, hence default None below.
TRAIN_OPTIONS = ("granularity", "kinds", "stages", "k", "evr", "init", "center", "tail", "coarse_center", "optimizer",
                 "lr", "epochs", "batch_size", "schedule", "val_fraction", "patience", "tokens_per_clip", "seed")


def transfer_targets(args, ws) -> tuple[str, dict]:
    """The study's name and each --transfer dataset on its model and audio configuration (`Workspace.on`), named
    alike so that "A → B" rows and the matrix line up; a target's skipped files are listed in
    OUT/skipped-<name>.csv (the study's own dataset was refused by `transfer_class_names`)."""
    from audio_residual.experiments.study import dataset_labels
    from audio_residual.workspace import write_skipped

    name, *names = dataset_labels([args.data, *args.transfer])
    targets = {label: ws.on(data) for label, data in zip(names, args.transfer, strict=True)}
    for label, target in targets.items():
        write_skipped(target, args.out, label)
    return name, targets


def transfer_class_names(args) -> tuple[str, ...]:
    """The transfer datasets' class names, read before the model loads (the offline random model's tokenizer);
    the study's own dataset is refused here, before any work."""
    from audio_residual.data_processing.sources import resolve_dataset

    for data in args.transfer:
        if same_dataset(data, args.data):
            raise ValueError(f"--transfer {data}: that is the --data dataset ({args.data}); transfer needs another one")
    return tuple(name for data in args.transfer for name in resolve_dataset(data).class_names)


def same_dataset(a, b) -> bool:
    """Whether two --data values name one dataset: the same folder however spelled (`D/`, absolute, through a
    symlink), or the same id."""
    a_path, b_path = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    if a_path.exists() and b_path.exists():
        return a_path.resolve() == b_path.resolve()
    return str(a).rstrip("/").lower() == str(b).rstrip("/").lower()


def cmd_zeroshot(args) -> None:
    from audio_residual.evaluation.zeroshot import summarize, zero_shot_by_fold
    from audio_residual.io import write_csv
    from audio_residual.workspace import write_skipped

    ws = opt.open_workspace(args)
    print("provenance:", json.dumps(ws.provenance()))
    write_skipped(ws, args.out)
    frame = zero_shot_by_fold(ws)
    path = write_csv(RunLayout(args.out).zeroshot, frame)
    opt.write_provenance(args, ws)
    print(frame.to_string(index=False))
    print(summarize(frame), f"→ {path}")


def cmd_experiment(args) -> None:
    from audio_residual.data_processing.folds import check_classes_trainable
    from audio_residual.experiments.protocol import Protocol
    from audio_residual.experiments.study import Study
    from audio_residual.workspace import write_skipped

    config = opt.study_config(args, "classification", analysis_fold=args.analysis_fold, shots=args.shots or (),
                              seeds=args.seeds, saliency_clips=args.saliency_clips)
    ws = opt.open_workspace(args, other_class_names=transfer_class_names(args))
    opt.check_folds(ws, config.folds, f"--grid {args.grid}")
    opt.check_folds(ws, [args.analysis_fold], "--analysis-fold")
    check_classes_trainable(ws.table, ws.features.valid)  # a class in one fold only: refused before the work
    if args.shots:
        try:  # a class too small for the largest k is refused now, not after the full-data study
            Protocol(max(args.shots), 0).splits(ws)
        except ValueError as err:
            raise ValueError(f"--shots {max(args.shots)}: {err}") from None
    write_skipped(ws, args.out)
    name, targets = transfer_targets(args, ws)
    study = Study(ws, args.out, config, wandb=args.wandb, name=name)
    outcome = study.run(targets, {"ablation_max_clips": args.ablation_max_clips})
    opt.write_provenance(args, ws)
    print(outcome.table)
    print(f"report → {RunLayout(args.out).report}")


def cmd_retrieval(args) -> None:
    from audio_residual.experiments.study import Study
    from audio_residual.workspace import write_skipped

    config = opt.study_config(args, "retrieval", examples=args.examples)
    ws = opt.open_workspace(args, captions=True, other_class_names=transfer_class_names(args))
    table = ws.table
    print(f"{table.name}: {len(table)} clips ({json.dumps(table.counts())}); {len(table.missing)} listed but missing, "
          f"{len(ws.features.skipped)} skipped as bad audio, {len(ws.duplicates)} duplicate audio file(s) within a "
          "split")
    write_skipped(ws, args.out)
    name, targets = transfer_targets(args, ws)
    outcome = Study(ws, args.out, config, wandb=args.wandb, name=name).run(targets)
    opt.write_provenance(args, ws)
    print(outcome.table)
    print(f"report → {RunLayout(args.out).report}")


def cmd_sweep(args) -> None:
    from audio_residual.experiments.study import Study
    from audio_residual.experiments.sweep import DEFAULT_PRESET, choose_per_fold, mean_ranking, presets
    from audio_residual.workspace import write_skipped

    config = opt.study_config(args, "classification")
    ws = opt.open_workspace(args)
    opt.check_folds(ws, config.folds, f"--grid {args.grid}")
    write_skipped(ws, args.out)
    frame = Study(ws, args.out, config, wandb=args.wandb).sweep()
    opt.write_provenance(args, ws)
    print(mean_ranking(frame).to_string(index=False))
    for preset in presets(frame):
        for fold, options in choose_per_fold(frame, preset).items():
            named = "" if preset == DEFAULT_PRESET else f" ({preset} preset)"
            print(f"fold {fold}{named}: chosen on its own validation split: {options}")
    print(f"table → {RunLayout(args.out).sweep}")


def train_config(args):
    from audio_residual.training.trainer import TrainConfig

    given = {name: getattr(args, name) for name in TRAIN_OPTIONS if getattr(args, name) is not None}
    if args.coarse:
        given["coarse"] = True
    return TrainConfig.preset(args.preset, **given) if args.preset else TrainConfig(**given)


def cmd_train_residual(args) -> None:
    """ResiDual at one configuration on every fold: the registered method with a grid of one point."""
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.study import Study
    from audio_residual.workspace import write_skipped

    config = train_config(args)
    ws = opt.open_workspace(args)
    opt.check_folds(ws, args.folds or [], "--folds")
    write_skipped(ws, args.out)
    base = asdict(config)
    study_config = StudyConfig(methods=("residual",), grid={}, base=base, seed=config.seed)
    study = Study(ws, args.out, study_config, wandb=args.wandb)
    store = study.methods(force=args.force, folds=args.folds)
    table = study.report()
    opt.write_provenance(args, ws)
    rows = store.frame
    columns = ["fold", "accuracy", "top5", "val_score", "trainable_params", "seconds"]
    if len(ws.table.class_names) <= 5:  # top-5 of at most 5 classes is always 1
        columns.remove("top5")
    print(rows[columns].to_string(index=False))
    print(table)
    print(f"{config.variant} results → {RunLayout(args.out).results}; λ and figures → {RunLayout(args.out).root / 'runs'}")


# --- parsers ---------------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot accuracy per fold → OUT/zeroshot.csv")
    opt.common(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("experiment", help="the whole classification study: analysis, sweep, every method → "
                                          "OUT/report.md")
    opt.common(p)
    opt.study(p, "classification")
    p.add_argument("--analysis-fold", type=int, default=1)
    p.add_argument("--ablation-max-clips", type=opt.POSITIVE_INT, default=200)
    p.add_argument("--shots", type=opt.positive_list, default=None,
                   help="k-shot protocols too, e.g. 1,2,4,8,16 training clips per class (same test folds)")
    p.add_argument("--seeds", type=opt.POSITIVE_INT, default=1, help="k-shot draws per k (default 1)")
    p.add_argument("--saliency-clips", type=opt.NON_NEGATIVE_INT, default=0,
                   help="> 0: saliency maps of that many analysis-fold test clips → OUT/saliency/, a report section")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("retrieval", help="the whole audio-text retrieval study on captioned audio → "
                                         "OUT/retrieval.csv, OUT/report.md")
    opt.common(p, captions=True)
    opt.study(p, "retrieval")
    p.add_argument("--examples", type=opt.NON_NEGATIVE_INT, default=3, help="test clips listed with their top captions")
    p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("sweep", help="ResiDual's grid on every fold (W&B sweep when logged in, else local)")
    opt.common(p)
    opt.study(p, "classification")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("train-residual", help="one ResiDual configuration on every fold → OUT/results.csv, λ, figures")
    opt.common(p)
    _train_options(p)
    p.set_defaults(func=cmd_train_residual)


def _train_options(parser: argparse.ArgumentParser) -> None:
    from audio_residual.residual.units import CENTERS, COARSE_CENTERS, INITS, TAILS
    from audio_residual.training.encoder import OPTIMIZERS
    from audio_residual.training.trainer import PRESETS, SCHEDULES

    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="paper: the paper's procedure (randn, 90%% EVR, mean dropped, tail zeroed, "
                             "schedule-free AdamW lr 0.8, batch 64, ≤ 30 epochs, patience 5); options given override it")
    parser.add_argument("--granularity", choices=["layer", "block", "head"], default=None, help="default head")
    parser.add_argument("--kinds", type=lambda v: tuple(v.split(",")), default=None, help="attn (default), mlp or attn,mlp")
    parser.add_argument("--stages", type=opt.int_list, default=None, help="e.g. 2,3 (default: all)")
    parser.add_argument("--k", type=opt.POSITIVE_INT, default=None, help="keep at most k components per unit")
    parser.add_argument("--evr", type=opt.EVR, default=None, help="or the fewest reaching this explained variance")
    parser.add_argument("--init", choices=INITS, default=None, help="λ starts at 1 (ones, default) or 1 + N(0, 1)")
    parser.add_argument("--center", choices=CENTERS, default=None, help="drop: units leave without their mean (paper)")
    parser.add_argument("--tail", choices=TAILS, default=None, help="zero: remove directions outside the basis (paper)")
    parser.add_argument("--coarse", action="store_true", help="one λ per unit instead of per component")
    parser.add_argument("--coarse-center", choices=COARSE_CENTERS, default=None,
                        help="coarse λ scales the unit around its mean (default) or around 0")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adamw")
    parser.add_argument("--lr", type=opt.POSITIVE, default=None, help="default 0.01")
    parser.add_argument("--epochs", type=opt.POSITIVE_INT, default=None, help="default 10")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="default cosine")
    parser.add_argument("--val-fraction", type=opt.FRACTION, default=None, help="default 0.1")
    parser.add_argument("--patience", type=opt.POSITIVE_INT, default=None, help="stop after N epochs without gain")
    parser.add_argument("--tokens-per-clip", type=opt.POSITIVE_INT, default=None)
    parser.add_argument("--seed", type=opt.SEED, default=None, help="default 0")
    parser.add_argument("--folds", type=opt.int_list, default=None, help="e.g. 1,2 (default: all)")
    opt.wandb(parser)
    parser.add_argument("--force", action="store_true", help="recompute (method, fold) rows already stored")
    parser.set_defaults(batch_size=None)  # default 32, or the preset's
