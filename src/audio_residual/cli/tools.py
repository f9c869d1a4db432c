"""The other commands: `analyze` and `stats` (one fold's unit statistics; `stats` shards them over `torchrun`
processes), `saliency`, `pretrain`, `generate-data` and `demo`, on the shared options (`cli.options`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from audio_residual.cli import options as opt


def cmd_analyze(args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are only written to PNG
    from audio_residual.analysis.run import run_analysis
    from audio_residual.workspace import write_skipped

    ws = opt.open_workspace(args)
    opt.check_folds(ws, [args.fold], "--fold")
    write_skipped(ws, args.out)
    result = run_analysis(ws, args.fold, args.out, tokens_per_clip=args.tokens_per_clip, batch_size=args.batch_size,
                          ablation_stages=args.ablation_stages, ablation_max_clips=args.ablation_max_clips,
                          pattern_cap=args.pattern_cap)  # fmt: skip
    opt.write_provenance(args, ws)
    for name, path in result.paths.items():
        print(f"{name}: {path}")


def cmd_stats(args) -> None:
    """One fold's statistics; under `torchrun`, every process extracts and fits its share."""
    from audio_residual.analysis.distributed_stats import sharded_statistics

    path = sharded_statistics(args.data, args.fold, args.out, opt.model_source(args), opt.audio_config(args),
                              args.cache, args.batch_size)
    if path is not None:
        print(f"statistics of fold {args.fold} → {path}")


def _methods_of_saliency(text: str) -> tuple[str, ...]:
    from audio_residual.analysis.saliency import METHODS

    names = opt.names(text)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown saliency method(s) {unknown}: choose from {','.join(METHODS)}")
    return names


def _listen_methods(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else _methods_of_saliency(text)


def cmd_saliency(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from audio_residual.analysis.saliency import METHODS
    from audio_residual.analysis.saliency_lambdas import check_lambda_record, read_lambdas
    from audio_residual.analysis.saliency_report import AdapterError
    from audio_residual.analysis.saliency_run import SaliencyConfig, run_saliency
    from audio_residual.workspace import write_skipped

    methods = args.methods or METHODS
    config = SaliencyConfig(clips=args.clips, methods=methods, baseline=args.baseline, steps=args.steps,
                            ig_tolerance=args.ig_tolerance, max_steps=args.max_steps, min_change=args.min_change,
                            listen=tuple(m for m in methods if m in args.listen), batch_size=args.batch_size,
                            seed=args.seed)
    adapter = metadata = None
    if args.lambdas is not None:
        from audio_residual.residual.units import ResiDual

        adapter, metadata = read_lambdas(args.lambdas, ResiDual.load)  # before any work: a bad file fails now
    ws = opt.open_workspace(args)
    opt.check_folds(ws, [args.fold], "--fold")
    if adapter is not None:
        check_lambda_record(metadata, ws, args.fold, args.lambdas)
    write_skipped(ws, args.out)
    try:
        result = run_saliency(ws, args.fold, args.out, config, adapter=adapter, analysis=args.analysis)
    except AdapterError as error:
        raise ValueError(f"--lambdas {args.lambdas}: {error}") from None
    columns = ["method", "baseline", "clips", "clips_normalised", "deletion_nauc", "deletion_nauc_random",
               "insertion_nauc", "insertion_nauc_random", "beats_random", "differs_from_randomised"]
    table = result.faithfulness
    print(table[[c for c in columns if c in table]].to_string(index=False))
    for name, path in result.paths.items():
        print(f"{name}: {path}")


# What goes with `pretrain --preset`: every other option would change the run the preset names (data, start,
# training, audio path, logging), so it is refused rather than applied or ignored: the preset's provenance and
# documented figures describe its own run only, and the same options without --preset train with them.
WITH_PRESET = ("preset", "out", "seed", "device")


class _Given(argparse.Action):
    """`store`, noting the option as given on the command line (`args.given`): a preset refuses the others."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = (*namespace.given, self.dest)


class _GivenFlag(_Given):
    """`store_true`, noted likewise."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, self.const, option_string)


def cmd_pretrain(args) -> None:
    """Pretraining; under torchrun, data-parallel over its processes (NCCL on GPUs, gloo on CPUs)."""
    from datetime import timedelta

    from audio_residual.clap.loading import resolve_device
    from audio_residual.data_processing.sources import load_table
    from audio_residual.training.distributed import Ranks, process_group
    from audio_residual.training.pretrain import PretrainConfig
    from audio_residual.training.pretrain_run import PretrainRun, PretrainSource, pretrain

    if args.preset is not None:
        from audio_residual.training.pretrain_preset import run_preset

        refused = [f"--{name.replace('_', '-')}" for name in dict.fromkeys(args.given) if name not in WITH_PRESET]
        if refused:
            raise ValueError(f"--preset {args.preset} fixes its data and training options: drop {', '.join(refused)} "
                             "(or drop --preset to train with them)")

        path = run_preset(args.preset, args.out, seed=args.seed, device=args.device)
        print(f"pretrained CLAP ({args.preset} preset) → {path}")
        return
    if args.data is None:
        raise ValueError("give --data (captioned audio) or --preset tiny")
    if args.model is not None and args.config is not None:
        raise ValueError("give --config (from scratch) or --model (continue training), not both")
    table = load_table(args.data, captions=True, caption_column=args.caption_column)
    config = PretrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, accumulate=args.accumulate, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, freeze=args.freeze, seed=args.seed,
        all_captions=args.all_captions,
    )  # fmt: skip
    source = PretrainSource(config=None if args.model else (args.config or "tiny"),
                            model=opt.model_source(args) if args.model else None, tokenizer=args.tokenizer)
    run = PretrainRun(args.out, cache_dir=args.cache, audio=opt.audio_config(args), device=args.device, amp=args.amp,
                      wandb=args.wandb, eval_classification=args.eval_classification,
                      extra_provenance={"data_source": str(args.data)})  # fmt: skip
    with process_group(resolve_device(args.device).type == "cuda", timedelta(seconds=args.dist_timeout)):
        path = pretrain(table, source, config, run)
        if Ranks.current().main:
            print(f"pretrained CLAP → {path} (use it as --model {path})")


def cmd_generate(args) -> None:
    if args.captions:
        from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

        path = make_synthetic_captions(args.out, n_clips=args.clips, captions_per_clip=args.captions_per_clip,
                                       seconds=args.seconds, seed=args.seed)
        print(f"generated captioned audio (captions.csv: filename,caption,split) in {path}")
        return
    from audio_residual.data_processing import make_synthetic_esc50

    path = make_synthetic_esc50(args.out, n_classes=args.classes, clips_per_class=args.clips_per_class,
                                seconds=args.seconds, seed=args.seed)
    print(f"generated ESC-50-shaped data in {path}")


def cmd_demo(args) -> None:
    from audio_residual.demo import run_demo

    report = run_demo(args.out, seed=args.seed)
    print(report.read_text(encoding="utf-8"))
    print(f"report → {report}")


# --- parsers ---------------------------------------------------------------------------------------------------
def add_parsers(sub) -> None:
    p = sub.add_parser("analyze", help="unit spectra, attention-pattern PCA and head ablation of one fold → OUT/")
    opt.common(p)
    p.add_argument("--fold", type=int, required=True, help="test fold; statistics use the other (training) folds")
    p.add_argument("--tokens-per-clip", type=opt.POSITIVE_INT, default=None, help="subsample tokens per clip and block")
    p.add_argument("--ablation-stages", type=opt.int_list, default=None, help="comma-separated stages, e.g. 2,3")
    p.add_argument("--ablation-max-clips", type=opt.POSITIVE_INT, default=None,
                   help="evaluate ablations on at most N test clips")
    p.add_argument("--pattern-cap", type=opt.POSITIVE_INT, default=512, help="attention patterns kept per block")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("stats", help="one fold's unit statistics, sharded over torchrun processes → "
                                     "OUT/stats_fold<K>.safetensors")
    opt.common(p)
    p.add_argument("--fold", type=int, default=1, help="statistics of this fold's training clips")
    p.set_defaults(func=cmd_stats)

    _saliency_parser(sub)
    _pretrain_parser(sub)

    p = sub.add_parser("generate-data", help="write a generated ESC-50-shaped dataset (offline)")
    opt.output(p)
    p.add_argument("--classes", type=opt.POSITIVE_INT, default=5)
    p.add_argument("--clips-per-class", type=opt.POSITIVE_INT, default=10)
    p.add_argument("--seconds", type=opt.POSITIVE, default=5.0)
    p.add_argument("--seed", type=opt.SEED, default=0)
    group = p.add_argument_group("captioned audio (--captions)")
    group.add_argument("--captions", action="store_true",
                       help="captioned clips (captions composed from each clip's attributes) instead of classes")
    group.add_argument("--clips", type=opt.POSITIVE_INT, default=100, help="clips to generate with --captions")
    group.add_argument("--captions-per-clip", type=opt.POSITIVE_INT, default=5)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="offline end-to-end run on generated data with the tiny model")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=opt.SEED, default=0)
    p.set_defaults(func=cmd_demo)


def _saliency_parser(sub) -> None:
    from audio_residual.analysis.faithfulness import MIN_CHANGE
    from audio_residual.analysis.saliency_baselines import BASELINES, DEFAULT_BASELINE

    p = sub.add_parser("saliency", help="saliency maps of test clips, faithfulness.csv, figures and wavs → OUT/")
    opt.common(p)
    p.add_argument("--fold", type=int, default=1, help="test fold whose clips are explained")
    p.add_argument("--clips", type=opt.POSITIVE_INT, default=4, help="test clips to explain (seeded choice)")
    p.add_argument("--seed", type=opt.SEED, default=0,
                   help="which clips, the random deletion orders, SmoothGrad's noise, the randomised model")
    p.add_argument("--lambdas", type=Path, default=None, help="ResiDual λ file (safetensors): explain the adapted model")
    p.add_argument("--methods", type=_methods_of_saliency, default=None, help="comma-separated; default: all")
    p.add_argument("--analysis", type=Path, default=None,
                   help="folder of `analyze --fold` (same fold): head attribution on its ablation's clips")
    p.add_argument("--steps", type=opt.POSITIVE_INT, default=64, help="Integrated Gradients steps (to start with)")
    p.add_argument("--ig-tolerance", type=opt.POSITIVE, default=0.01,
                   help="redo IG with 2×, 4×, … steps (up to --max-steps) for clips whose attributions miss "
                        "s(x) − s(baseline) by more than this share of it (clips still missing at --max-steps are "
                        "kept and listed in summary.json)")
    p.add_argument("--max-steps", type=opt.POSITIVE_INT, default=1024)
    p.add_argument("--baseline", choices=BASELINES, default=DEFAULT_BASELINE,
                   help="reference log-mel for IG, gradient × input and deletion (docs/saliency.md): neutral = the "
                        "training mean spectrum moved until the model reads it as no class")
    p.add_argument("--min-change", type=opt.POSITIVE, default=MIN_CHANGE,
                   help="clips with s(x) − s(baseline) below this (logits) are flagged, not normalised or tested")
    p.add_argument("--listen", type=_listen_methods, default=("integrated_gradients",),
                   help="methods whose most salient cells are inverted to wavs, with the clip itself (none: no wavs; "
                        "each inversion costs seconds)")
    p.set_defaults(func=cmd_saliency)


def _pretrain_parser(sub) -> None:
    from audio_residual.training.pretrain import CONFIGS, FREEZE

    p = sub.add_parser("pretrain", help="train a CLAP contrastively on captioned audio → OUT/model (a --model folder)")
    for action in (None, "store"):  # every option notes itself as given (`_Given`), for --preset to check
        p.register("action", action, _Given)
    p.register("action", "store_true", _GivenFlag)
    p.set_defaults(given=())
    opt.data(p, captions=True, required=False)
    opt.output(p)
    opt.model(p, default=None)
    opt.audio(p)
    opt.batch(p)
    opt.wandb(p)
    p.add_argument("--preset", choices=["tiny"], default=None,
                   help="tiny: the shipped tiny CLAP's run (generated data); only --out, --seed and --device go with it")
    p.add_argument("--config", choices=CONFIGS, default=None, help="train from scratch at this size (default tiny)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for htsat sizes (none can be downloaded offline)")
    p.add_argument("--freeze", choices=FREEZE, default="none")
    p.add_argument("--all-captions", action="store_true",
                   help="every caption of a clip in its step (multi-positive loss), not one drawn per step")
    p.add_argument("--epochs", type=opt.POSITIVE_INT, default=10)
    p.add_argument("--accumulate", type=opt.POSITIVE_INT, default=1,
                   help="micro-batches of --batch-size clips per step: the loss is over all of them, each embedded "
                        "in turn (memory of one micro-batch)")
    p.add_argument("--lr", type=opt.POSITIVE, default=1e-4)
    p.add_argument("--weight-decay", type=opt.NON_NEGATIVE, default=0.2)
    p.add_argument("--warmup", type=opt.FRACTION, default=0.05, help="share of the steps warming up linearly")
    p.add_argument("--seed", type=opt.SEED, default=0)
    p.add_argument("--eval-classification", default=None, metavar="DATA", help="labelled set scored zero-shot every epoch")
    p.add_argument("--dist-timeout", type=opt.POSITIVE, default=1800.0, metavar="SECONDS",
                   help="under torchrun: a process that waits this long for the others stops the job")
    p.set_defaults(func=cmd_pretrain)
