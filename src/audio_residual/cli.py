"""`audio-residual` command line: the notebooks' steps, headless."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from audio_residual.clap.loading import DEFAULT_MODEL


def _common(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    parser.add_argument("--data", required=data_required, help="dataset folder (ESC-50, UrbanSound8K) or 'esc50'")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or 'tiny' (offline)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="CUDA autocast")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--on-bad-file", choices=["error", "skip"], default="error")
    parser.add_argument("--no-int16", action="store_true", help="skip LAION's int16 round trip of the audio")
    parser.add_argument("--template", action="append", help="prompt template with {label}; repeat to ensemble")


def _open(args):
    from audio_residual.clap.classifier import DEFAULT_TEMPLATES
    from audio_residual.experiment import Experiment

    return Experiment.open(
        args.data,
        model=args.model,
        cache_dir=args.cache,
        device=args.device,
        amp=args.amp,
        on_bad_file=args.on_bad_file,
        int16_roundtrip=not args.no_int16,
        templates=tuple(args.template or DEFAULT_TEMPLATES),
    )


def _report_skipped(exp, out: Path) -> None:
    import pandas as pd

    from audio_residual.io import write_csv

    skipped = exp.features.skipped
    if skipped:
        write_csv(out / "skipped.csv", pd.DataFrame(skipped, columns=["filename", "reason"]))
        print(f"skipped {len(skipped)} bad file(s), listed in {out / 'skipped.csv'}")


def cmd_zeroshot(args) -> None:
    from audio_residual.evaluation.zeroshot import summarize, zero_shot_by_fold
    from audio_residual.io import write_csv

    exp = _open(args)
    frame = zero_shot_by_fold(exp, batch_size=args.batch_size)
    path = write_csv(args.out / "zeroshot.csv", frame)
    _report_skipped(exp, args.out)
    print(frame.to_string(index=False))
    print(summarize(frame), f"→ {path}")


def cmd_generate(args) -> None:
    from audio_residual.data_processing import make_synthetic_esc50

    path = make_synthetic_esc50(
        args.out, n_classes=args.classes, clips_per_class=args.clips_per_class, seconds=args.seconds, seed=args.seed
    )
    print(f"generated ESC-50-shaped data in {path}")


def cmd_analyze(args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: figures are only written to PNG
    from audio_residual.analysis.run import run_analysis

    exp = _open(args)
    result = run_analysis(
        exp,
        args.fold,
        args.out,
        tokens_per_clip=args.tokens_per_clip,
        batch_size=args.batch_size,
        ablation_stages=args.ablation_stages,
        ablation_max_clips=args.ablation_max_clips,
        pattern_cap=args.pattern_cap,
    )
    _report_skipped(exp, args.out)
    for name, path in result["paths"].items():
        print(f"{name}: {path}")


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def cmd_demo(args) -> None:
    from audio_residual.demo import run_demo

    report = run_demo(args.out, seed=args.seed)
    print(report.read_text(encoding="utf-8"))
    print(f"report → {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audio-residual", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy per fold → OUT/zeroshot.csv")
    _common(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("analyze", help="unit spectra, attention-pattern PCA and head ablation of one fold → OUT/")
    _common(p)
    p.add_argument("--fold", type=int, required=True, help="test fold; statistics use the other (training) folds")
    p.add_argument("--tokens-per-clip", type=int, default=None, help="subsample tokens per clip and block")
    p.add_argument("--ablation-stages", type=_int_list, default=None, help="comma-separated stages, e.g. 2,3")
    p.add_argument("--ablation-max-clips", type=int, default=None, help="evaluate ablations on at most N test clips")
    p.add_argument("--pattern-cap", type=int, default=512, help="attention patterns kept per block (reservoir)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("generate-data", help="write a generated ESC-50-shaped dataset (offline)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--clips-per-class", type=int, default=10)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="offline end-to-end run on generated data with the tiny model")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"audio-residual {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
