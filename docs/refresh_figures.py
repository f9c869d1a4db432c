"""Refresh the figures and the demo table the docs show, from one run of `audio-residual demo`.

    make demo && make docs-figures                      # = python docs/refresh_figures.py runs/demo

It copies the demo's figures into docs/figures/demo/ (the headline figure README shows, and what each notebook
step produces, labelled in the docs as the demo configuration), draws HTSAT-tiny's architecture from
transformers' default ClapConfig into docs/figures/htsat_tiny.png (no weights needed), and rewrites the table
between README's DEMO_TABLE markers from the run's summary.csv, few_shot.csv and, when the demo writes it,
gains.csv. Nothing else is touched; the figures hold no machine path (only their titles and axes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
DEMO_FIGURES = FIGURES / "demo"
README = ROOT / "README.md"
START, END = "<!-- DEMO_TABLE start: written by docs/refresh_figures.py -->", "<!-- DEMO_TABLE end -->"

# figure in docs/figures/demo/ ← path in the demo's output folder (the first that exists)
COPIES: dict[str, tuple[str, ...]] = {
    "accuracy_vs_parameters.png": ("figures/accuracy_vs_parameters.png",),
    "few_shot_curves.png": ("figures/few_shot_curves.png",),
    "fold_accuracy.png": ("figures/fold_accuracy.png",),
    "confusion_residual.png": ("figures/confusion_residual.png",),
    "transfer_residual.png": ("figures/transfer_residual.png",),
    "id90_heads.png": ("analysis/id90_heads.png",),
    "evr_heads.png": ("analysis/evr_heads.png",),
    "ablation.png": ("analysis/ablation.png",),
    "retrieval_vs_parameters.png": ("retrieval/figures/t2a_r1_a2t_r1_vs_parameters.png",),
}


def first_existing(run: Path, candidates: tuple[str, ...]) -> Path:
    for name in candidates:
        if (run / name).is_file():
            return run / name
    raise FileNotFoundError(f"{run}: none of {', '.join(candidates)} (is this the output of `audio-residual demo`?)")


def lambda_figures(run: Path) -> dict[str, Path]:
    """λ figures of fold 1's ResiDual run with the most λ (head granularity): notebook 2's output."""
    best, most = None, -1
    for result in sorted((run / "runs").glob("*/fold1/result.json")):
        params = pd.read_json(result, typ="series").get("trainable_params", 0)
        if params > most and (result.parent / "lambda_profile.png").is_file():
            best, most = result.parent, params
    if best is None:
        raise FileNotFoundError(f"{run / 'runs'}: no fold-1 ResiDual run with λ figures")
    return {"lambda_profile.png": best / "lambda_profile.png", "lambda_heatmap.png": best / "lambda_heatmap.png"}


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if pd.notna(std) else f"{mean:.2f}"


def demo_table(summary: pd.DataFrame, few_shot: pd.DataFrame | None, gains: pd.DataFrame | None) -> str:
    """README's demo table: test accuracy over the folds per method, its k-shot accuracies, its gain over
    zero-shot against the test split's noise (when the demo wrote gains.csv) and its trainable parameters."""
    shots = sorted(few_shot["shots"].unique()) if few_shot is not None else []
    gain_rows = {}
    if gains is not None:
        gain_rows = {r.method: r for r in gains[gains["task"] == "classification"].itertuples()}
    header = ["method", "accuracy (mean ± std over folds)", *(f"{int(k)}-shot" for k in shots)]
    header += ["gain over zero-shot (± noise)"] if gain_rows else []
    lines = ["| " + " | ".join([*header, "trainable params (most over folds)"]) + " |", "|" + "---|" * (len(header) + 1)]
    for row in summary.itertuples():
        cells = [row.method, _mean_std(row.accuracy_mean, row.accuracy_std)]
        for k in shots:
            match = few_shot[(few_shot["method"] == row.method) & (few_shot["shots"] == k)]
            cells.append(_mean_std(match["accuracy_mean"].iloc[0], match["accuracy_std"].iloc[0]) if len(match) else "—")
        if gain_rows:
            gain = gain_rows.get(row.method)
            cells.append("—" if gain is None else f"{gain.gain:+.3f} ± {gain.noise:.3f}")
        cells.append(f"{int(row.trainable_params):,}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between the DEMO_TABLE markers replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md must hold the markers {START!r} … {END!r} once, in that order")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def readme_block(run: Path) -> str:
    summary = pd.read_csv(run / "summary.csv")
    few_shot = pd.read_csv(run / "few_shot.csv") if (run / "few_shot.csv").is_file() else None
    gains = pd.read_csv(run / "gains.csv") if (run / "gains.csv").is_file() else None
    written = datetime.fromtimestamp((run / "report.md").stat().st_mtime, tz=UTC).date()
    files = [f"`{name}`" for name, frame in (("summary.csv", summary), ("few_shot.csv", few_shot),
                                              ("gains.csv", gains)) if frame is not None]
    sources = files[0] if len(files) == 1 else ", ".join(files[:-1]) + " and " + files[-1]
    return (demo_table(summary, few_shot, gains) + "\n\n"
            f"*`audio-residual demo`, seed 0, run on {written.isoformat()}; written here by `make docs-figures` "
            f"from its {sources}.*")


def htsat_figure(path: Path) -> None:
    """HTSAT-tiny as transformers builds it (ClapConfig's defaults), drawn without any weights."""
    from transformers import ClapConfig

    from audio_residual.analysis.architecture import htsat_diagram
    from audio_residual.io import save_figure

    save_figure(htsat_diagram(ClapConfig()), path, dpi=80)


def refresh(run: Path) -> list[Path]:
    if not (run / "report.md").is_file():
        raise FileNotFoundError(f"{run}/report.md is missing: run `audio-residual demo --out {run}` (make demo) first")
    DEMO_FIGURES.mkdir(parents=True, exist_ok=True)
    sources = {name: first_existing(run, candidates) for name, candidates in COPIES.items()} | lambda_figures(run)
    written = [Path(shutil.copyfile(src, DEMO_FIGURES / name)) for name, src in sources.items()]
    htsat_figure(FIGURES / "htsat_tiny.png")
    README.write_text(replace_block(README.read_text(encoding="utf-8"), readme_block(run)), encoding="utf-8")
    return [*written, FIGURES / "htsat_tiny.png", README]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/demo", help="output folder of `audio-residual demo`")
    args = parser.parse_args(argv)
    try:
        for path in refresh(Path(args.run)):
            print(path.relative_to(ROOT))
    except (OSError, ValueError) as err:
        print(f"refresh_figures: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
