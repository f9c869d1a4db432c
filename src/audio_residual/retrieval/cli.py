"""`audio-residual retrieval`: the retrieval study from the command line (added to the main parser)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _methods(text: str) -> tuple[str, ...]:
    from audio_residual.retrieval.study import METHODS

    names = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or [text]}; choose from {','.join(METHODS)}")
    return names


def add_retrieval_parser(sub, positive_int, device) -> None:
    p = sub.add_parser("retrieval", help="audio-text retrieval study on captioned audio → OUT/retrieval.csv, report")
    p.add_argument("--data", required=True,
                   help="captioned audio: a Clotho or AudioCaps folder, a folder with captions.csv, or hf:OWNER/NAME")
    p.add_argument("--model", default="laion/clap-htsat-unfused", help="hub id, local folder, or 'tiny' (offline)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="feature cache folder")
    p.add_argument("--methods", type=_methods, default=None,
                   help="comma-separated (zero-shot always); default all but residual-paper (the paper preset)")
    p.add_argument("--retention", default=None, metavar="DATA",
                   help="a labelled dataset (as for zeroshot --data): adapted encoders' zero-shot accuracy on it")
    p.add_argument("--text-model", default=None,
                   help="the linear projection's frozen text encoder (HF name or folder); default CLAP's own tower")
    p.add_argument("--projection-source", choices=["embedding", "pooled"], default="embedding")
    p.add_argument("--learn-temperature", action="store_true", help="train the projection's temperature")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device, default="auto", help="auto, cuda, cuda:N, mps or cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="CUDA autocast")
    p.add_argument("--on-bad-file", choices=["error", "skip"], default="error")
    p.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], default="disabled",
                   help="log every method's epochs to W&B (auto: online when logged in)")
    p.set_defaults(func=cmd_retrieval)


def cmd_retrieval(args) -> None:
    from audio_residual.data_processing.features import FeatureCache
    from audio_residual.retrieval.data import AudioSource, RetrievalData
    from audio_residual.retrieval.study import (
        DEFAULT_METHODS,
        RetrievalStudyConfig,
        describe_missing,
        run_retrieval_study,
    )
    from audio_residual.workspace import resolve_dataset

    methods = args.methods or DEFAULT_METHODS
    methods = ("zero-shot", *[m for m in methods if m != "zero-shot"])
    config = RetrievalStudyConfig(methods=methods, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                  text_model=args.text_model, projection_source=args.projection_source,
                                  learn_temperature=args.learn_temperature, wandb=args.wandb)
    data = RetrievalData.open(args.data, args.model, cache_dir=args.cache, device=args.device, amp=args.amp,
                              on_bad_file=args.on_bad_file, batch_size=args.batch_size)
    print(describe_missing(data))
    retention = None
    if args.retention is not None:
        labelled = resolve_dataset(args.retention)
        cache = FeatureCache(args.cache, data.bundle.feature_extractor)
        features = cache.compute(labelled, on_bad_file=args.on_bad_file)
        retention = (AudioSource(data.bundle, features, args.batch_size), labelled)
    outcome = run_retrieval_study(data, args.out, config, retention)
    print(outcome.table[["method", "direction", "r1", "r5", "r10", "map10", "random_r1", "trainable_params",
                         "seconds"]].to_string(index=False))
    print(f"report → {Path(args.out) / 'report.md'}")
