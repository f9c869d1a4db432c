"""Every bad input gets a one-line answer naming the culprit (exit 2, no traceback), or the documented behaviour."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_residual.cli import main
from audio_residual.data_processing import (
    BadAudioError,
    DatasetError,
    load_audio,
    load_csv_dataset,
    load_esc50,
    load_urbansound8k,
    make_synthetic_esc50,
)
from audio_residual.data_processing.audio import load_audio_checked


def tone(seconds: float, sample_rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


@pytest.fixture
def data_copy(small_data, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(small_data, target)
    (target / "meta" / "generator.json").unlink()  # from here on these are "recordings" we may damage
    return target


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and stderr of one CLI call; SystemExit (argparse) counts as its code."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def zeroshot_args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["zeroshot", "--data", str(data), "--model", "tiny-random", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--device", "cpu", *extra]


# ---- arguments refused before any work -------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--batch-size", "0", "argument --batch-size: 0 is out of range: must be at least 1"),
        ("--tokens-per-clip", "0", "argument --tokens-per-clip: 0 is out of range: must be at least 1"),
        ("--patience", "-1", "argument --patience: -1 is out of range: must be at least 1"),
        ("--val-fraction", "1", "argument --val-fraction: 1 is out of range: must be at least 0 and less than 1"),
        ("--folds", "1,x", "argument --folds: '1,x' is not a comma-separated list of integers"),
        ("--template", "{bogus}", "argument --template: prompt template '{bogus}' must contain {label}"),
        ("--template", "A sound.", "argument --template: prompt template 'A sound.' must contain {label}"),
        ("--device", "bogus", "argument --device: unknown device 'bogus'"),
    ],
)
def test_bad_arguments_are_refused_by_the_parser(capsys, tmp_path, option, value, expected):
    code, err = run(capsys, "train-residual", "--data", "unused", "--model", "tiny-random", "--out", str(tmp_path / "o"),
                    f"{option}={value}")
    assert code == 2
    assert expected in last_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "argv", "expected"),
    [
        ("experiment", ["--methods", "bogus"], "unknown classification method 'bogus'; choose from ['zeroshot'"),
        ("retrieval", ["--methods", "zero-shot"], "unknown retrieval method 'zero-shot'; choose from ['zeroshot'"),
        ("experiment", ["--method-option", "lora"], "argument --method-option: 'lora': write METHOD.OPTION=VALUE"),
        ("experiment", ["--method-option", "lora.bogus=1"], "method 'lora' has no option(s) ['bogus']; its options: "),
        ("experiment", ["--finetune-epochs", "2"], "unrecognized arguments: --finetune-epochs 2"),
        ("retrieval", ["--retention", "x"], "unrecognized arguments: --retention x"),
    ],
)
def test_bad_study_options_are_refused_before_any_work(capsys, tmp_path, command, argv, expected):
    """The study vocabulary (--methods, --method-option NAME.KEY=VALUE); options of the old one are refused."""
    code, err = run(capsys, command, "--data", str(tmp_path / "nowhere"), "--model", "tiny-random",
                    "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "cache"), *argv)
    assert code == 2 and expected in last_line(err), err  # not "nowhere not found": refused before the data


def _commands_with_a_seed() -> list[str]:
    """Every subcommand whose parser has --seed (found in the parser, so a new command cannot be missed)."""
    import argparse

    from audio_residual.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return sorted(name for name, parser in commands.items() if "--seed" in parser._option_string_actions)


def test_every_seed_option_is_found():
    assert {"experiment", "retrieval", "sweep", "train-residual", "pretrain", "generate-data", "demo"} <= set(
        _commands_with_a_seed())


@pytest.mark.parametrize("command", _commands_with_a_seed())
@pytest.mark.parametrize("seed", ["99999999999999999999", "4294967296", "-1"])
def test_a_seed_out_of_range_is_refused_naming_the_option_and_its_range(capsys, tmp_path, command, seed):
    """Was "Overflow when unpacking long long" (a traceback, mid-run) for a seed beyond 64 bits."""
    code, err = run(capsys, command, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                    *(["--fold", "1"] if command == "analyze" else []), f"--seed={seed}")
    assert code == 2
    assert last_line(err).endswith(f"argument --seed: {seed} is out of range: must be at least 0 and at most "
                                   "4294967295"), err
    assert not (tmp_path / "o").exists()


def test_the_largest_seed_runs(capsys, tmp_path):
    """The top of --seed's range reaches the seeded steps (initialisation, the loop's epoch shuffles)."""
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

    data = make_synthetic_captions(tmp_path / "caps", n_clips=6, captions_per_clip=1, seconds=1.0,
                                   split_fractions=(0.5, 0.25, 0.25))
    code, err = run(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1",
                    "--batch-size", "2", "--device", "cpu", "--cache", str(tmp_path / "cache"), "--wandb", "disabled",
                    "--seed", "4294967295")
    assert code == 0, err
    assert (tmp_path / "out" / "model").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    code, err = run(capsys, *zeroshot_args(Path("unused"), tmp_path, "--device", "cuda"))
    assert code == 2 and "CUDA is not available on this machine" in last_line(err)


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ([1, 2], r"expected a JSON object {option: [values]}, got [1, 2]"),
        ({"lr": 0.1}, "'lr' must map to a non-empty list of values, got 0.1"),
        ({"learning_rate": [0.1]}, "unknown option 'learning_rate'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_grid_is_refused_before_any_work(capsys, tmp_path, grid, expected):
    path = tmp_path / "grid.json"
    path.write_text(grid if isinstance(grid, str) else json.dumps(grid))
    code, err = run(capsys, "sweep", "--data", str(tmp_path / "nowhere"), "--model", "tiny-random",
                    "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "cache"), "--grid", str(path))
    assert code == 2
    assert f"--grid {path}" in last_line(err) and expected in last_line(err)


def test_unwritable_out_fails_before_computing(capsys, tmp_path, small_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, err = run(capsys, *zeroshot_args(small_data, tmp_path)[:-6], "--out", str(blocker / "out"),
                    "--cache", str(tmp_path / "cache"), "--device", "cpu")
    assert code == 2 and f"--out {blocker / 'out'} is not a writable folder" in last_line(err)
    assert not (tmp_path / "cache").exists()  # nothing was computed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_cache_fails_before_computing(capsys, tmp_path, small_data):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code, err = run(capsys, *zeroshot_args(small_data, tmp_path))
    finally:
        cache.chmod(stat.S_IRWXU)
    assert code == 2 and f"--cache {cache} is not a writable folder" in last_line(err)


def test_ctrl_c_is_one_line_and_exit_130(capsys, tmp_path, monkeypatch, small_data):
    from audio_residual.workspace import Workspace

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Workspace, "open", interrupted)
    code, err = run(capsys, *zeroshot_args(small_data, tmp_path))
    assert code == 130
    assert err.strip() == "audio-residual zeroshot: interrupted; rerun the same command to resume"


def test_esc50_without_network_is_one_line_and_leaves_no_folder(capsys, tmp_path, monkeypatch):
    import socket

    import audio_residual.data_processing.download as download_module

    with socket.socket() as probe:  # a port nobody listens on: the connection is refused, as offline
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(download_module, "ESC50_URL", f"http://127.0.0.1:{port}/master.zip")
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "zeroshot", "--data", "esc50", "--model", "tiny-random", "--out", "out", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot download http://127.0.0.1" in err and "pass --data /path/to/ESC-50-master" in err
    assert not (tmp_path / "data").exists()


# ---- model and device -------------------------------------------------------------------------------


def test_model_folder_errors_name_the_folder(tmp_path):
    from transformers import BertConfig

    from audio_residual.clap.loading import load_clap, resolve_device

    with pytest.raises(FileNotFoundError, match="model folder not found: /nonexistent"):
        load_clap("/nonexistent", device="cpu")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"garbage/config.json is not valid JSON"):
        load_clap(garbage, device="cpu")
    bert = tmp_path / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(bert)
    with pytest.raises(ValueError, match=r"bert holds a model of type 'bert', not 'clap'"):
        load_clap(bert, device="cpu")
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        resolve_device("bogus")


def test_cli_model_errors_are_one_line(capsys, tmp_path, small_data):
    code, err = run(capsys, *zeroshot_args(small_data, tmp_path)[:3], "--model", "/nonexistent",
                    "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--device", "cpu")
    assert code == 2 and err.strip() == "audio-residual zeroshot: error: model folder not found: /nonexistent"


# ---- dataset metadata -------------------------------------------------------------------------------


def _esc50_with_filenames(root: Path, filenames: list[str]) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "audio").mkdir()
    rows = [{"filename": f, "fold": 1, "target": 0, "category": "dog"} for f in filenames]
    pd.DataFrame(rows).to_csv(root / "meta" / "esc50.csv", index=False)
    return root


@pytest.mark.parametrize("evil", ["../outside.wav", "sub/../../outside.wav", "/etc/outside.wav", "C:\\x.wav"])
def test_filenames_escaping_the_audio_folder_are_refused(tmp_path, evil):
    root = _esc50_with_filenames(tmp_path / "esc", ["ok.wav", evil])
    with pytest.raises(DatasetError, match=r"esc50.csv: line 3, column 'filename': filename .* points outside"):
        load_esc50(root)
    csv_path = tmp_path / "clips.csv"
    pd.DataFrame({"filename": ["ok.wav", evil], "label": ["a", "b"], "fold": [1, 2]}).to_csv(csv_path, index=False)
    with pytest.raises(DatasetError, match=r"clips.csv: line 3, column 'filename'"):
        load_csv_dataset(tmp_path, csv_path)


def test_urbansound8k_slice_name_escaping_is_refused(tmp_path):
    (tmp_path / "metadata").mkdir()
    pd.DataFrame(
        {"slice_file_name": ["a.wav", "../../b.wav"], "fold": [1, 2], "classID": [0, 1], "class": ["x", "y"]}
    ).to_csv(tmp_path / "metadata" / "UrbanSound8K.csv", index=False)
    with pytest.raises(DatasetError, match=r"line 3, column 'slice_file_name': filename '../../b.wav'"):
        load_urbansound8k(tmp_path)


def test_latin1_csv_names_the_file(tmp_path):
    root = tmp_path / "esc"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "esc50.csv").write_bytes("filename,fold,target,category\ncaf\xe9.wav,1,0,dog\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"esc50.csv: not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"):
        load_esc50(root)


# ---- audio --------------------------------------------------------------------------------------------


def test_directory_named_like_a_wav(tmp_path):
    (tmp_path / "x.wav").mkdir()
    with pytest.raises(BadAudioError, match=r"x\.wav: is a directory, not an audio file"):
        load_audio(tmp_path / "x.wav")


def test_one_second_minimum_is_inclusive_and_names_the_option(tmp_path):
    exact = tmp_path / "exact.wav"
    sf.write(exact, tone(1.0, 16000), 16000, subtype="PCM_16")
    assert load_audio(exact).size == 48000
    short = tmp_path / "short.wav"
    sf.write(short, tone(1.0, 16000)[:-1], 16000, subtype="PCM_16")
    with pytest.raises(BadAudioError, match=r"15999 samples at 16000 Hz; lower the minimum with --min-seconds"):
        load_audio(short)
    assert load_audio(short, min_seconds=0.9).size == 47997


def test_clipping_and_dc_are_warnings_not_errors(tmp_path):
    loud = tmp_path / "loud.wav"
    sf.write(loud, 4.0 * tone(1.0, 16000, amplitude=1.0), 16000, subtype="FLOAT")  # peaks of 4.0
    audio, warnings = load_audio_checked(loud)
    assert audio.size == 48000
    fraction = float(np.mean(np.abs(4.0 * tone(1.0, 16000, amplitude=1.0)) >= 0.999))
    assert warnings == [f"clipped: {fraction:.0%} of samples at full scale (±1)"] and 0.7 < fraction < 0.9
    dc = tmp_path / "dc.wav"
    sf.write(dc, np.full(16000, 0.25, dtype=np.float32), 16000, subtype="FLOAT")
    assert load_audio_checked(dc)[1] == ["DC only: constant offset +0.25 with no signal around it (std 0.0e+00)"]
    normal = tmp_path / "normal.wav"
    sf.write(normal, tone(1.0, 16000), 16000, subtype="PCM_16")
    assert load_audio_checked(normal)[1] == []


# ---- runs on damaged data ----------------------------------------------------------------------------


def _fold_files(data: Path, fold: int) -> list[Path]:
    return sorted((data / "audio").glob(f"{fold}-*.wav"))


def test_empty_fold_after_skipping_is_refused_naming_the_fold(capsys, tmp_path, data_copy):
    for path in _fold_files(data_copy, 2):
        path.write_text("not audio")
    code, err = run(capsys, *zeroshot_args(data_copy, tmp_path, "--on-bad-file", "skip"))
    assert code == 2
    assert "fold 2 of 'esc50' has no usable clips: all 3 were skipped as bad files" in last_line(err)
    assert not (tmp_path / "out" / "zeroshot.csv").exists()


def test_skip_and_warning_lists_follow_the_files(capsys, tmp_path, data_copy):
    victim, loud = _fold_files(data_copy, 1)[:2]
    victim.write_text("not audio")
    sf.write(loud, np.clip(8.0 * tone(1.5, 16000), -1, 1), 16000, subtype="PCM_16")
    args = zeroshot_args(data_copy, tmp_path, "--on-bad-file", "skip")
    assert run(capsys, *args)[0] == 0
    out = tmp_path / "out"
    assert pd.read_csv(out / "skipped.csv")["filename"].tolist() == [victim.name]
    warned = pd.read_csv(out / "warnings.csv")
    assert warned["filename"].tolist() == [loud.name] and warned["reason"][0].startswith("clipped: ")
    assert pd.read_csv(out / "zeroshot.csv")["n"].sum() == 14  # the clipped clip is used, the bad one is not
    sf.write(victim, tone(1.5, 16000, amplitude=0.3), 16000, subtype="PCM_16")  # both files fixed, each its own
    sf.write(loud, tone(1.5, 16000), 16000, subtype="PCM_16")  # audio (a copy of a clip is listed as a duplicate)
    assert run(capsys, *args)[0] == 0
    assert not (out / "skipped.csv").exists() and not (out / "warnings.csv").exists()


def test_csv_data_and_min_seconds_from_the_command_line(capsys, tmp_path, data_copy):
    frame = pd.read_csv(data_copy / "meta" / "esc50.csv")
    listing = pd.DataFrame({"filename": "audio/" + frame["filename"], "label": frame["category"], "fold": frame["fold"]})
    listing.to_csv(tmp_path / "clips.csv", index=False)
    args = zeroshot_args(data_copy, tmp_path, "--csv", str(tmp_path / "clips.csv"))
    assert run(capsys, *args)[0] == 0
    assert pd.read_csv(tmp_path / "out" / "zeroshot.csv")["n"].sum() == 15
    code, err = run(capsys, *args, "--min-seconds", "2")
    assert code == 2 and "too short: 1.50 s < min_seconds=2 s" in last_line(err)


def test_fold_not_in_the_dataset_is_refused_before_training(capsys, tmp_path, small_data):
    code, err = run(capsys, "train-residual", *zeroshot_args(small_data, tmp_path)[1:], "--folds", "7")
    assert code == 2
    assert "--folds: no fold 7 in 'esc50': folds are [1, 2, 3, 4, 5]" in last_line(err)
    assert not (tmp_path / "out" / "table.md").exists() and not (tmp_path / "out" / "results.csv").exists()


# ---- outputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_results_and_cache_respect_the_umask(tmp_path, umask):
    from transformers import ClapFeatureExtractor

    from audio_residual.data_processing import FeatureCache
    from audio_residual.io import write_text

    old = os.umask(umask)
    try:
        written = write_text(tmp_path / "report.md", "x")
        data = make_synthetic_esc50(tmp_path / "esc", n_classes=1, clips_per_class=1, seconds=1.0, sample_rate=16000)
        FeatureCache(tmp_path / "cache", ClapFeatureExtractor(max_length_s=1)).compute(load_esc50(data))
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    cache_files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(cache_files) == 3  # config.json, input_features.npy, index.json
    for path in [written, *cache_files]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_full_output_disk_names_the_file_being_written(small_disk, tmp_path):
    """safetensors says "I/O error: No space left on device (os error 28)": an OSError naming the file instead."""
    from safetensors.torch import save_file

    from audio_residual.io import atomic_path

    out = small_disk or tmp_path
    target = out / "stats" / "stats_fold1.safetensors"
    with pytest.raises(OSError) as caught, atomic_path(target) as tmp:
        if small_disk is None:
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file({"a": torch.zeros(2**19)}, str(tmp))  # 2 MiB into 1 MiB
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert "No space left on device" in str(caught.value) and str(target) in str(caught.value)
    assert not target.exists() and not list(target.parent.iterdir())  # no half-written file left


def test_full_output_disk_through_the_command_line(small_disk, small_data, tmp_path, capsys):
    if small_disk is None:
        pytest.skip("needs a small tmpfs (root); the fake-ENOSPC path is tested above")
    (small_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # 64 KiB left
    code, err = run(capsys, "train-residual", "--data", str(small_data), "--model", "tiny-random", "--device", "cpu",
                    "--out", str(small_disk / "run"), "--cache", str(tmp_path / "cache"), "--epochs", "1",
                    "--folds", "1", "--granularity", "layer")
    errors = "\n".join(line for line in err.splitlines() if "error:" in line)
    assert code == 2 and "No space left on device" in errors and str(small_disk / "run") in errors, err


def test_wandb_files_go_under_the_output_folder(tmp_path, monkeypatch):
    """W&B's `dir=` is where it writes `wandb/`; RunTracker must pass the output folder (creating it)."""
    wandb = pytest.importorskip("wandb")
    from audio_residual.training.tracking import RunTracker

    seen = {}
    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs) or SimpleNamespace(finish=lambda: None))
    RunTracker("offline", wandb_dir=tmp_path / "out").finish()
    assert seen["dir"] == str(tmp_path / "out") and (tmp_path / "out").is_dir()


def test_top5_is_not_shown_for_five_classes_or_fewer():
    from audio_residual.evaluation.store import markdown_table

    summary = pd.DataFrame([{
        "method": "zeroshot", "accuracy_mean": 0.5, "accuracy_std": 0.1, "top5_mean": 1.0, "macro_f1_mean": 0.4,
        "trainable_params": 0, "ttest_p": np.nan, "wilcoxon_p": np.nan, "note": "baseline",
    }])
    assert "| zeroshot | 0.5000 ± 0.1000 | — | 0.4000 |" in markdown_table(summary, n_classes=5)
    assert "| zeroshot | 0.5000 ± 0.1000 | 1.0000 | 0.4000 |" in markdown_table(summary, n_classes=6)


def _report_for(data: Path, model_id: str) -> str:
    from audio_residual.experiments.study import _title, describe

    ws = SimpleNamespace(table=load_esc50(data), bundle=SimpleNamespace(model_id=model_id), captioned=False)
    return "\n".join([f"# {_title(ws)}", *describe(ws)])


def test_report_describes_the_data_actually_used(small_data, data_copy):
    recorded = _report_for(data_copy, "tiny-random")
    assert recorded.startswith("# Audio-ResiDual study")
    assert f"ESC-50 layout at `{data_copy}`, audio recordings: 15 clips, 3 classes, 5 folds" in recorded
    assert "model is random-initialised" in recorded and "generated" not in recorded
    generated = _report_for(small_data, "tiny-random")
    assert generated.startswith("# Audio-ResiDual offline demo") and "The data is generated" in generated
    real = _report_for(data_copy, "laion/clap-htsat-unfused")
    assert "model: `laion/clap-htsat-unfused`" in real and "random" not in real
