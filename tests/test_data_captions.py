"""Captioned audio: the caption table, its readers (CSV, Clotho, AudioCaps, Hugging Face) and the generator."""

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from audio_residual.cli import main
from audio_residual.data_processing import DatasetError, FeatureCache, load_esc50
from audio_residual.data_processing.captions import (
    CaptionTable,
    load_audiocaps,
    load_caption_csv,
    load_captions,
    load_clotho,
    load_hf_captions,
)
from audio_residual.data_processing.synthetic_captions import (
    FAMILY_PITCH_CLASSES,
    compose_caption,
    draw_attributes,
    make_attribute_classes,
    make_synthetic_captions,
)


def tone(path, hz=440.0, seconds=1.2, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * hz * t), sr)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return make_synthetic_captions(tmp_path_factory.mktemp("gen") / "caps", n_clips=20, seconds=1.0, seed=3)


def test_generated_captions_describe_each_clip_and_cover_every_split(generated):
    table = load_captions(generated)
    attributes = pd.read_csv(generated / "meta" / "attributes.csv", keep_default_na=False)
    assert len(table) == 20 and table.counts() == {"train": 16, "validation": 2, "test": 2}
    assert all(len(c) == 5 for c in table.captions)
    for row, record in attributes.iterrows():
        assert table.filenames[row] == record["filename"] and table.splits[row] == record["split"]
        for caption in (c.lower() for c in table.captions[row]):
            assert record["family"] in caption  # the family word always; no other family's word
            assert not any(f in caption.split() for f in {"tone", "noise", "chirp", "hum"} - {record["family"]})
        words = " ".join(table.captions[row]).lower().split()
        assert ("low" in words) != ("high" in words) or record["pitch"] in words
    texts, owner = table.caption_pairs(table.rows("test"))
    assert len(texts) == 10 and owner.tolist() == [0] * 5 + [1] * 5


def test_generation_is_reproducible_and_seed_dependent(tmp_path, generated):
    again = make_synthetic_captions(tmp_path / "again", n_clips=20, seconds=1.0, seed=3)
    other = make_synthetic_captions(tmp_path / "other", n_clips=20, seconds=1.0, seed=4)
    assert (again / "captions.csv").read_bytes() == (generated / "captions.csv").read_bytes()
    assert (again / "audio/000005.wav").read_bytes() == (generated / "audio/000005.wav").read_bytes()
    assert (other / "captions.csv").read_bytes() != (generated / "captions.csv").read_bytes()


def test_captions_name_only_attributes_of_the_clip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        attributes = draw_attributes(rng)
        words = set(compose_caption(attributes, rng).replace(",", " ").split())
        opposite = {"low": "high", "high": "low", "quiet": "loud", "loud": "quiet", "early": "late",
                    "late": "early", "slow": "fast", "fast": "slow", "rising": "falling", "falling": "rising",
                    "narrow": "wide", "wide": "narrow"}  # fmt: skip
        for value in attributes.values():
            assert opposite.get(value) not in words


def test_attribute_classes_are_named_by_their_words(tmp_path):
    root = make_attribute_classes(tmp_path / "cls", FAMILY_PITCH_CLASSES, clips_per_class=2, seconds=0.5)
    table = load_esc50(root)
    assert table.class_names[:3] == ("low_tone", "high_tone", "low_noise") and len(table.class_names) == 10
    with pytest.raises(ValueError, match="unknown attribute"):
        make_attribute_classes(tmp_path / "bad", [{"family": "tone", "colour": "red"}])


def test_caption_csv_groups_rows_of_a_file(tmp_path):
    for name in ("a.wav", "b.wav"):
        tone(tmp_path / name)
    (tmp_path / "captions.csv").write_text(
        "filename,caption,split\na.wav,a dog barks,train\nb.wav,rain falls,val\na.wav,a dog is barking,train\n"
    )
    table = load_captions(tmp_path)
    assert table.filenames == ("a.wav", "b.wav") and table.splits == ("train", "validation")
    assert table.captions == (("a dog barks", "a dog is barking"), ("rain falls",))


@pytest.mark.parametrize(
    "body, message",
    [
        ("a.wav,,train\n", "line 2, column 'caption': empty caption"),
        ("a.wav,x,holdout\n", "unknown split 'holdout'"),
        ("a.wav,x,train\na.wav,y,test\n", "'a.wav' is in split 'test' here but 'train' on line 2"),
        ("../a.wav,x,train\n", "points outside"),
    ],
)
def test_caption_csv_bad_input_is_one_line(tmp_path, body, message):
    (tmp_path / "captions.csv").write_text("filename,caption,split\n" + body)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(")):
        load_caption_csv(tmp_path)


def test_caption_csv_not_utf8_and_missing_column(tmp_path):
    (tmp_path / "captions.csv").write_bytes(b"filename,caption,split\na.wav,caf\xe9,train\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_caption_csv(tmp_path)
    (tmp_path / "captions.csv").write_text("filename,text\na.wav,x\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['caption', 'split'\]"):
        load_caption_csv(tmp_path)


def test_clotho_layout(tmp_path):
    for part, names in {"development": ["d1.wav", "d2.wav"], "validation": ["v1.wav"], "evaluation": ["e1.wav"]}.items():
        rows = []
        for name in names:
            tone(tmp_path / f"clotho_audio_{part}" / name)
            rows.append([name] + [f"{name} caption {k}" for k in range(1, 6)])
        pd.DataFrame(rows, columns=["file_name"] + [f"caption_{k}" for k in range(1, 6)]).to_csv(
            tmp_path / f"clotho_captions_{part}.csv", index=False
        )
    table = load_captions(tmp_path)
    assert table.name == "clotho" and table.counts() == {"train": 2, "validation": 1, "test": 1}
    assert table.filenames[0] == "clotho_audio_development/d1.wav" and all(p.is_file() for p in table.paths())
    assert table.captions[3] == tuple(f"e1.wav caption {k}" for k in range(1, 6))
    (tmp_path / "clotho_captions_validation.csv").write_text("file_name,caption_1\nv1.wav,\n")
    with pytest.raises(DatasetError, match="clotho_captions_validation.csv: line 2, column 'caption_1': empty"):
        load_clotho(tmp_path)


def test_audiocaps_layout_skips_and_lists_missing_clips(tmp_path):
    tone(tmp_path / "audio" / "Yabc.wav")
    tone(tmp_path / "audio" / "def_30.wav")
    header = "audiocap_id,youtube_id,start_time,caption\n"
    (tmp_path / "train.csv").write_text(header + "1,abc,0,a tone\n2,gone,10,vanished video\n")
    (tmp_path / "test.csv").write_text(header + "3,def,30,first\n4,def,30,second\n")
    table = load_captions(tmp_path)
    assert table.name == "audiocaps" and table.filenames == ("Yabc.wav", "def_30.wav")
    assert table.captions == (("a tone",), ("first", "second")) and table.splits == ("train", "test")
    assert table.missing == (("train", "gone_10", "no audio file"),)
    (tmp_path / "val.csv").write_text(header + "5,abc,0,moved\n")
    with pytest.raises(DatasetError, match="clip abc@0 is also in train.csv"):
        load_audiocaps(tmp_path)


def test_audiocaps_reads_audioset_style_file_names(tmp_path):
    """AudioCaps mirrors often keep AudioSet's names: `Y<id>_<start>_<end>.wav` (and `<id>_<start>_<end>.wav`),
    the start matched as a number; two clips of one video are told apart by their start."""
    names = {"Y-xY_zz12345_30.000_40.000.wav", "abcdefghijk_0.000_10.000.wav", "Ytwo_10.000_20.000.wav",
             "Ytwo_50.000_60.000.wav", "Yplain.wav"}
    for i, name in enumerate(sorted(names)):
        tone(tmp_path / "audio" / "sub" / name, hz=300.0 + 100 * i)
    header = "audiocap_id,youtube_id,start_time,caption\n"
    (tmp_path / "train.csv").write_text(header + "1,-xY_zz12345,30,first\n2,abcdefghijk,0,second\n"
                                        "3,two,50,late part\n4,two,10,early part\n5,plain,0,plain name\n")
    (tmp_path / "test.csv").write_text(header + "6,-xY_zz12345,90,another segment\n")
    table = load_audiocaps(tmp_path)
    assert table.filenames == ("sub/Y-xY_zz12345_30.000_40.000.wav", "sub/abcdefghijk_0.000_10.000.wav",
                               "sub/Ytwo_50.000_60.000.wav", "sub/Ytwo_10.000_20.000.wav", "sub/Yplain.wav")
    assert table.captions[2:4] == (("late part",), ("early part",))
    assert table.missing == (("test", "-xY_zz12345_90", "no audio file"),)  # no file for that start


def test_a_semicolon_separated_captions_csv_is_named(tmp_path, capsys):
    """A `;`-separated captions.csv: one line naming the file and the separator, exit 2 (it was pandas'
    "Error tokenizing data" when a caption held a comma, a list of missing columns otherwise)."""
    for i in range(2):
        tone(tmp_path / "audio" / f"{i}.wav", hz=300.0 + 100 * i)
    csv = tmp_path / "captions.csv"
    for rows in ("audio/0.wav;a dog barks, loudly;train\naudio/1.wav;rain;test\n",
                 "audio/0.wav;a dog barks;train\naudio/1.wav;rain;test\n"):
        csv.write_text("filename;caption;split\n" + rows)
        assert main(["retrieval", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--model", "tiny",
                     "--cache", str(tmp_path / "cache"), "--wandb", "disabled"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert str(csv) in err and "separated by ';'" in err, err


def test_hf_saved_dataset_with_caption_lists(tmp_path):
    from datasets import Audio, Dataset, DatasetDict

    paths = []
    for i in range(3):
        tone(tmp_path / "src" / f"c{i}.wav", hz=300 + 100 * i)
        paths.append(str(tmp_path / "src" / f"c{i}.wav"))
    def part(rows):
        return Dataset.from_dict({"audio": [paths[i] for i in rows], "captions": [[f"clip {i}", f"sound {i}"] for i in rows]}).cast_column("audio", Audio())
    DatasetDict({"train": part([0, 1]), "test": part([2])}).save_to_disk(str(tmp_path / "saved"))
    table = load_captions(tmp_path / "saved", export_root=tmp_path / "export")
    assert table.splits == ("train", "train", "test") and table.captions[2] == ("clip 2", "sound 2")
    assert [p.read_bytes() for p in table.paths()] == [open(p, "rb").read() for p in paths]
    with pytest.raises(DatasetError, match="no caption column 'text'"):
        load_hf_captions(tmp_path / "saved", tmp_path / "export", caption_column="text")


def test_feature_cache_is_shared_with_labelled_tables(generated, tiny_bundle, tmp_path):
    table = load_captions(generated).subset([0, 1, 2])
    cache = FeatureCache(tmp_path / "cache", tiny_bundle.feature_extractor)
    features = cache.compute(table)
    from audio_residual.data_processing import ClipTable

    labelled = ClipTable(table.name, table.audio_dir, table.filenames, [0, 0, 0], [1, 1, 1], ["x"])
    assert cache.store(labelled) == cache.store(table)
    np.testing.assert_array_equal(cache.compute(labelled).input_features, features.input_features)


def test_caption_table_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="empty caption"):
        CaptionTable("x", ".", ["a.wav"], [["  "]], ["train"])
    with pytest.raises(ValueError, match="unknown split"):
        CaptionTable("x", ".", ["a.wav"], [["cap"]], ["dev"])


def test_every_command_reads_captioned_audio_through_one_loader(generated):
    from audio_residual.data_processing.sources import load_table

    table, same = load_table(generated, captions=True), load_captions(generated)
    assert isinstance(table, CaptionTable)
    assert (table.filenames, table.captions, table.splits) == (same.filenames, same.captions, same.splits)
    assert load_table(table, captions=True) is table  # a loaded table passes as is
    with pytest.raises(DatasetError, match="cannot recognise a dataset"):
        load_table(generated)  # without `captions` it is read as a labelled dataset, which it is not
    with pytest.raises(ValueError, match="--csv lists a labelled dataset"):
        load_table(generated, captions=True, csv="labels.csv")


def test_cli_generates_captioned_audio(tmp_path, capsys):
    assert main(["generate-data", "--captions", "--clips", "6", "--seconds", "0.5", "--out", str(tmp_path / "c")]) == 0
    assert len(load_captions(tmp_path / "c")) == 6 and "captions.csv" in capsys.readouterr().out
