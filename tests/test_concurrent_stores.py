"""Keyed stores survive concurrent writers: several processes writing into one output folder lose no row."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audio_residual.evaluation.store import ResultsStore
from audio_residual.experiments.sweep import SweepTable
from audio_residual.io import update_csv, update_json

WRITERS, ROWS = 4, 6


def _fork():
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def _results_writer(path: str, writer: int, barrier) -> None:
    store = ResultsStore(path)  # every writer reads the (empty) table before any of them writes
    barrier.wait()
    for fold in range(1, ROWS + 1):
        store.add({"method": f"m{writer}", "fold": fold, "key": f"k{writer}", "accuracy": writer / 10 + fold / 100})


def _sweep_writer(path: str, writer: int, barrier) -> None:
    table = SweepTable(Path(path), key="run")
    barrier.wait()
    for lr in range(ROWS):
        table.add({"lr": writer * 100 + lr, "fold": 1}, {"val_accuracy": 0.5})


def _csv_writer(path: str, writer: int, barrier) -> None:
    barrier.wait()
    for row in range(ROWS):
        frame = pd.DataFrame([{"source": f"s{writer}", "method": "residual", "target": f"t{row}", "accuracy": row}])
        update_csv(path, frame, ("source", "method", "target"))


def _json_writer(path: str, writer: int, barrier) -> None:
    barrier.wait()
    for row in range(ROWS):
        update_json(path, lambda current, name=f"w{writer}r{row}", value=row: {**(current or {}), name: value})


def _run_writers(target, path: Path) -> None:
    context = _fork()
    barrier = context.Barrier(WRITERS)
    processes = [context.Process(target=target, args=(str(path), n, barrier)) for n in range(WRITERS)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0


def test_results_store_keeps_every_writers_rows(tmp_path):
    path = tmp_path / "results.csv"
    _run_writers(_results_writer, path)
    rows = pd.read_csv(path, dtype={"key": str})
    assert len(rows) == WRITERS * ROWS
    assert sorted(zip(rows["method"], rows["fold"], strict=True)) == sorted(
        (f"m{w}", f) for w in range(WRITERS) for f in range(1, ROWS + 1)
    )
    store = ResultsStore(path)  # and a later session reads them all back, each row once
    store.add({"method": "m0", "fold": 1, "key": "k0", "accuracy": 0.99})  # replace, not duplicate
    again = pd.read_csv(path, dtype={"key": str})
    assert len(again) == WRITERS * ROWS
    assert again.loc[(again["method"] == "m0") & (again["fold"] == 1), "accuracy"].tolist() == [0.99]


def test_sweep_table_keeps_every_agents_points(tmp_path):
    path = tmp_path / "sweep.csv"
    _run_writers(_sweep_writer, path)
    frame = SweepTable(path, key="run").frame
    assert len(frame) == WRITERS * ROWS and frame["point"].is_unique


def test_generic_csv_and_json_stores_keep_every_writers_rows(tmp_path):
    csv_path, json_path = tmp_path / "transfer.csv", tmp_path / "index.json"
    _run_writers(_csv_writer, csv_path)
    _run_writers(_json_writer, json_path)
    rows = pd.read_csv(csv_path)
    assert len(rows) == WRITERS * ROWS and not rows.duplicated(["source", "method", "target"]).any()
    assert len(json.loads(json_path.read_text())) == WRITERS * ROWS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "transfer.csv"]  # no lock or temp files


def test_update_csv_replaces_by_key_whatever_the_dtypes(tmp_path):
    """A fold read back from CSV as 1.0 (NaN elsewhere in the column) still matches fold 1."""
    path = tmp_path / "store.csv"
    pd.DataFrame({"method": ["a", "b"], "fold": [1, np.nan], "value": [1, 2]}).to_csv(path, index=False)
    merged = update_csv(path, pd.DataFrame([{"method": "a", "fold": 1, "value": 3}]), ("method", "fold"))
    assert sorted(merged["value"].tolist()) == [2, 3] and len(pd.read_csv(path)) == 2


def _cli_writer(argv_sets: list[list[str]]) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from audio_residual.cli import main

    for argv in argv_sets:
        assert main(argv) == 0, argv


def test_two_sweep_and_train_commands_into_one_out(tmp_path):
    """README's set-up: several agents on one --out (and one --cache). Each process runs a sweep over its own
    grid points, then train-residual on its own fold; sweep.csv and results.csv end with every row."""
    from audio_residual.data_processing import make_synthetic_esc50

    data = make_synthetic_esc50(tmp_path / "data", n_classes=3, clips_per_class=5, seconds=1.5, sample_rate=16000)
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--data", str(data), "--model", "tiny-random", "--cache", str(cache), "--device", "cpu",
              "--out", str(out), "--batch-size", "8"]
    jobs = []
    for writer, lrs in enumerate(([0.05, 0.1], [0.2, 0.3])):
        grid = tmp_path / f"grid{writer}.json"
        grid.write_text(json.dumps({"granularity": ["layer"], "lr": lrs, "epochs": [1], "fold": [1, 2]}))
        jobs.append([
            ["sweep", *common, "--grid", str(grid), "--wandb", "disabled", "--val-fraction", "0.5"],
            ["train-residual", *common, "--granularity", "layer", "--epochs", "1", "--folds", str(writer + 1)],
        ])
    context = multiprocessing.get_context("spawn")  # the children load torch and the model themselves
    processes = [context.Process(target=_cli_writer, args=(job,)) for job in jobs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(300)
        assert process.exitcode == 0
    sweep = pd.read_csv(out / "sweep.csv")
    assert len(sweep) == 8 and sorted(set(sweep["lr"])) == [0.05, 0.1, 0.2, 0.3]
    results = pd.read_csv(out / "results.csv")
    results = results[results["method"] != "zeroshot"]  # the baseline every run adds (one row per fold, shared)
    assert sorted(results["fold"]) == [1, 2]
    index = json.loads(next(cache.rglob("index.json")).read_text())
    assert len(index["entries"]) == 15  # both computed the features into one cache: every row vouched for


@pytest.mark.parametrize("store", ["retrieval.csv", "pretrain.csv"])
def test_other_outputs_can_use_the_same_merge(tmp_path, store):
    """The mechanism takes its key columns as an argument: retrieval and pretraining tables use it as is."""
    path = tmp_path / store
    update_csv(path, pd.DataFrame([{"method": "a", "fold": 1, "R@1": 0.1}]), ("method", "fold"))
    update_csv(path, pd.DataFrame([{"method": "b", "fold": 1, "R@1": 0.2}]), ("method", "fold"))
    update_csv(path, pd.DataFrame([{"method": "a", "fold": 1, "R@1": 0.3}]), ("method", "fold"))
    assert sorted(pd.read_csv(path)["R@1"]) == [0.2, 0.3]


def test_rows_another_writer_finished_are_reused_not_recomputed(tmp_path):
    first, second = ResultsStore(tmp_path / "results.csv"), ResultsStore(tmp_path / "results.csv")
    second.add({"method": "linear_probe", "fold": 1, "key": "k", "accuracy": 0.5})
    assert first.reuse("linear_probe", 1, "k") and len(first.frame) == 1
    agent_a, agent_b = SweepTable(tmp_path / "sweep.csv", "run"), SweepTable(tmp_path / "sweep.csv", "run")
    agent_b.add({"lr": 0.1, "fold": 1}, {"val_accuracy": 0.5})
    assert agent_a.done({"lr": 0.1, "fold": 1})


def test_where_a_folder_cannot_be_locked_a_lock_file_serves(tmp_path, monkeypatch):
    """NFS emulates flock with write locks, which a read-only folder descriptor cannot take."""
    import errno
    import fcntl
    import stat

    from audio_residual import io as io_module

    real = fcntl.flock

    def nfs_like(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd, operation)

    monkeypatch.setattr(io_module.fcntl, "flock", nfs_like)
    path = tmp_path / "transfer.csv"
    _run_writers(_csv_writer, path)  # forked writers inherit the patch
    assert len(pd.read_csv(path)) == WRITERS * ROWS and (tmp_path / io_module.LOCK_FILE).is_file()


def _retrieval_writer(path: str, writer: int, barrier) -> None:
    from audio_residual.tasks import RETRIEVAL

    store = ResultsStore(path, RETRIEVAL)  # every writer reads the (empty) table before any of them writes
    barrier.wait()
    for row in range(ROWS):
        metrics = {metric: writer / 10 + row / 100 for metric in RETRIEVAL.metrics}
        store.add({"method": f"m{writer}", "fold": 0, "key": f"k{writer}-{row}", **metrics})


def test_retrieval_store_keeps_every_writers_wide_rows(tmp_path):
    """retrieval.csv is the keyed results store of the retrieval task: one wide row per (method, fold, key)."""
    from audio_residual.tasks import RETRIEVAL

    path = tmp_path / "retrieval.csv"
    _run_writers(_retrieval_writer, path)
    rows = pd.read_csv(path, dtype={"key": str})
    assert len(rows) == WRITERS * ROWS and not rows.duplicated(["method", "fold", "key"]).any()
    assert set(RETRIEVAL.metrics) <= set(rows) and "direction" not in rows and list(rows)[:4] == [
        "method", "fold", "key", "mean_r1"]
    store = ResultsStore(path, RETRIEVAL)  # a later session reuses another writer's row instead of recomputing it
    assert store.reuse("m3", 0, "k3-5") and list(store.frame["t2a_r1"]) == [pytest.approx(0.35)]
