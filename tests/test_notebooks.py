"""The top-level notebooks run top to bottom in smoke mode (tiny pretrained CLAP, generated data, offline).

Each notebook executes in its own temporary working directory, so its `runs/` outputs never land in the
repository; the kernel inherits this process's environment (smoke switch, offline W&B and hub, and a
PYTHONPATH that finds the package when it is not pip-installed). A failing cell raises nbclient's
CellExecutionError with a note naming the notebook.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

slow = pytest.mark.slow  # a notebook executed end to end: `make test-slow`

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = (
    "1_Analyze_CLAP_Attention.ipynb",
    "2_Apply_ResiDual_to_CLAP.ipynb",
    "3_Evaluate_and_compare_CLAP_performance.ipynb",
)
KERNEL = "python3"
SMOKE_OUT = Path("runs") / "smoke"  # setup()'s smoke layout, relative to the notebook's working directory


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """A kernel named python3 for this interpreter (ipykernel usually ships one; install it if not)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL], check=True)
    return KERNEL


@pytest.fixture
def smoke_env(tmp_path, monkeypatch) -> Path:
    """Environment the kernel inherits; returns the notebook's working directory."""
    work = tmp_path / "work"
    scratch = tmp_path / "tmp"  # anything a notebook writes under tempfile stays inside tmp_path too
    work.mkdir()
    scratch.mkdir()
    monkeypatch.setenv("AUDIO_RESIDUAL_SMOKE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks the inline backend
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    return work


def _execute(name: str, work: Path, kernel: str):
    notebook = nbformat.read(ROOT / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(work)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        error.add_note(f"while executing notebook {name} in smoke mode (cwd {work})")
        raise
    return notebook


def _text(cell) -> str:
    """Everything a code cell showed: streams, plain text, markdown and HTML reprs."""
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            parts.append(output.get("text", ""))
        data = output.get("data", {})
        for mime in ("text/plain", "text/markdown", "text/html"):
            if mime in data:
                parts.append(data[mime])
    return "\n".join(parts)


def _tagged(notebook, tag: str) -> str:
    cells = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert cells, f"no cell tagged {tag!r}"
    return "\n".join(_text(c) for c in cells)


def _all_text(notebook) -> str:
    return "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    notebook = nbformat.read(ROOT / name, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata.get("kernelspec", {}).get("name") == KERNEL
    dirty = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{name}: code cells {dirty} carry outputs or execution counts; clear them before committing"
    assert "SMOKE" in "".join(c.source for c in notebook.cells), f"{name} has no smoke switch"


def _images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


@slow
def test_notebook_1_analysis(smoke_env, python3_kernel):
    notebook = _execute(NOTEBOOKS[0], smoke_env, python3_kernel)
    out = smoke_env / SMOKE_OUT / "analysis"  # nb.layout.analysis
    for table in ("heads.csv", "ablation.csv", "stats_fold1.safetensors"):
        assert (out / table).is_file(), f"notebook 1 wrote no {table}"
    for tag, figures in (("architecture", 1), ("figures", 7), ("ablation", 1)):  # drawn inline from the objects
        shown = sum(_images(c) for c in notebook.cells if tag in c.get("metadata", {}).get("tags", []))
        assert shown == figures, f"cells tagged {tag!r} showed {shown} figures, expected {figures}"
    assert "max |Σ_h head_h + b_O − attn_out|" in _all_text(notebook)


@slow
def test_notebook_2_residual(smoke_env, python3_kernel):
    notebook = _execute(NOTEBOOKS[1], smoke_env, python3_kernel)
    out = smoke_env / SMOKE_OUT
    assert (out / "sweep.csv").is_file()
    # The PCA cell and the sweep share fold 1's statistics file (same training clips, same key, same folder).
    assert [p.parent.name for p in out.rglob("stats_fold1_*.safetensors")] == ["stats"]
    assert list((out / "runs").glob("*/fold1/lambda.safetensors"))
    assert not (out / "results.csv").exists(), "notebook 2 ran baselines or wrote results: that is notebook 3's job"
    assert _all_text(notebook).count("max |RD embedding − zero-shot embedding| = 0\n") == 3  # λ = 1 is the identity
    chosen = _tagged(notebook, "chosen")
    for fold in (1, 2, 3):
        assert f"fold {fold}: chosen on its own validation split" in chosen
    lambdas = [c for c in notebook.cells if "lambdas" in c.get("metadata", {}).get("tags", [])]
    assert sum(_images(c) for c in lambdas) == 2  # λ heatmap and profile of fold 1's chosen run


@slow
def test_notebook_3_stops_without_notebook_2s_sweep(smoke_env, python3_kernel):
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="run notebook 2's cell 'Sweep over"):
        _execute(NOTEBOOKS[2], smoke_env, python3_kernel)
    assert not (smoke_env / SMOKE_OUT / "runs").exists()  # nothing was trained


@slow
def test_notebook_3_comparison(smoke_env, python3_kernel):
    _execute(NOTEBOOKS[1], smoke_env, python3_kernel)  # notebook 2's sweep, which notebook 3 reads
    notebook = _execute(NOTEBOOKS[2], smoke_env, python3_kernel)
    out = smoke_env / SMOKE_OUT
    for path in ("results.csv", "summary.csv", "table.md", "figures/fold_accuracy.png", "figures/confusion_residual.png"):
        assert (out / path).is_file(), f"notebook 3 wrote no {path}"
    table = (out / "table.md").read_text()
    for method in ("zeroshot", "linear_probe", "contrastive_adapter", "finetune", "residual", "residual_coarse"):
        assert f"| {method} |" in table, f"{method} missing from Table 1"
    results = _tagged(notebook, "results")
    assert "residual" in results and "linear_probe" in results
    assert "| residual |" in _all_text(notebook)  # the markdown Table 1 was displayed
    few = pd.read_csv(out / "few_shot.csv")  # every method under the k-shot protocol
    assert set(few["shots"]) == {1, 2} and {"residual", "residual-paper", "lora", "coop"} <= set(few["method"])
    assert "tip_adapter_f" in _tagged(notebook, "few-shot")
    transfer = pd.read_csv(out / "transfer.csv")
    assert {"residual", "contrastive_adapter"} <= set(transfer["method"])
    report = (out / "report.md").read_text()
    assert "## Few-shot" in report and "## Zero-shot retention" in report and "Data: " in report
    assert "## Sweep" in report and "chosen by that fold's validation split" in report  # the study's sections
    assert "- residual-paper, fold 1: `" in report  # the paper preset's own nested choice
    figures = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 8  # fold accuracy, deltas, confusions, headline, few-shot curves, transfer heatmaps
