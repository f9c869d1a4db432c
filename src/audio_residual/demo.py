"""The offline demo: the whole study (`audio_residual.experiments.study`) on generated data with the tiny pretrained CLAP.

Both studies run on a shift the tiny CLAP was not pretrained on: the attribute combinations held out of its
pretraining (`synthetic_captions.HELD_OUT_COMBINATIONS`), so that adaptation has something to learn. The
classes are held-out combinations named by words the model knows (e.g. `fast_low_clicks`), in pairs one
attribute apart; the retrieval clips mix held-out and seen combinations, all captioned in phrasings it never
read. Zero-shot transfer goes back to combinations it was pretrained on (retention).

The report ends with each method's test gain over zero-shot against the test split's noise (gains.csv),
paired over the test clips both are scored on: the standard error of the mean per-clip difference
(classification, McNemar's) and a paired bootstrap over test clips (retrieval). It needs no network and no
GPU; on a 2-core CPU it takes a few minutes. Besides the full-data comparison it runs a small few-shot sweep
(k = 1, 2; one draw each). The same steps run on the real model and ESC-50 with `audio-residual experiment`
(see docs/demo.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats
from threadpoolctl import threadpool_limits

from audio_residual.clap.loading import ModelSource
from audio_residual.data_processing.synthetic_captions import make_attribute_classes, make_synthetic_captions
from audio_residual.evaluation.store import ResultsStore, markdown_table, summary_table
from audio_residual.experiments.config import StudyConfig
from audio_residual.experiments.study import Study, dataset_labels
from audio_residual.io import write_csv, write_text
from audio_residual.layout import RunLayout
from audio_residual.tasks import RETRIEVAL
from audio_residual.tasks.retrieval import RetrievalRanks
from audio_residual.workspace import Workspace

DEMO_GRID = {
    "preset": ["default", "paper"],
    "granularity": ["layer", "head"],
    "lr": [0.3],
    "epochs": [10],
    "stages": [[2, 3]],  # λ on the last two stages: their input is cached once per clip (frozen prefix)
    "fold": [1, 2, 3, 4, 5],
}
DEMO_BASE = {"batch_size": 16, "val_fraction": 0.2, "schedule": "constant"}
DEMO_SHOTS = (1, 2)
# Held-out combinations (never in the tiny CLAP's pretraining), in pairs one attribute apart: rate, band.
DEMO_CLASSES = (
    {"rate": "slow", "pitch": "high", "family": "hum"},
    {"rate": "fast", "pitch": "high", "family": "hum"},
    {"rate": "slow", "pitch": "low", "family": "clicks"},
    {"rate": "fast", "pitch": "low", "family": "clicks"},
    {"pitch": "high", "band": "narrow", "family": "noise"},
    {"pitch": "high", "band": "wide", "family": "noise"},
)
# Combinations the model was pretrained on: what adapting to the shift costs there (retention).
DEMO_TRANSFER_CLASSES = ({"pitch": "low", "family": "tone"}, {"pitch": "high", "family": "tone"},
                         {"direction": "rising", "family": "chirp"})  # fmt: skip
DEMO_METHODS = ("zeroshot", "linear_probe", "contrastive_adapter", "tip_adapter", "tip_adapter_f", "coop", "lora",
                "finetune", "residual", "residual-paper", "residual_coarse")
DEMO_OPTIONS = {"lora": {"epochs": 1, "ranks": (2,)}, "tip_adapter_f": {"epochs": 5}, "coop": {"epochs": 5},
                "finetune": {"epochs": 1}}
GAINS_CSV = "gains.csv"
GAIN_COLUMNS = ["task", "method", "metric", "zeroshot", "score", "gain", "noise", "noise_kind", "n_test"]
DEMO_RETRIEVAL = StudyConfig(
    task="retrieval", shared={"epochs": 5, "batch_size": 8}, base={"epochs": 5, "batch_size": 8, "lr": 0.1},
    options={"lora": {"lr": 1e-3, "ranks": (8,)}, "finetune": {"lr": 1e-4}}, examples=2,
)


def run_demo(out: str | Path, n_classes: int = 6, clips_per_class: int = 10, seed: int = 0) -> Path:
    """Generate data, run every step, write `out/report.md` (+ results.csv, heads.csv, transfer.csv, figures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are toy-sized: more threads only hand off (15× slower under load)
    try:  # so are scikit-learn's and numpy's (the linear probe's L-BFGS on 48 clips: 17× faster on one BLAS thread)
        with threadpool_limits(1):
            return _run_demo(Path(out), n_classes, clips_per_class, seed)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, n_classes: int, clips_per_class: int, seed: int) -> Path:
    if not 2 <= n_classes <= len(DEMO_CLASSES):
        raise ValueError(f"the demo has 2..{len(DEMO_CLASSES)} classes, got {n_classes}")
    data = make_attribute_classes(out / "data", DEMO_CLASSES[:n_classes], clips_per_class=clips_per_class, seed=seed)
    other = make_attribute_classes(out / "transfer_data", DEMO_TRANSFER_CLASSES, clips_per_class=5, seed=seed + 1)
    source, target = dataset_labels([data, other])
    ws = Workspace.open(data, ModelSource("tiny", device="cpu"), cache_dir=out / "cache")
    config = StudyConfig(grid=DEMO_GRID, base=DEMO_BASE, methods=DEMO_METHODS, options=DEMO_OPTIONS,
                         shots=DEMO_SHOTS, seeds=1)
    outcome = Study(ws, out, config, name=source).run({target: ws.on(other)}, {"pattern_cap": 128})
    classification = classification_gains(outcome.store)
    retrieval, section = run_retrieval_demo(out, ws, seed=seed)
    gains = pd.concat([classification, retrieval], ignore_index=True)
    write_csv(out / GAINS_CSV, gains)
    report = append_section(RunLayout.of(out).report, section)
    return append_section(report, gains_section(gains, seed))


def run_retrieval_demo(out: Path, labelled: Workspace, seed: int = 0, n_clips: int = 100) -> tuple[pd.DataFrame, str]:
    """The retrieval study under `out/retrieval` (retention on the labelled demo data): its gains over
    zero-shot (`retrieval_gains`) and its report section.

    The clips are of every attribute combination (3 in 10 of them held out of the tiny CLAP's pretraining: its
    zero-shot retrieval finds their sound type far less often), all captioned in held-out phrasings; 30 % of
    them are the test split, so that R@1 of the test table is not a handful of clips."""
    captions = make_synthetic_captions(out / "captions_data", n_clips=n_clips, captions_per_clip=5, seed=seed,
                                       split_fractions=(0.5, 0.2, 0.3), phrasings="held_out")
    ws = Workspace.open(captions, ModelSource("tiny", device="cpu"), cache_dir=out / "cache", captions=True)
    ws.batch_size = 8
    study = Study(ws, out / "retrieval", DEMO_RETRIEVAL)
    outcome = study.run({"demo classes": ws.on(labelled.table)})
    summary = summary_table(outcome.store, task=study.task)
    (split,) = ws.splits()
    gains = retrieval_gains(outcome.store, RETRIEVAL.targets(ws, split.test), split.fold, seed=seed)
    return gains, "\n\n".join([
        "## Retrieval (generated captioned audio, tiny CLAP)",
        f"{n_clips} generated clips with 5 captions each, of every attribute combination (3 in 10 held out of the "
        f"tiny CLAP's pretraining), all captioned in phrasings it never read; official-style splits "
        f"{ws.table.counts()}; every method chosen on validation (epoch 0 included) and scored on test. "
        "Full study: `retrieval/report.md`.",
        markdown_table(summary, task=study.task),
        "Retention (zero-shot classification of the demo's labelled clips by each adapted encoder):",
        "\n".join(["| method | accuracy | plain zero-shot | retention |", "|---|---|---|---|",
                   *(f"| {r.method} | {r.accuracy:.3f} | {r.zeroshot:.3f} | {r.retention:+.3f} |"
                     for r in outcome.transfer.itertuples())]),
    ])


def classification_gains(store: ResultsStore, baseline: str = "zeroshot") -> pd.DataFrame:
    """Per method: test accuracy over every test clip (each fold's clips tested once) minus zero-shot's, and the
    standard error of that difference paired clip by clip (both methods classify the same clips): the SE of the
    mean of d = correct(method) - correct(zero-shot), sd(d) / sqrt(n) — McNemar's, from the clips the two
    disagree on. Taking the two accuracies as independent would count the clips both get right (or wrong) as noise."""
    frame = store.frame

    def correct(method: str) -> np.ndarray:
        if not store.has_arrays(method, "correct"):
            raise ValueError(f"{store.path}: {method}'s rows hold no per-clip results (stored by an older version): "
                             "run the demo into a new --out")
        folds = sorted(frame.loc[frame["method"] == method, "fold"])
        return np.concatenate([store.arrays(method, fold)["correct"] for fold in folds]).astype(float)

    base, records = correct(baseline), []
    for method in dict.fromkeys(frame["method"]):
        if method == baseline:
            continue
        difference = correct(method) - base  # same folds, same clips, same order
        n = len(difference)
        records.append({"task": "classification", "method": method, "metric": "accuracy", "zeroshot": base.mean(),
                        "score": base.mean() + difference.mean(), "gain": difference.mean(),
                        "noise": float(difference.std(ddof=1) / np.sqrt(n)), "noise_kind": "paired SE", "n_test": n})
    return pd.DataFrame.from_records(records, columns=GAIN_COLUMNS)


def _clip_hits(ranks: dict, caption_clip: np.ndarray, n_clips: int) -> tuple[np.ndarray, np.ndarray]:
    """Per test clip: how many of its captions find it first (text→audio), whether its best caption is first."""
    t2a = np.bincount(caption_clip, weights=ranks["t2a_ranks"] == 0, minlength=n_clips)
    best = RetrievalRanks(ranks["t2a_ranks"], ranks["a2t_ranks"], caption_clip, n_clips).best_a2t()
    return t2a, (best == 0).astype(float)


def retrieval_gains(store: ResultsStore, caption_clip, fold: int, baseline: str = "zeroshot", seed: int = 0,
                    resamples: int = 2000) -> pd.DataFrame:
    """Per method: test mean R@1 (the mean of both directions' R@1) minus zero-shot's, and its noise: the
    standard error of that difference under a paired bootstrap over test clips (each resampled clip brings
    its captions, scored by both methods; `scipy.stats.bootstrap`). `caption_clip` is the test split's of `fold`."""
    caption_clip = np.asarray(caption_clip)
    n_clips, counts = int(caption_clip.max()) + 1, np.bincount(caption_clip)
    t2a0, a2t0 = _clip_hits(store.arrays(baseline, fold), caption_clip, n_clips)

    def difference(t2a, a2t, base_t2a, base_a2t, n_captions, axis=-1):
        captions = n_captions.sum(axis)
        return ((t2a.sum(axis) - base_t2a.sum(axis)) / captions + (a2t - base_a2t).mean(axis)) / 2

    records = []
    for method in dict.fromkeys(store.frame["method"]):
        if method == baseline:
            continue
        t2a, a2t = _clip_hits(store.arrays(method, fold), caption_clip, n_clips)
        gain = float(difference(t2a, a2t, t2a0, a2t0, counts))
        boot = stats.bootstrap((t2a, a2t, t2a0, a2t0, counts), difference, paired=True, vectorized=True,
                               n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed))
        zeroshot = (t2a0.sum() / counts.sum() + a2t0.mean()) / 2
        records.append({"task": "retrieval", "method": method, "metric": "mean_r1", "zeroshot": zeroshot,
                        "score": zeroshot + gain, "gain": gain, "noise": float(boot.standard_error),
                        "noise_kind": "paired bootstrap SE", "n_test": n_clips})
    return pd.DataFrame.from_records(records, columns=GAIN_COLUMNS)


def gains_section(gains: pd.DataFrame, seed: int) -> str:
    """The report's comparison: each method's test gain over zero-shot beside its noise, and the best one."""
    lines = ["## Gain over zero-shot on test, against the test split's noise", "",
             "Both methods are scored on the same test clips, so the noise is that of a paired difference. "
             "Classification: accuracy over every test clip (each fold's test clips, each clip once); noise = the "
             "standard error of the mean per-clip difference (method right − zero-shot right), McNemar's: only "
             "the clips the two disagree on count. Retrieval: mean R@1 of both directions on the test split; "
             "noise = the standard error of the difference under a paired bootstrap over test clips (each "
             f"with its captions; 2000 resamples, seed {seed}). A gain counts where it exceeds twice its noise.", "",
             "| task | method | zero-shot | method's score | gain | noise (SE) | gain / SE | test clips |",
             "|---|---|---|---|---|---|---|---|"]
    for r in gains.itertuples():
        ratio = f"{r.gain / r.noise:+.1f}" if r.noise > 0 else "—"  # no noise: the same answer on every clip
        lines.append(f"| {r.task} | {r.method} | {r.zeroshot:.3f} | {r.score:.3f} | {r.gain:+.3f} | {r.noise:.3f} "
                     f"| {ratio} | {r.n_test} |")
    lines.append("")
    for task, rows in gains.groupby("task", sort=False):
        best = rows.loc[(rows["gain"] - 2 * rows["noise"]).idxmax()]
        figures = f"{best['gain']:+.3f} {best['metric']} (noise {best['noise']:.3f}, {best['noise_kind']})"
        if best["gain"] > 2 * best["noise"]:
            lines.append(f"- {task}: {best['method']} beats zero-shot by {figures}: more than twice its noise.")
        else:
            lines.append(f"- {task}: no method beats zero-shot by more than twice its noise; closest to it "
                         f"(largest gain − 2 SE): {best['method']}, {figures}.")
    return "\n".join(lines)


def append_section(report: Path, section: str) -> Path:
    return write_text(report, report.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + section + "\n")
