"""The command line, end to end on generated data with the tiny model (offline): `python -m audio_residual`,
zero-shot, and transfer targets prepared like the study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from audio_residual.cli import main


def test_zeroshot_command_writes_one_row_per_fold(small_data, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["zeroshot", "--data", str(small_data), "--model", "tiny-random", "--out", str(out),
                 "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 0
    frame = pd.read_csv(out / "zeroshot.csv")
    assert list(frame.columns) == ["fold", "n", "accuracy", "top5"]
    assert frame["fold"].tolist() == [1, 2, 3, 4, 5]
    assert frame["n"].sum() == 15
    assert frame["accuracy"].between(0, 1).all() and (frame["top5"] >= frame["accuracy"]).all()
    assert "accuracy" in capsys.readouterr().out


def test_zeroshot_skips_bad_files_and_lists_them(small_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    victim = sorted((data / "audio").glob("*.wav"))[0]
    victim.write_text("not audio at all")
    args = ["zeroshot", "--data", str(data), "--model", "tiny-random", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    assert main(args) == 2  # default policy: a clear error, no results
    assert not (tmp_path / "out" / "zeroshot.csv").exists()
    assert main([*args, "--on-bad-file", "skip"]) == 0
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert skipped["filename"].tolist() == [victim.name]
    assert pd.read_csv(tmp_path / "out" / "zeroshot.csv")["n"].sum() == 14


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["zeroshot", "--data", str(tmp_path / "nowhere"), "--model", "tiny-random", "--out", str(tmp_path)])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_single_process_commands_refuse_torchrun(small_data, tmp_path, capsys, monkeypatch):
    """Under torchrun a study command would run once per process into one OUT: refused before it reads data."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "out"
    assert main(["zeroshot", "--data", str(small_data), "--model", "tiny-random", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "WORLD_SIZE=2" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_python_dash_m_shows_every_command(capsys, monkeypatch):
    """`python -m audio_residual` is the command line (what `torchrun -m audio_residual` launches): runpy runs
    the package's __main__ as `-m` does, in this interpreter."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["audio_residual", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("audio_residual", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: audio-residual")
    for command in ("zeroshot", "experiment", "retrieval", "sweep", "train-residual", "analyze", "stats", "saliency",
                    "pretrain", "generate-data", "demo"):
        assert command in printed


# --- transfer targets ------------------------------------------------------------------------------------


def _copy(small_data: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(small_data, target)
    return target


@pytest.mark.parametrize("spelling", ["slash", "absolute", "symlink"])
def test_transfer_to_the_studys_own_dataset_is_refused_however_spelled(small_data, tmp_path, cli, monkeypatch,
                                                                        spelling):
    data = _copy(small_data, tmp_path, "esc")
    monkeypatch.chdir(tmp_path)
    other = {"slash": "esc/", "absolute": str(data.resolve()), "symlink": str(tmp_path / "link")}[spelling]
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(data)
    run = cli("experiment", "--data", "esc", "--transfer", other, "--model", "tiny-random", "--out", tmp_path / "out",
              "--cache", tmp_path / "cache", "--device", "cpu")
    assert run.code == 2 and f"--transfer {other}: that is the --data dataset" in run.errors
    assert not (tmp_path / "cache" / "features").exists()  # refused before any work


def test_transfer_targets_are_prepared_like_the_study_and_their_skips_listed(small_data, tmp_path, cli, monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    import soundfile as sf

    import audio_residual.experiments.study as study_module
    from audio_residual.data_processing import FeatureCache
    from audio_residual.data_processing.audio_config import AudioConfig

    data, other = _copy(small_data, tmp_path, "esc"), _copy(small_data, tmp_path, "other")
    for i, name in enumerate(sorted((other / "audio").iterdir())[:2]):  # two clips of 0.6 s in the target
        sf.write(name, (0.2 + 0.1 * i) * np.sin(2 * np.pi * 440.0 * np.arange(9600) / 16000), 16000)
    seen = {}
    real_compute = FeatureCache.compute

    def compute(self, table):
        seen[str(table.audio_dir)] = self.audio
        self.audio = dataclasses.replace(self.audio, workers=1)  # the same rows, without a process pool
        return real_compute(self, table)

    class Study:  # the study itself stubbed: only what it is handed matters here
        def __init__(self, ws, out, config, wandb="disabled", name=None):
            pass

        def run(self, transfer=None, analysis_options=None):
            seen["transfer"] = transfer
            return SimpleNamespace(table="(study stubbed)")

    monkeypatch.setattr(FeatureCache, "compute", compute)
    monkeypatch.setattr(study_module, "Study", Study)
    argv = ["experiment", "--data", data, "--transfer", other, "--model", "tiny-random", "--out", tmp_path / "out",
            "--cache", tmp_path / "cache", "--device", "cpu", "--on-bad-file", "skip", "--wandb", "disabled"]
    run = cli(*argv, "--min-seconds", "0.5", "--cache-check", "mtime", "--workers", "2", "--no-int16",
              "--recipe", "laion-filelist")
    assert run.code == 0, run.err
    given = AudioConfig(recipe="laion-filelist", int16_roundtrip=False, min_seconds=0.5, cache_check="mtime",
                        workers=2, on_bad_file="skip")
    assert seen[str(data / "audio")] == seen[str(other / "audio")] == given  # the target got the study's options
    assert seen["transfer"]["other"].features.valid.all()  # 0.6 s ≥ --min-seconds 0.5: used
    run = cli(*argv)
    assert run.code == 0 and "skipped 2 clip(s)" in run.out and "skipped-other.csv" in run.out
    listed = pd.read_csv(tmp_path / "out" / "skipped-other.csv")
    assert len(listed) == 2 and listed["reason"].str.contains("too short").all()


def test_experiment_embeds_transfer_targets_with_the_studys_recipe(small_data, tiny_bundle, tmp_path, cli):
    """`experiment --recipe laion-filelist --transfer X`: X's features are computed the laion-filelist way, under
    the study's preprocessing configuration, and the run's provenance says so (the recipe was once dropped for
    transfer targets)."""
    from audio_residual.data_processing import FeatureCache, load_esc50
    from audio_residual.data_processing.audio_config import AudioConfig

    other = _copy(small_data, tmp_path, "other")
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"granularity": ["layer"], "epochs": [1], "fold": [1]}))
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = cli("experiment", "--data", small_data, "--transfer", other, "--recipe", "laion-filelist",
              "--methods", "zeroshot", "--grid", grid, "--model", "tiny-random", "--device", "cpu", "--out", out,
              "--cache", cache, "--wandb", "disabled", "--ablation-max-clips", "1", "--batch-size", "16")
    assert run.code == 0, run.err
    configs = {json.loads(path.read_text())["recipe"] for path in cache.glob("features/*/config.json")}
    assert configs == {"laion-filelist"}  # every clip the command embedded took the one recipe
    extractor = tiny_bundle.feature_extractor
    filelist = FeatureCache(cache, extractor, AudioConfig(recipe="laion-filelist"))
    assert json.loads((filelist.config_dir / "config.json").read_text())["recipe"] == "laion-filelist"
    assert filelist.store(load_esc50(other)).index.is_file()  # X's features: under the study's configuration
    assert filelist.store(load_esc50(small_data)).index.is_file()
    assert not FeatureCache(cache, extractor).store(load_esc50(other)).index.exists()  # not the default recipe's
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["audio"]["recipe"] == "laion-filelist" and provenance["recipe"] == "laion-filelist"


@pytest.mark.parametrize("command", ["zeroshot", "experiment", "retrieval", "sweep", "train-residual", "analyze", "stats",
                                     "saliency", "pretrain"])
def test_every_command_that_embeds_audio_takes_the_same_audio_and_model_options(command):
    """One vocabulary: --recipe, --no-int16, --min-seconds, --cache-check, --workers, --on-bad-file become one
    `AudioConfig`, and --model, --revision, --text-config, --device, --amp one `ModelSource`, in every command."""
    from audio_residual.clap.loading import ModelSource
    from audio_residual.cli import build_parser
    from audio_residual.cli.options import audio_config, model_source
    from audio_residual.data_processing.audio_config import AudioConfig

    required = ["--data", "x", "--out", "o", *(["--fold", "1"] if command == "analyze" else [])]
    args = build_parser().parse_args([
        command, *required, "--recipe", "laion-filelist", "--no-int16", "--min-seconds", "0.5",
        "--cache-check", "mtime", "--workers", "2", "--on-bad-file", "skip", "--model", "m", "--revision", "v1",
        "--text-config", "roberta", "--device", "cpu", "--amp", "none",
    ])
    assert audio_config(args) == AudioConfig(recipe="laion-filelist", int16_roundtrip=False, min_seconds=0.5,
                                             cache_check="mtime", workers=2, on_bad_file="skip")
    assert model_source(args) == ModelSource("m", revision="v1", text_config=Path("roberta"), device="cpu", amp="none")
    defaults = build_parser().parse_args([command, *required])
    assert audio_config(defaults) == AudioConfig()
