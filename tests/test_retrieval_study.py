"""`audio-residual retrieval`: the study end to end on generated, Clotho- and AudioCaps-layout data, on a LAION `.pt`,
two runs into one folder, a method added in a test; bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch.nn.functional as F
from transformers import ViTConfig, ViTModel

from audio_residual.cli import main
from audio_residual.data_processing.synthetic import make_synthetic_esc50
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
from audio_residual.methods import REGISTRIES, Method, register
from audio_residual.tasks import RETRIEVAL

pytestmark = pytest.mark.usefixtures("single_thread")
FAST = ["--model", "tiny", "--epochs", "1", "--batch-size", "4", "--wandb", "disabled"]
DIRECTIONS = [f"{d}_{m}" for d in ("t2a", "a2t") for m in ("r1", "r5", "r10", "map10", "mean_rank", "random_r1")]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return make_synthetic_captions(root / "gen", n_clips=12, captions_per_clip=2, seconds=1.0, seed=1,
                                   split_fractions=(0.5, 0.25, 0.25))


def read_rows(out):
    return pd.read_csv(out / "retrieval.csv", dtype={"key": str})


def test_study_writes_wide_keyed_rows_figures_examples_transfer_and_resumes(generated, tmp_path, capsys):
    labelled = make_synthetic_esc50(tmp_path / "esc", n_classes=2, clips_per_class=2, seconds=1.0)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["retrieval", "--data", str(generated), "--out", str(out), "--cache", str(cache), *FAST,
            "--methods", "zeroshot,residual,projection,tap"]
    assert main([*args, "--transfer", str(labelled)]) == 0
    table = read_rows(out)
    assert list(table["method"]) == ["zeroshot", "residual", "projection", "tap"]  # one wide row per method
    assert "direction" not in table and (table["fold"] == 0).all()
    for column in ("mean_r1", *DIRECTIONS, "trainable_params", "seconds", "key"):
        assert table[column].notna().all(), column
    np.testing.assert_allclose(table["mean_r1"], (table["t2a_r1"] + table["a2t_r1"]) / 2)
    assert (table["a2t_map10_laion"] >= table["a2t_map10"]).all()  # LAION's code's value beside ours, never below
    assert (table["t2a_random_r1"] == 1 / 3).all()  # the 3 test clips only
    assert table["key"].nunique() == 4
    assert table.loc[table["method"] == "zeroshot", "trainable_params"].eq(0).all()
    assert table.loc[table["method"] != "zeroshot", "trainable_params"].gt(0).all()
    assert table.loc[table["method"] != "zeroshot", "best_epoch"].isin([0, 1]).all()
    transfer = pd.read_csv(out / "transfer.csv")
    assert list(transfer["method"]) == ["residual", "projection", "tap"] and set(transfer["target"]) == {"esc"}
    assert transfer["accuracy"].between(0, 1).all() and transfer["zeroshot"].between(0, 1).all()
    np.testing.assert_allclose(transfer["retention"], transfer["accuracy"] - transfer["zeroshot"])
    for name in ("figures/t2a_r1_a2t_r1_vs_parameters.png", "examples.json", "report.md", "provenance.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "## Zero-shot retention" in report and "random R@1" in report and "✓" in report
    assert "A→T mAP@10 (LAION's code)" in report
    assert all(f"| {method} |" in report for method in table["method"])
    # Without transfer, stored rows of the same key are reused: nothing trains again.
    seconds = table["seconds"].copy()
    assert main(args) == 0
    again = read_rows(out)
    np.testing.assert_array_equal(again["seconds"], seconds)
    capsys.readouterr()


def _retrieval_process(data, out, cache, methods):
    argv = ["retrieval", "--data", str(data), "--out", str(out), "--cache", str(cache), *FAST, "--methods", methods]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "audio_residual", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_with_other_methods_into_one_out_keep_every_row(generated, tmp_path):
    """Two agents on one --out (and --cache), each with its own methods: retrieval.csv ends with every row of both."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    runs = [_retrieval_process(generated, out, cache, methods) for methods in ("zeroshot,projection", "zeroshot,tap")]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [e.strip().splitlines()[-3:] for e in errors]
    table = read_rows(out)
    assert sorted(table["method"]) == ["projection", "tap", "zeroshot"]  # zero-shot's one key: one row
    assert not table.duplicated(["method", "fold", "key"]).any() and table["mean_r1"].notna().all()


class CentredAudio(Method):
    """A toy retrieval method defined outside the package: audio embeddings minus (a share of) the training
    clips' mean, renormalised. Registered only by the test that uses it."""

    name = "toy_centred"
    tasks = ("retrieval",)
    defaults = {"share": 1.0}

    def fit(self, ctx):
        return ctx.options["share"] * ctx.embed(ctx.split.train).mean(0)

    def embed(self, model, ws, rows):
        return F.normalize(ws.embeddings(rows) - model, dim=-1)

    def trainable_params(self, model) -> int:
        return model.numel()


@pytest.fixture
def toy_method():
    register(CentredAudio)
    yield REGISTRIES["retrieval"][CentredAudio.name]
    REGISTRIES["retrieval"].pop(CentredAudio.name)


def test_a_method_registered_outside_the_package_joins_the_study(generated, tmp_path, toy_method):
    from audio_residual.clap.loading import ModelSource
    from audio_residual.experiments.config import StudyConfig
    from audio_residual.experiments.study import Study
    from audio_residual.workspace import Workspace

    ws = Workspace.open(generated, ModelSource("tiny", device="cpu"), cache_dir=tmp_path / "cache", captions=True)
    config = StudyConfig(task="retrieval", methods=("zeroshot", "toy_centred"), options={"toy_centred": {"share": 0.5}})
    outcome = Study(ws, tmp_path / "out", config).run()
    table = read_rows(tmp_path / "out")
    assert list(table["method"]) == ["zeroshot", "toy_centred"] and list(outcome.store.frame["method"]) == list(
        table["method"])
    (split,) = ws.splits()
    expected, _ = RETRIEVAL.evaluate(
        RETRIEVAL.scores(ws, F.normalize(ws.embeddings(split.test) - 0.5 * ws.embeddings(split.train).mean(0), dim=-1),
                         split.test),
        RETRIEVAL.targets(ws, split.test))  # its option reached it: the half-mean is subtracted
    row = table.set_index("method").loc["toy_centred"]
    assert all(row[metric] == pytest.approx(value) for metric, value in expected.items())
    assert row["trainable_params"] == ws.bundle.model.config.projection_dim
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| toy_centred |" in report and "| zeroshot |" in report


def test_a_600_word_caption_runs_through_the_study(long_caption_data, tmp_path, capsys):
    """A caption longer than the text tower reads (it used to crash the batch) is truncated wherever text is
    tokenized: the frozen text side, the projection's encoder, TAP, and fine-tuning through pretraining."""
    out = tmp_path / "out"
    assert main(["retrieval", "--data", str(long_caption_data), "--out", str(out), "--cache", str(tmp_path / "c"),
                 *FAST, "--methods", "zeroshot,projection,tap,finetune"]) == 0
    table = read_rows(out)
    assert list(table["method"]) == ["zeroshot", "projection", "tap", "finetune"]
    assert table["mean_r1"].between(0, 1).all()
    rule = json.loads((out / "provenance.json").read_text())["text_length"]
    assert rule["max_tokens"] == 78 and "position embeddings" in rule["rule"]
    capsys.readouterr()


def test_a_laion_checkpoint_runs_the_study_offline(long_caption_data, tmp_path, laion_pt_for_captions, capsys):
    """`--model FILE.pt --text-config DIR`: converted offline into --cache, studied like any model; --recipe too;
    its captions cut at 77 tokens as LAION's tokenizer cuts them (one is 600 words long)."""
    checkpoint, text_config = laion_pt_for_captions
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["retrieval", "--data", str(long_caption_data), "--out", str(out), "--cache", str(cache), "--model",
                 str(checkpoint), "--text-config", str(text_config), "--epochs", "1", "--batch-size", "4",
                 "--wandb", "disabled", "--methods", "zeroshot,projection", "--recipe", "laion-filelist"]) == 0
    table = read_rows(out)
    assert list(table["method"]) == ["zeroshot", "projection"] and table["mean_r1"].between(0, 1).all()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["recipe"] == "laion-filelist" and provenance["audio"]["recipe"] == "laion-filelist"
    assert provenance["model"] == checkpoint.name and provenance["laion_checkpoint"]["file"] == checkpoint.name
    assert provenance["text_length"]["max_tokens"] == 77
    assert len(list((cache / "models").iterdir())) == 1  # converted once, into the cache
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
                 "--methods", "zeroshot,residual"]) == 0
    table = read_rows(out)
    assert list(table["method"]) == ["zeroshot", "residual"]
    assert (table["t2a_random_r1"] == 1 / 2).all()  # the 2 clips of the test split only
    assert json.loads((out / "provenance.json").read_text())["dataset"] == layout.__name__
    printed = capsys.readouterr().out
    if layout is audiocaps:
        assert "1 listed but missing" in printed
        skipped = pd.read_csv(out / "skipped.csv")
        assert skipped.to_dict("records") == [{"filename": "gone_0", "reason": "no audio file", "split": "train"}]


def test_zeroshot_alone_lists_missing_and_bad_clips_and_reads_audioset_names(tmp_path, capsys):
    """`--methods zeroshot`: OUT/skipped.csv names the clip the AudioCaps layout lacks and the unreadable file;
    clips saved under AudioSet's names (`Y<id>_30.000_40.000.wav`, `<id>_0.000_10.000.wav`) are found."""
    root = tmp_path / "audiocaps"
    header = "audiocap_id,youtube_id,start_time,caption\n"
    files = {"a_b": "Ya_b_30.000_40.000.wav", "c": "c_0.000_10.000.wav", "d": "Yd.wav", "e": "Ye.wav",
             "f": "Yf.wav", "g": "Yg_0.000_10.000.wav", "h": "Yh.wav"}
    starts = {"a_b": 30}
    parts = {"train": ["a_b", "c", "d", "gone"], "val": ["e", "f"], "test": ["g", "h", "k"]}
    hz = iter(range(200, 5000, 150))
    for part, ids in parts.items():
        lines = [f"{i},{yt},{starts.get(yt, 0)},a tone called {yt}\n" for i, yt in enumerate(ids)]
        (root / f"{part}.csv").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{part}.csv").write_text(header + "".join(lines))
        for yt in ids:
            if yt in files:
                tone(root / "audio" / files[yt], hz=float(next(hz)))
    (root / "audio" / "Yk.wav").write_bytes(b"RIFF not really a wave file")  # unreadable audio
    out = tmp_path / "out"
    assert main(["retrieval", "--data", str(root), "--out", str(out), "--cache", str(tmp_path / "c"), *FAST,
                 "--methods", "zeroshot", "--on-bad-file", "skip"]) == 0
    printed = capsys.readouterr().out
    assert "1 listed but missing, 1 skipped as bad audio" in printed
    skipped = pd.read_csv(out / "skipped.csv").sort_values("filename").to_dict("records")
    assert [(r["filename"], r["split"]) for r in skipped] == [("Yk.wav", "test"), ("gone_0", "train")]
    assert skipped[1]["reason"] == "no audio file" and isinstance(skipped[0]["reason"], str)
    table = read_rows(out)
    assert list(table["method"]) == ["zeroshot"] and (table["t2a_random_r1"] == 1 / 2).all()  # g and h, not k


def test_bad_input_is_one_line(generated, tmp_path, capsys):
    vit = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16)).save_pretrained(vit)
    common = ["--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), *FAST]

    def last_error():
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("audio-residual retrieval: error:")
        return err

    assert main(["retrieval", "--data", str(generated), *common, "--methods", "zeroshot,residual,projection",
                 "--method-option", f"projection.text_model={vit}"]) == 2
    assert "is not a text encoder" in last_error()
    assert not {"retrieval.csv", "sweep.csv", "runs"} & {p.name for p in (tmp_path / "o").iterdir()}  # nothing trained
    no_test = tmp_path / "no_test"
    shutil.copytree(generated, no_test)
    captions = pd.read_csv(no_test / "captions.csv")
    captions.assign(split=captions["split"].replace("test", "train")).to_csv(no_test / "captions.csv", index=False)
    assert main(["retrieval", "--data", str(no_test), *common, "--methods", "zeroshot"]) == 2
    assert "the test split has no clips" in last_error()
    # The same audio under two names: within a split counted, across splits refused.
    dup = tmp_path / "dup"
    shutil.copytree(generated, dup)
    captions = pd.read_csv(dup / "captions.csv").drop_duplicates("filename")
    train = list(captions.loc[captions["split"] == "train", "filename"])
    test = list(captions.loc[captions["split"] == "test", "filename"])
    shutil.copy(dup / train[0], dup / train[1])
    assert main(["retrieval", "--data", str(dup), *common, "--methods", "zeroshot"]) == 0
    assert "1 duplicate audio file(s) within a split" in capsys.readouterr().out
    shutil.copy(dup / train[0], dup / test[0])
    assert main(["retrieval", "--data", str(dup), *common, "--methods", "zeroshot"]) == 2
    err = last_error()
    assert "are the same audio" in err and test[0] in err
    assert main(["retrieval", "--data", str(generated), *common, "--methods", "zeroshot,bogus"]) == 2
    assert "unknown retrieval method 'bogus'" in last_error()
    assert main(["retrieval", "--data", str(generated), *common, "--method-option", "tap.bogus=1"]) == 2
    assert "method 'tap' has no option(s) ['bogus']" in last_error()
