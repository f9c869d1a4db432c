"""Issue 21's second fault round: every case is a one-line error naming the thing (exit 2, no traceback),
a counted and reported skip, or the behaviour a careful user expects."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audio_residual.cli import main
from audio_residual.data_processing import BadAudioError, DatasetError, load_csv_dataset, make_synthetic_esc50
from audio_residual.data_processing.audio import load_audio_checked
from audio_residual.data_processing.datasets import load_gtzan

SR = 16000


def tone(seconds: float, sample_rate: int = SR, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def run(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the error lines of one CLI call; no traceback may reach the user."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, "\n".join(line for line in err.splitlines() if "error:" in line)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """3 classes × 5 clips of 1.5 s over 5 folds."""
    return make_synthetic_esc50(
        tmp_path_factory.mktemp("data") / "esc", n_classes=3, clips_per_class=5, seconds=1.5, sample_rate=SR
    )


# --- Hugging Face datasets -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_full(tmp_path_factory):
    from datasets import Audio, ClassLabel, Dataset

    folder = tmp_path_factory.mktemp("hfsrc")
    rows, labels = [], []
    for i in range(10):
        path = folder / f"c{i}.wav"
        sf.write(path, tone(1.2, SR, 0.1 + 0.05 * (i % 2)), SR)
        rows.append({"bytes": path.read_bytes(), "path": f"c{i}.wav"})
        labels.append(i % 2)
    ds = Dataset.from_dict({"audio": rows, "label": labels}).cast_column("audio", Audio())
    return ds.cast_column("label", ClassLabel(names=["rain", "dog"]))


def _hf_cases(full):
    from datasets import DatasetDict, Value

    return {
        "one_empty_split": (DatasetDict(train=full, test=full.select([])), None),
        "all_splits_empty": (DatasetDict(train=full.select([]), test=full.select([])), "every split (train, test) is empty"),
        "empty_dataset": (full.select([]), "the saved dataset is empty"),
        "renamed_column": (DatasetDict(train=full, test=full.rename_column("label", "tag")),
                           "splits 'train' and 'test' differ in column(s) ['label', 'tag']"),
        "retyped_column": (DatasetDict(train=full, test=full.cast_column("label", Value("string"))),
                           "differ in column(s) ['label']"),
        "fractional_folds": (full.add_column("fold", [1.5 + i % 5 for i in range(10)]),
                             "column 'fold': 1.5 is not an integer fold"),
        "empty_string_label": (full.add_column("genre", ["x", ""] * 5), "empty label ''"),
    }


def test_hf_saved_folders_that_crashed_are_one_line_errors(hf_full, tmp_path, capsys):
    for name, (dataset, expected) in _hf_cases(hf_full).items():
        dataset.save_to_disk(str(tmp_path / name))
        if expected is None:  # an empty split is left out; the others are used
            from audio_residual.data_processing.hf import load_hf_dataset

            assert len(load_hf_dataset(tmp_path / name, tmp_path / "export")) == 10
            continue
        if name == "empty_string_label":
            from audio_residual.data_processing.hf import load_hf_dataset

            with pytest.raises(DatasetError, match=expected):
                load_hf_dataset(tmp_path / name, tmp_path / "export", label_column="genre")
            continue
        code, err = run(capsys, "zeroshot", "--data", tmp_path / name, "--model", "tiny-random", "--device", "cpu",
                        "--out", tmp_path / "out", "--cache", tmp_path / "cache")
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (name, err)


@pytest.mark.parametrize("spec", ["hf:../..", "hf:./x", "hf:owner/..", "hf:../name:config"])
def test_hf_ids_naming_folders_are_refused(spec, capsys, tmp_path):
    code, err = run(capsys, "zeroshot", "--data", spec, "--model", "tiny-random", "--out", tmp_path / "o",
                    "--cache", tmp_path / "c")
    assert code == 2 and "may not start with '.'" in err


def test_hf_integral_float_folds_are_kept(hf_full, tmp_path):
    from audio_residual.data_processing.hf import load_hf_dataset

    hf_full.add_column("fold", [float(1 + i % 5) for i in range(10)]).save_to_disk(str(tmp_path / "f"))
    assert load_hf_dataset(tmp_path / "f", tmp_path / "e").folds.tolist() == [1 + i % 5 for i in range(10)]


def test_csv_and_esc50_empty_labels_are_refused(tmp_path, small_data):
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label,fold\na.wav,dog,1\nb.wav,,2\n")
    with pytest.raises(DatasetError, match=r"line 3, column 'label': empty label"):
        load_csv_dataset(tmp_path, csv)
    data = tmp_path / "esc"
    shutil.copytree(small_data, data)
    meta = pd.read_csv(data / "meta" / "esc50.csv")
    meta.loc[meta["target"] == 0, "category"] = ""
    meta.to_csv(data / "meta" / "esc50.csv", index=False)
    with pytest.raises(DatasetError, match="column 'category': empty label"):
        from audio_residual.data_processing import load_esc50

        load_esc50(data)


# --- GTZAN -----------------------------------------------------------------------------------------------


def _au(path: Path, audio: np.ndarray, sample_rate: int = 22050) -> None:
    sf.write(path, audio, sample_rate, format="AU", subtype="PCM_16")


def _gtzan(root: Path, per_genre: int = 10, genres=("blues", "jazz")) -> Path:
    for genre in genres:
        (root / "genres" / genre).mkdir(parents=True)
        for i in range(per_genre):
            _au(root / "genres" / genre / f"{genre}.{i:05d}.au", tone(1.2, 22050, 0.1 + 0.01 * i))
    return root


def test_gtzan_au_without_magic_or_cut_short_is_a_bad_file(tmp_path):
    good = tmp_path / "good.au"
    _au(good, tone(2.0, 22050))
    assert load_audio_checked(good)[0].size > 0
    garbage, html, cut = tmp_path / "garbage.au", tmp_path / "page.au", tmp_path / "cut.au"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    html.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>" * 1000)
    cut.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.75)])
    for path, reason in [(garbage, "no '.snd' magic"), (html, "no '.snd' magic"), (cut, "truncated .au")]:
        with pytest.raises(BadAudioError, match=reason):
            load_audio_checked(path)
    header = bytearray(good.read_bytes())
    header[4:8] = struct.pack(">I", 10**9)  # data offset past the end of the file
    broken = tmp_path / "offset.au"
    broken.write_bytes(bytes(header))
    with pytest.raises(BadAudioError, match="broken .au header"):
        load_audio_checked(broken)


def test_gtzan_ignores_hidden_folders_and_files(tmp_path):
    root = _gtzan(tmp_path / "g")
    (root / "genres" / ".ipynb_checkpoints").mkdir()
    shutil.copy(next((root / "genres" / "jazz").iterdir()), root / "genres" / ".ipynb_checkpoints" / "x.au")
    (root / "genres" / "jazz" / "._jazz.00000.au").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    table = load_gtzan(root)
    assert table.class_names == ("blues", "jazz") and len(table) == 20
    assert not any("/." in name for name in table.filenames)


def test_gtzan_with_too_few_clips_names_the_genre_and_the_rule(tmp_path, capsys):
    root = _gtzan(tmp_path / "g", per_genre=10)
    for i in range(6, 10):
        (root / "genres" / "jazz" / f"jazz.{i:05d}.au").unlink()
    code, err = run(capsys, "zeroshot", "--data", root, "--model", "tiny-random", "--out", tmp_path / "o",
                    "--cache", tmp_path / "c", "--device", "cpu")
    assert code == 2 and "GTZAN" in err and "class 'jazz' has 6 clip(s)" in err
    assert "10 stratified folds need at least 10 clips per class" in err and "n_splits" not in err


# --- WAV headers, long clips, silence ------------------------------------------------------------------


def _with_rate(path: Path, audio: np.ndarray, claimed_rate: int) -> None:
    """A PCM-16 wav whose header claims `claimed_rate` (byte rate patched to match)."""
    sf.write(path, audio, SR, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:28] = struct.pack("<I", claimed_rate)
    data[28:32] = struct.pack("<I", (claimed_rate * 2) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 2**31 - 1])
def test_absurd_header_rates_are_refused_before_decoding(tmp_path, rate):
    path = tmp_path / "clip.wav"
    _with_rate(path, tone(1.0), rate)
    with pytest.raises(BadAudioError, match=f"implausible sample rate {rate} Hz"):
        load_audio_checked(path, min_seconds=0)


def test_absurd_durations_are_refused_before_decoding(tmp_path, monkeypatch):
    from audio_residual.data_processing import audio as audio_module

    path = tmp_path / "long.wav"
    sf.write(path, tone(3.0, 1000), 1000)  # 3 s: pretend the limit is 2 s
    monkeypatch.setattr(audio_module, "MAX_SECONDS", 2.0)
    monkeypatch.setattr(audio_module.sf, "read", lambda *a, **k: pytest.fail("decoded an absurd file"))
    with pytest.raises(BadAudioError, match="implausibly long"):
        load_audio_checked(path)


def test_long_clips_are_cropped_before_resampling(tmp_path, monkeypatch):
    from audio_residual.data_processing import recipes

    path = tmp_path / "long.wav"
    sf.write(path, tone(120.0, 8000), 8000, subtype="PCM_16")  # two minutes at 8 kHz
    resampled = []
    real = recipes.soxr.resample
    monkeypatch.setattr(recipes.soxr, "resample", lambda x, *a, **k: resampled.append(x.size) or real(x, *a, **k))
    audio, _ = load_audio_checked(path, max_seconds=10.0, seed=3)
    assert resampled == [int(np.ceil(10.5 * 8000))]  # 10 s plus the margin, never the whole clip
    assert audio.size == (10.5 - 2 * 0.2) * 48000  # the resampler's start-up cut from both ends: still > 10 s
    again, _ = load_audio_checked(path, max_seconds=10.0, seed=3)
    np.testing.assert_array_equal(audio, again)  # the window is seeded: reproducible
    assert load_audio_checked(path, max_seconds=10.0, seed=4)[0].size == audio.size
    # and the window is the whole clip's resampled audio at that place (the edges' start-up cut off)
    window, _ = load_audio_checked(path, max_seconds=10.0, seed=3, int16_roundtrip=False)
    full, _ = load_audio_checked(path, int16_roundtrip=False)
    start = int(np.random.default_rng(3).integers(0, 120 * 8000 - 84000 + 1)) * 6 + int(0.2 * 48000)
    np.testing.assert_allclose(window, full[start : start + window.size], atol=1e-4)


def test_silence_is_judged_after_the_mono_mix_and_the_int16_round_trip(tmp_path):
    stereo = tmp_path / "phase.wav"
    left = tone(1.5)
    sf.write(stereo, np.stack([left, -left], axis=1), SR, subtype="FLOAT")
    with pytest.raises(BadAudioError, match="silent: the mono mix is all zeros"):
        load_audio_checked(stereo)
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, tone(1.5, amplitude=1e-6), SR, subtype="FLOAT")  # −120 dBFS
    with pytest.raises(BadAudioError, match="after the int16 round trip"):
        load_audio_checked(quiet)
    assert np.any(load_audio_checked(quiet, int16_roundtrip=False)[0])  # without the round trip it is signal


# --- model folders ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_data) -> Path:
    from audio_residual.clap.loading import load_clap
    from audio_residual.data_processing import load_esc50

    bundle = load_clap("tiny-random", device="cpu", class_names=load_esc50(small_data).class_names)
    folder = tmp_path_factory.mktemp("model") / "clap"
    bundle.model.save_pretrained(folder)
    bundle.processor.save_pretrained(folder)
    return folder


def _damaged(saved_model: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    shutil.copytree(saved_model, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    if case == "projection_dim":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "projection_dim": 2 * config["projection_dim"]}))
    elif case == "no_tokenizer":
        for path in folder.iterdir():
            if path.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
                path.unlink()
    else:
        weights.write_bytes({"truncated": data[: len(data) // 2], "header_only": data[:header], "empty": b"",
                             "garbage": b"<html>Not Found</html>" * 50}[case])
    return folder


@pytest.mark.parametrize("case, expected", [
    ("truncated", "model.safetensors is damaged"),
    ("header_only", "model.safetensors is damaged"),
    ("empty", "model.safetensors is damaged"),
    ("garbage", "model.safetensors is damaged"),
    ("projection_dim", "its weights do not match its config.json (config.json says projection_dim=64, the weights have 32)"),
    ("no_tokenizer", "gives different prompts the same ids: the folder lacks the model's tokenizer files"),
])
def test_damaged_model_folders_are_one_line_errors(saved_model, small_data, tmp_path, capsys, case, expected):
    folder = _damaged(saved_model, tmp_path, case)
    code, err = run(capsys, "zeroshot", "--data", small_data, "--model", folder, "--device", "cpu",
                    "--out", tmp_path / "out", "--cache", tmp_path / "cache")
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert case in err or str(folder) in err


def test_the_saved_model_itself_loads(saved_model):
    from audio_residual.clap.loading import load_clap

    assert load_clap(saved_model, device="cpu").model.config.projection_dim == 32


def test_a_tokenizer_larger_than_the_text_vocabulary_is_refused(tiny_bundle):
    from audio_residual.clap.loading import check_tokenizer

    class Wide:
        all_special_ids = [0]

        def __len__(self):
            return tiny_bundle.model.config.text_config.vocab_size + 1

        def __call__(self, text):
            return {"input_ids": [len(text)]}

    with pytest.raises(ValueError, match="tokenizer has 513 tokens but the text config's vocab_size is 512"):
        check_tokenizer(tiny_bundle.model, Wide(), "m")


# --- full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs when this process may mount one (root), else None (the tests then fake ENOSPC)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_cache_disk_names_the_feature_file_and_reruns_cleanly(small_disk, small_data, tmp_path, capsys, monkeypatch):
    """The features of 15 clips (~3.8 MB) cannot fit: an error naming the file, not a SIGBUS ("Bus error")."""
    if small_disk is None:  # fallback: posix_fallocate reports the full disk
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)
    cache = small_disk or tmp_path / "cache"
    argv = ["zeroshot", "--data", small_data, "--model", "tiny-random", "--device", "cpu", "--out", tmp_path / "out",
            "--cache", cache]
    for _ in range(2):  # and again on the rerun
        code, err = run(capsys, *argv)
        assert code == 2 and "No space left on device" in err and "input_features.npy" in err, err
    assert not list(Path(cache).rglob("index.json"))  # nothing vouches for rows that were never written
    assert not [p for p in Path(cache).rglob("*") if p.name.endswith(".tmp")]


def test_full_output_disk_names_the_file_being_written(small_disk, tmp_path):
    """safetensors says "I/O error: No space left on device (os error 28)": an OSError naming the file instead."""
    import torch
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
    code, err = run(capsys, "train-residual", "--data", small_data, "--model", "tiny-random", "--device", "cpu",
                    "--out", small_disk / "run", "--cache", tmp_path / "cache", "--epochs", "1", "--folds", "1",
                    "--granularity", "layer")
    assert code == 2 and "No space left on device" in err and str(small_disk / "run") in err, err


# --- extraction workers ----------------------------------------------------------------------------------

_PARENT = """
import os, sys, time
from pathlib import Path
from transformers import ClapFeatureExtractor
from audio_residual.data_processing.features import FeatureCache

class Slow(FeatureCache):
    def _clip(self, audio_dir, filename):
        (Path(sys.argv[1]) / str(os.getpid())).touch()
        time.sleep(120)

list(Slow(sys.argv[1], ClapFeatureExtractor())._clips(Path("."), [str(i) for i in range(16)], 2))
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_extraction_workers_exit_when_their_parent_is_killed(tmp_path):
    import signal
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    (tmp_path / "pids").mkdir()
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "pids")], env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in (tmp_path / "pids").iterdir()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
    finally:
        parent.send_signal(signal.SIGKILL)  # kill -9: no cleanup of its own can run
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if _alive(pid)]
    for pid in alive:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, "workers outlived their parent"


# --- study wiring: transfer, provenance, grid, classes ---------------------------------------------------


def _esc_copy(small_data: Path, tmp_path: Path, name: str = "esc") -> Path:
    target = tmp_path / name
    shutil.copytree(small_data, target)
    return target


@pytest.mark.parametrize("spelling", ["slash", "absolute", "symlink"])
def test_transfer_to_the_studys_own_dataset_is_refused_however_spelled(small_data, tmp_path, capsys, monkeypatch,
                                                                        spelling):
    data = _esc_copy(small_data, tmp_path)
    monkeypatch.chdir(tmp_path)
    other = {"slash": "esc/", "absolute": str(data.resolve()), "symlink": str(tmp_path / "link")}[spelling]
    if spelling == "symlink":
        (tmp_path / "link").symlink_to(data)
    code, err = run(capsys, "experiment", "--data", "esc", "--transfer", other, "--model", "tiny-random",
                    "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--device", "cpu")
    assert code == 2 and f"--transfer {other}: that is the --data dataset" in err
    assert not (tmp_path / "cache" / "features").exists()  # refused before any work


def test_transfer_targets_are_prepared_like_the_study_and_their_skips_listed(small_data, tmp_path, capsys,
                                                                            monkeypatch):
    import audio_residual.experiments.study as study_module
    from audio_residual.data_processing import features as features_module

    data, other = _esc_copy(small_data, tmp_path), _esc_copy(small_data, tmp_path, "other")
    for i, name in enumerate(sorted((other / "audio").iterdir())[:2]):  # two clips of 0.6 s in the target
        sf.write(name, tone(0.6, SR, 0.2 + 0.1 * i), SR)
    seen = {}
    real_compute = features_module.FeatureCache.compute

    def compute(self, table, on_bad_file="error", workers=1):
        seen[str(table.audio_dir)] = (self.min_seconds, self.check, workers)
        return real_compute(self, table, on_bad_file=on_bad_file, workers=1)

    monkeypatch.setattr(features_module.FeatureCache, "compute", compute)

    class Outcome:
        table = "(study stubbed)"

    def study(ws, out, *args, transfer=None, **kwargs):
        seen["transfer"] = transfer
        return Outcome()

    monkeypatch.setattr(study_module, "run_study", study)
    code = main([str(a) for a in ["experiment", "--data", data, "--transfer", other, "--model", "tiny-random",
                                  "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--device", "cpu",
                                  "--min-seconds", "0.5", "--cache-check", "mtime", "--workers", "2",
                                  "--on-bad-file", "skip", "--wandb", "disabled"]])
    printed = capsys.readouterr().out
    assert code == 0
    assert seen[str(other / "audio")] == (0.5, "mtime", 2)  # the target got the study's options
    assert seen["transfer"]["other"].features.valid.all()  # 0.6 s ≥ --min-seconds 0.5: used
    code = main([str(a) for a in ["experiment", "--data", data, "--transfer", other, "--model", "tiny-random",
                                  "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--device", "cpu",
                                  "--on-bad-file", "skip", "--wandb", "disabled"]])
    printed = capsys.readouterr().out
    assert code == 0 and "transfer other: skipped 2 bad file(s)" in printed
    listed = pd.read_csv(tmp_path / "out" / "skipped-other.csv")
    assert len(listed) == 2 and listed["reason"].str.contains("too short").all()


def test_provenance_describes_the_outputs_beside_it(small_data, tmp_path, capsys, monkeypatch):
    from audio_residual.evaluation import zeroshot as zeroshot_module

    out = tmp_path / "out"
    argv = ["zeroshot", "--data", small_data, "--model", "tiny-random", "--device", "cpu", "--out", out,
            "--cache", tmp_path / "cache"]
    assert run(capsys, *argv, "--template", "A sound of {label}.")[0] == 0
    before = (out / "zeroshot.csv").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zeroshot_module, "zero_shot_by_fold", killed)
    assert run(capsys, *argv, "--template", "Another {label}.")[0] == 130  # stopped midway
    assert (out / "zeroshot.csv").read_bytes() == before
    assert json.loads((out / "provenance.json").read_text())["templates"] == ["A sound of {label}."]


def test_a_grid_without_fold_sweeps_every_fold(small_data, tmp_path, monkeypatch):
    from audio_residual.experiments import sweep as sweep_module
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.workspace import Workspace

    ws = Workspace.open(small_data, model="tiny-random", cache_dir=tmp_path / "cache", device="cpu")
    trained = []
    monkeypatch.setattr(sweep_module, "train_point",
                        lambda ws, point, *a, **k: trained.append(point["fold"]) or {"val_accuracy": 0.5})
    config = StudyConfig(grid={"lr": [0.1]}, base={})
    frame = sweep_module.run_sweep(ws, tmp_path / "out", config, use_wandb=False)
    assert sorted(trained) == [1, 2, 3, 4, 5] and sorted(frame["fold"]) == [1, 2, 3, 4, 5]
    assert len(sweep_module.finished_sweep(ws, tmp_path / "out", config)) == 5  # and reads back as finished


def test_a_class_only_in_one_test_fold_is_named_before_any_work(small_data, tmp_path, capsys):
    data = _esc_copy(small_data, tmp_path)
    meta = pd.read_csv(data / "meta" / "esc50.csv")
    name = meta.loc[meta["target"] == 2, "category"].iloc[0]
    meta.loc[meta["target"] == 2, "fold"] = 3
    meta.to_csv(data / "meta" / "esc50.csv", index=False)
    code, err = run(capsys, "experiment", "--data", data, "--model", "tiny-random", "--device", "cpu",
                    "--out", tmp_path / "out", "--cache", tmp_path / "cache", "--wandb", "disabled")
    assert code == 2 and f"'esc50': class {name!r} has clips only in fold 3" in err and "fold 3 as the test fold" in err
    assert not (tmp_path / "out" / "analysis").exists() and not (tmp_path / "out" / "sweep.csv").exists()


def test_a_sparse_feature_file_left_by_an_old_crash_is_reserved_or_refused(small_disk, tmp_path, monkeypatch):
    """A rerun reopens the feature file of the crashed run: its holes are reserved before any page is written."""
    from audio_residual.io import preallocate

    if small_disk is None:
        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)
    sparse = (small_disk or tmp_path) / "input_features.npy"
    with open(sparse, "wb") as handle:
        handle.truncate(4 * 2**20)  # 4 MiB of holes on a 1 MiB disk
    with pytest.raises(OSError, match="cannot reserve 4.0 MiB") as caught:
        preallocate(sparse, sparse.stat().st_size)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(sparse)
