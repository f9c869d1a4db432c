"""Notebook 4 (retrieval) is committed clean and runs top to bottom in smoke mode (tiny CLAP, offline).

Executing it is an end-to-end run, like notebooks 1–3's: `make test-slow` (marker `slow`)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "4_Audio_Text_Retrieval.ipynb"


def test_committed_notebook_is_clean():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert not [c for c in notebook.cells if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert "SMOKE" in "".join(c.source for c in notebook.cells)
    markdown = "".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    # It explains both audio→text mAP@10 and which published figure each matches, and the text length rule.
    assert "`a2t_map10`" in markdown and "`a2t_map10_laion`" in markdown and "LAION's published" in markdown
    assert "77 tokens" in markdown and "mean pooling" in markdown


def _shown(notebook, tag: str) -> tuple[str, int]:
    """Text and number of images the cells tagged `tag` showed."""
    text, images = [], 0
    for cell in notebook.cells:
        if tag not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            images += "image/png" in data
            text += [output.get("text", ""), data.get("text/markdown", ""), data.get("text/plain", "")]
    return "\n".join(text), images


@pytest.mark.slow
def test_notebook_4_runs_in_smoke_mode(tmp_path, monkeypatch):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    for name, value in (("AUDIO_RESIDUAL_SMOKE", "1"), ("WANDB_MODE", "disabled"), ("HF_HUB_OFFLINE", "1"),
                        ("TMPDIR", str(scratch))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}}).execute()
    table = pd.read_csv(work / "runs" / "smoke_retrieval" / "study" / "retrieval.csv", dtype={"key": str})
    methods = ["zeroshot", "lora", "finetune", "residual", "projection", "tap"]  # the task's default methods
    assert list(table["method"]) == methods and "direction" not in table  # one wide row per method
    assert table[["mean_r1", "t2a_r1", "a2t_r1", "t2a_random_r1"]].notna().all().all()
    results, _ = _shown(notebook, "results")
    assert all(f"| {method} |" in results for method in methods) and "random R@1" in results
    assert "A→T mAP@10 (LAION's code)" in results
    assert _shown(notebook, "figure")[1] == 1
    examples = _shown(notebook, "examples")[0]
    assert "**zeroshot**" in examples and ("✓" in examples or "·" in examples)
    retention = _shown(notebook, "retention")[0]
    assert "residual" in retention and "zeroshot" in retention  # adapted and plain accuracy side by side
