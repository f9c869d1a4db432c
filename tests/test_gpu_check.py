"""benchmarks/gpu_check.sh rehearsed on the CPU, so a broken script is caught before it costs GPU minutes.

Without CUDA the script skips every CUDA part with a line saying so and runs the rest on toy sizes; the
device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-' (docs/gpu.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bench  # noqa: E402

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is the CPU's run of the script")


def _rehearse(out: Path, phases: str, measures: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_PHASES": phases,
           "GPU_BENCH_MEASURES": measures, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800)


def _brought_back(out: Path) -> list[str]:
    """What the device tool would bring back: the files, each a valid name, at most 8."""
    names = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(names) <= 8, names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names), names
    return names


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_default_sweep_extrapolation_counts_every_grid_run(tmp_path):
    """120 default runs at their own epochs and 30 paper runs at the paper's 30, each at its configuration's
    measured cost; Table 1 is the baselines plus five runs of 30 epochs."""
    bench = gpu_bench.Bench(torch.device("cpu"), True, float("inf"), tmp_path)
    bench.figures.update(e2e_features_and_startup_seconds=100.0, e2e_zeroshot_seconds=10.0,
                         e2e_linear_probe_seconds=20.0, e2e_step_analysis_seconds=50.0)
    costs = {name: (float(i + 1), 0.1 * (i + 1)) for i, (name, _) in enumerate(gpu_bench.CONFIGS)}
    gpu_bench._extrapolate(bench, costs)
    default = sum(2 * 5 * (2 * fixed + (10 + 30) * epoch) for name, (fixed, epoch) in costs.items()
                  if not name.startswith("paper"))  # 2 learning rates × 5 folds × epochs 10 and 30
    paper = sum(5 * (fixed + 30 * epoch) for name, (fixed, epoch) in costs.items()
                if not name.startswith("paper") and name != "all-head")
    paper += 5 * (costs["paper-all-head"][0] + 30 * costs["paper-all-head"][1])
    assert bench.figures["default_sweep_seconds"] == pytest.approx(default + paper)
    fixed, epoch = costs[gpu_bench.TABLE1_CONFIG]
    assert bench.figures["table1_seconds"] == pytest.approx(100 + 10 + 20 + 5 * (fixed + 30 * epoch))
    assert bench.figures["default_study_partial_seconds"] == pytest.approx(100 + default + paper + 30 + 50)
    del costs["stage0-layer"]  # a configuration not measured: no sweep figure rather than a wrong one
    partial = gpu_bench.Bench(torch.device("cpu"), True, float("inf"), tmp_path)
    gpu_bench._extrapolate(partial, costs)
    assert "default_sweep_seconds" not in partial.figures and "table1_seconds" in partial.figures


def test_named_measures_run_alone_and_merge_into_one_json(tmp_path):
    """`gpu_bench.py NAME` (what GPU_BENCH_MEASURES passes) runs that measure only; a second call merges into
    OUT/gpu_bench.json (the full rehearsal below runs every measure through the script)."""
    assert gpu_bench.main(["--out", str(tmp_path), "--small", "--device", "cpu", "retrieval_scoring"]) == 0
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert list(saved["measures"]) == ["retrieval_scoring"] and saved["measures"]["retrieval_scoring"].startswith("done")
    assert "tap_pairs_per_s" in saved["figures"] and (tmp_path / "gpu_bench.png").is_file()
    assert gpu_bench.main(["--out", str(tmp_path), "--small", "--device", "cpu", "stats_pass"]) == 0
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(saved["measures"]) == {"retrieval_scoring", "stats_pass"} and "tap_pairs_per_s" in saved["figures"]
    with pytest.raises(SystemExit):
        gpu_bench.main(["--out", str(tmp_path), "--small", "nope"])


@pytest.mark.slow
@cpu_only
def test_full_rehearsal_runs_every_phase_to_the_end(tmp_path):
    """Every phase, CUDA parts skipped with a line saying so, every CPU-capable measure done on toy sizes (the
    end-to-end experiment on 2 folds, one configuration's costs): the one rehearsal CI runs."""
    out = tmp_path / "out"
    done = _rehearse(out, "setup tests notebooks bench experiment")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _brought_back(out) == ["cuda_tests.xml", "gpu_bench.json", "gpu_bench.png", "gpu_check_logs.tar.gz",
                                  "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "CUDA absent: a rehearsal" in summary
    for phase in ("setup", "tests", "notebooks", "bench", "experiment"):
        assert re.search(rf"^{phase}: ok in \d+s", summary, re.M), summary
    assert re.search(r"^tests: ok .*\d+ passed, \d+ skipped", summary, re.M)
    saved = json.loads((out / "gpu_bench.json").read_text())
    assert set(saved["measures"]) == set(gpu_bench.MEASURES)
    assert all(status.startswith("done") for status in saved["measures"].values()), saved["measures"]
    for figure in ("forward_bf16_b2_clips_per_s", "residual_step_stage3_cached_clips_per_s", "stats_pass_overhead",
                   "pretrain_step_tiny_ddp2_clips_per_s", "ig4_in_passes", "e2e_experiment_seconds", "table1_seconds"):
        assert figure in saved["figures"], figure
    with tarfile.open(out / "gpu_check_logs.tar.gz") as archive:
        assert {"logs/setup.log", "logs/bench.log", "logs/summary.txt", "logs/progress.txt"} <= set(archive.getnames())
        notebooks = archive.extractfile("logs/notebooks.log").read().decode()
        bench = archive.extractfile("logs/bench.log").read().decode()
    assert "notebooks skipped: CUDA absent" in notebooks
    assert "compile skipped: CUDA only" in bench
