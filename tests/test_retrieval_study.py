"""`audio-residual retrieval`: the study end to end on generated, Clotho- and AudioCaps-layout data; bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from transformers import ViTConfig, ViTModel

from audio_residual.cli import main
from audio_residual.data_processing.synthetic import make_synthetic_esc50
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ["--model", "tiny", "--epochs", "1", "--batch-size", "4"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return make_synthetic_captions(root / "gen", n_clips=12, captions_per_clip=2, seconds=1.0, seed=1,
                                   split_fractions=(0.5, 0.25, 0.25))


def test_study_writes_keyed_rows_figure_examples_retention_and_resumes(generated, tmp_path, capsys):
    labelled = make_synthetic_esc50(tmp_path / "esc", n_classes=2, clips_per_class=2, seconds=1.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["retrieval", "--data", str(generated), "--out", str(out), "--cache", str(cache), *FAST,
            "--methods", "residual,projection,tap", "--retention", str(labelled)]
    assert main(args) == 0
    table = pd.read_csv(out / "retrieval.csv", dtype={"key": str})
    assert list(table["method"]) == ["zero-shot"] * 2 + ["residual"] * 2 + ["projection"] * 2 + ["tap"] * 2
    assert set(table["direction"]) == {"text_to_audio", "audio_to_text"}
    for column in ("r1", "r5", "r10", "map10", "trainable_params", "seconds", "key", "random_r1"):
        assert table[column].notna().all(), column
    assert (table.groupby("method")["key"].nunique() == 1).all() and table["key"].nunique() == 4
    assert table.loc[table["method"] == "zero-shot", "trainable_params"].eq(0).all()
    assert table.loc[table["method"] != "zero-shot", "trainable_params"].gt(0).all()
    retention = pd.read_csv(out / "retention.csv")
    assert list(retention["method"]) == ["zero-shot", "residual", "projection", "tap"]
    assert retention["accuracy"].between(0, 1).all() and (retention["chance"] == 0.5).all()
    for name in ("retrieval_r1_vs_params.png", "examples.json", "report.md", "run.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Retention" in report and "random_r1" in report and "✓" in report
    # Without retention, stored rows of the same key are reused: nothing trains again.
    seconds = table["seconds"].copy()
    assert main([*args[:-2]]) == 0
    again = pd.read_csv(out / "retrieval.csv", dtype={"key": str})
    np.testing.assert_array_equal(again["seconds"], seconds)
    capsys.readouterr()


def tone(path, seconds=1.0, sr=16000, hz=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * hz * t), sr)


def clotho(root):
    hz = iter(range(200, 5000, 150))  # every file distinct audio: the same audio in two splits is refused
    for part, names in {"development": ["d1.wav", "d2.wav", "d3.wav"], "validation": ["v1.wav", "v2.wav"],
                        "evaluation": ["e1.wav", "e2.wav"]}.items():
        rows = []
        for i, name in enumerate(names):
            tone(root / f"clotho_audio_{part}" / name, hz=float(next(hz)))
            rows.append([name] + [f"tone number {i} take {k}" for k in range(1, 6)])
        pd.DataFrame(rows, columns=["file_name"] + [f"caption_{k}" for k in range(1, 6)]).to_csv(
            root / f"clotho_captions_{part}.csv", index=False)
    return root


def audiocaps(root):
    header = "audiocap_id,youtube_id,start_time,caption\n"
    parts = {"train": ["a", "b", "c", "gone"], "val": ["d", "e"], "test": ["f", "g"]}
    hz = iter(range(200, 5000, 150))
    for part, ids in parts.items():
        lines = []
        for yt in ids:
            if yt != "gone":
                tone(root / "audio" / f"Y{yt}.wav", hz=float(next(hz)))
            lines.append(f"{len(lines)},{yt},0,a tone called {yt}\n")
        (root / f"{part}.csv").write_text(header + "".join(lines))
    return root


@pytest.mark.parametrize("layout", [clotho, audiocaps])
def test_study_runs_on_official_layouts(layout, tmp_path, capsys):
    data = layout(tmp_path / layout.__name__)
    out = tmp_path / "out"
    assert main(["retrieval", "--data", str(data), "--out", str(out), "--cache", str(tmp_path / "c"), *FAST,
                 "--methods", "residual"]) == 0
    table = pd.read_csv(out / "retrieval.csv")
    assert set(table["dataset"]) == {layout.__name__} and len(table) == 4
    assert (table["n_audio"] == 2).all()  # the test split only
    printed = capsys.readouterr().out
    if layout is audiocaps:
        assert "1 listed but missing" in printed


def test_bad_input_is_one_line(generated, tmp_path, capsys):
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)).save_pretrained(vit)
    common = ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), *FAST]
    assert main(["retrieval", "--data", str(generated), *common, "--methods", "projection",
                 "--text-model", str(vit)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("audio-residual retrieval: error:") and "is not a text encoder" in err
    no_test = tmp_path / "no_test"
    shutil.copytree(generated, no_test)
    captions = pd.read_csv(no_test / "captions.csv")
    captions.assign(split=captions["split"].replace("test", "train")).to_csv(no_test / "captions.csv", index=False)
    assert main(["retrieval", "--data", str(no_test), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("audio-residual retrieval: error:") and "the test split has no clips" in err
    # The same audio under two names: within a split counted, across splits refused.
    dup = tmp_path / "dup"
    shutil.copytree(generated, dup)
    captions = pd.read_csv(dup / "captions.csv").drop_duplicates("filename")
    train = list(captions.loc[captions["split"] == "train", "filename"])
    test = list(captions.loc[captions["split"] == "test", "filename"])
    shutil.copy(dup / train[0], dup / train[1])
    assert main(["retrieval", "--data", str(dup), *common, "--methods", "zero-shot"]) == 0
    assert "1 duplicate audio file(s) within a split" in capsys.readouterr().out
    shutil.copy(dup / train[0], dup / test[0])
    assert main(["retrieval", "--data", str(dup), *common, "--methods", "zero-shot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "are the same audio" in err and test[0] in err
    with pytest.raises(SystemExit):
        main(["retrieval", "--data", str(generated), *common, "--methods", "bogus"])
