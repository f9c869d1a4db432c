"""The same audio in two splits (two folds of labelled data) is refused by every command, one line naming both
files and where they are; within one split or fold it is counted and listed. Aliased paths (`audio/./x.wav`,
`audio//x.wav`) are one file, copies under another name one content (`Workspace.of` → `duplicate_audio`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from audio_residual.data_processing import make_synthetic_esc50
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """6 train, 2 validation, 2 test clips of 1 s, two captions each."""
    return make_synthetic_captions(tmp_path_factory.mktemp("leaks") / "caps", n_clips=10, captions_per_clip=2,
                                   seconds=1.0, seed=5, split_fractions=(0.6, 0.2, 0.2))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """3 classes × 5 clips over 5 folds, 1 s at 16 kHz: every clip has the same size."""
    return make_synthetic_esc50(tmp_path_factory.mktemp("leaks") / "esc", n_classes=3, clips_per_class=5,
                                seconds=1.0, sample_rate=16000, seed=2)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "meta" / "generator.json").unlink(missing_ok=True)  # edited from here on
    return target


def _add_captioned(root: Path, rows: list[tuple[str, str]]) -> None:
    """Append (filename, split) rows, one caption each, to captions.csv."""
    frame = pd.read_csv(root / "captions.csv")
    extra = pd.DataFrame([{"filename": f, "caption": f"another take {i}", "split": s} for i, (f, s) in enumerate(rows)])
    pd.concat([frame, extra]).to_csv(root / "captions.csv", index=False)


def _first(root: Path, split: str) -> str:
    frame = pd.read_csv(root / "captions.csv")
    return frame.loc[frame["split"] == split, "filename"].iloc[0]


def _add_labelled(root: Path, rows: list[tuple[str, int, str]]) -> None:
    """Append (filename, fold, clip) rows, each labelled like the listed `clip`."""
    meta = root / "meta" / "esc50.csv"
    frame = pd.read_csv(meta)
    extra = [{**frame.loc[frame["filename"] == clip].iloc[0].to_dict(), "filename": filename, "fold": fold}
             for filename, fold, clip in rows]
    pd.concat([frame, pd.DataFrame(extra)]).to_csv(meta, index=False)


def _clip_in_fold(root: Path, fold: int) -> str:
    frame = pd.read_csv(root / "meta" / "esc50.csv")
    return frame.loc[frame["fold"] == fold, "filename"].iloc[0]


def _pretrain(cli, data: Path, out: Path, *extra):
    return cli("pretrain", "--data", data, "--out", out, "--epochs", "1", "--batch-size", "4", "--device", "cpu",
               "--cache", out.parent / "cache", "--wandb", "disabled", *extra)


def _retrieval(cli, data: Path, out: Path, *extra):
    return cli("retrieval", "--data", data, "--out", out, "--model", "tiny-random", "--methods", "zeroshot",
               "--device", "cpu", "--cache", out.parent / "cache", "--wandb", "disabled", *extra)


def _zeroshot(cli, data: Path, out: Path, *extra, command="zeroshot"):
    return cli(command, "--data", data, "--out", out, "--model", "tiny-random", "--device", "cpu",
               "--cache", out.parent / "cache", *extra)


def _refused(run, a: str, where_a: str, b: str, where_b: str) -> str:
    assert run.code == 2, run.err
    assert len(run.errors.splitlines()) == 1, run.err
    line = run.errors
    assert "are the same audio" in line and f"{a!r} ({where_a})" in line and f"{b!r} ({where_b})" in line, line
    return line


@pytest.mark.parametrize(("alias", "split"), [("audio/./{}", "test"), ("audio//{}", "validation")])
def test_pretrain_refuses_an_alias_of_a_training_clip_in_another_split(cli, captioned, tmp_path, alias, split):
    data = _copy(captioned, tmp_path / "caps")
    train = _first(data, "train")
    _add_captioned(data, [(alias.format(Path(train).name), split)])
    line = _refused(_pretrain(cli, data, tmp_path / "out"), train, "train", alias.format(Path(train).name), split)
    assert "one file under two names" in line
    assert not (tmp_path / "out" / "model").exists()


def test_captioned_content_copy_in_another_split_is_refused_by_pretrain_and_retrieval(cli, captioned, tmp_path):
    data = _copy(captioned, tmp_path / "caps")
    train = _first(data, "train")
    shutil.copy(data / train, data / "audio" / "copy.wav")
    _add_captioned(data, [("audio/copy.wav", "test")])
    line = _refused(_pretrain(cli, data, tmp_path / "p"), train, "train", "audio/copy.wav", "test")
    assert "identical content" in line
    _refused(_retrieval(cli, data, tmp_path / "r"), train, "train", "audio/copy.wav", "test")


def test_captioned_duplicates_within_a_split_are_counted_and_listed(cli, captioned, tmp_path):
    data = _copy(captioned, tmp_path / "caps")
    train = _first(data, "train")
    shutil.copy(data / train, data / "audio" / "copy.wav")
    _add_captioned(data, [("audio/./" + Path(train).name, "train"), ("audio/copy.wav", "train")])
    run = _retrieval(cli, data, tmp_path / "r")
    assert run.code == 0, run.err
    assert "2 duplicate audio file(s) within a split" in run.out
    listed = pd.read_csv(tmp_path / "r" / "warnings.csv")
    assert set(listed["filename"]) == {"audio/./" + Path(train).name, "audio/copy.wav"}
    assert set(listed["reason"]) == {f"the same audio as {train}"} and set(listed["split"]) == {"train"}
    run = _pretrain(cli, data, tmp_path / "p")
    assert run.code == 0, run.err
    assert "2 duplicate audio file(s) within a split" in run.out
    assert len(pd.read_csv(tmp_path / "p" / "warnings.csv")) == 2


@pytest.mark.parametrize("command", ["zeroshot", "experiment"])
def test_labelled_alias_in_another_fold_is_refused(cli, labelled, tmp_path, command):
    data = _copy(labelled, tmp_path / "esc")
    clip = _clip_in_fold(data, 1)
    _add_labelled(data, [("./" + clip, 3, clip)])
    line = _refused(_zeroshot(cli, data, tmp_path / "out", command=command), clip, "fold 1", "./" + clip, "fold 3")
    assert "a clip in two folds leaks" in line
    assert not (tmp_path / "out" / "zeroshot.csv").exists()


def test_labelled_content_copy_in_another_fold_is_refused(cli, labelled, tmp_path):
    data = _copy(labelled, tmp_path / "esc")
    clip = _clip_in_fold(data, 2)
    shutil.copy(data / "audio" / clip, data / "audio" / "copy.wav")
    _add_labelled(data, [("copy.wav", 5, clip)])
    line = _refused(_zeroshot(cli, data, tmp_path / "out"), clip, "fold 2", "copy.wav", "fold 5")
    assert "identical content" in line


def test_labelled_duplicates_within_a_fold_are_counted_and_listed(cli, labelled, tmp_path):
    data = _copy(labelled, tmp_path / "esc")
    clip = _clip_in_fold(data, 4)
    shutil.copy(data / "audio" / clip, data / "audio" / "copy.wav")
    _add_labelled(data, [(".//" + clip, 4, clip), ("copy.wav", 4, clip)])
    run = _zeroshot(cli, data, tmp_path / "out")
    assert run.code == 0, run.err
    assert "2 duplicate audio file(s) within a fold" in run.out
    listed = pd.read_csv(tmp_path / "out" / "warnings.csv")
    assert set(listed["filename"]) == {".//" + clip, "copy.wav"}
    assert set(listed["reason"]) == {f"the same audio as {clip}"}


def test_mtime_check_sees_one_file_under_two_names(cli, labelled, tmp_path):
    """With --cache-check mtime the bytes are never read, but an alias is still one file (device and inode)."""
    data = _copy(labelled, tmp_path / "esc")
    clip = _clip_in_fold(data, 1)
    _add_labelled(data, [("./" + clip, 2, clip)])
    _refused(_zeroshot(cli, data, tmp_path / "a", "--cache-check", "mtime"), clip, "fold 1", "./" + clip, "fold 2")


def _stamp(folder: Path) -> None:
    """One size and one mtime for every file (clips of one length unpacked from one archive)."""
    for path in folder.iterdir():
        os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    assert len({p.stat().st_size for p in folder.iterdir()}) == 1


def test_mtime_check_never_takes_equal_size_and_mtime_for_the_same_audio(cli, labelled, captioned, tmp_path):
    caps = _copy(captioned, tmp_path / "caps")
    _stamp(caps / "audio")
    run = _retrieval(cli, caps, tmp_path / "c", "--cache-check", "mtime")
    assert run.code == 0, run.err
    assert not (tmp_path / "c" / "warnings.csv").exists()
    esc = _copy(labelled, tmp_path / "esc")
    _stamp(esc / "audio")
    run = _zeroshot(cli, esc, tmp_path / "b", "--cache-check", "mtime")
    assert run.code == 0, run.err
    assert "duplicate audio" not in run.out and not (tmp_path / "b" / "warnings.csv").exists()
