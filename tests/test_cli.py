"""The command line, end to end on generated data with the tiny model (offline)."""

from __future__ import annotations

import pandas as pd

from audio_residual.cli import main


def test_zeroshot_command_writes_one_row_per_fold(synthetic_esc50, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["zeroshot", "--data", str(synthetic_esc50), "--model", "tiny-random", "--out", str(out),
                 "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0
    frame = pd.read_csv(out / "zeroshot.csv")
    assert list(frame.columns) == ["fold", "n", "accuracy", "top5"]
    assert frame["fold"].tolist() == [1, 2, 3, 4, 5]
    assert frame["n"].sum() == 40
    assert frame["accuracy"].between(0, 1).all() and (frame["top5"] >= frame["accuracy"]).all()
    assert "accuracy" in capsys.readouterr().out


def test_zeroshot_skips_bad_files_and_lists_them(synthetic_esc50, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synthetic_esc50, data)
    victim = sorted((data / "audio").glob("*.wav"))[0]
    victim.write_text("not audio at all")
    args = ["zeroshot", "--data", str(data), "--model", "tiny-random", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(args) == 2  # default policy: a clear error, no results
    assert not (tmp_path / "out" / "zeroshot.csv").exists()
    assert main([*args, "--on-bad-file", "skip"]) == 0
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["filename"].tolist() == [victim.name]
    assert pd.read_csv(tmp_path / "out" / "zeroshot.csv")["n"].sum() == 39


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["zeroshot", "--data", str(tmp_path / "nowhere"), "--model", "tiny-random", "--out", str(tmp_path)])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err
