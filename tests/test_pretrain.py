"""`audio-residual pretrain`: the contrastive recipe's pieces, a run end to end, resume, and the CLI's layouts."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from audio_residual.clap.loading import load_clap
from audio_residual.cli import main
from audio_residual.data_processing.captions import load_captions
from audio_residual.data_processing.synthetic_captions import make_synthetic_captions
from audio_residual.tasks.loss import symmetric_infonce
from audio_residual.training import pretrain as P
from audio_residual.training import pretrain_run as R


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    root = make_synthetic_captions(tmp_path_factory.mktemp("pre") / "caps", n_clips=12, seconds=1.0, seed=1,
                                   split_fractions=(0.6, 0.2, 0.2))  # fmt: skip
    return load_captions(root)


@pytest.fixture(scope="module")
def tiny():
    return P.new_clap("tiny", P.caption_tokenizer(["a low tone", "a high chirp"]), seed=0)


def test_symmetric_loss_scores_each_direction_once():
    torch.manual_seed(0)
    audio, text = torch.randn(5, 8), torch.randn(5, 8)
    scale_a, scale_t = torch.tensor(math.log(10.0)), torch.tensor(math.log(3.0))
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    target = torch.arange(5)
    expected = (F.cross_entropy(10 * a @ t.T, target) + F.cross_entropy(3 * t @ a.T, target)) / 2
    loss = P.contrastive_loss(audio, text, scale_a, scale_t)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    swapped = P.contrastive_loss(text, audio, scale_t, scale_a)  # the roles are symmetric
    torch.testing.assert_close(loss, swapped, rtol=1e-6, atol=1e-6)
    # transformers' return_loss scores text→audio twice: it differs from CLIP's loss when the scales differ
    twice = (F.cross_entropy(3 * t @ a.T, target) + F.cross_entropy((10 * a @ t.T).T, target)) / 2
    assert not torch.allclose(loss, twice)
    # It is the one symmetric InfoNCE of every task, with CLAP's per-direction temperature.
    ids = torch.arange(5)
    torch.testing.assert_close(loss, symmetric_infonce(10 * a @ t.T, ids, ids, 3 * t @ a.T), rtol=1e-6, atol=1e-6)


def test_several_captions_per_clip_are_all_positives():
    """--all-captions: every caption of a clip in the step; each caption's positive is its clip, and each clip's
    target is spread evenly over its captions (not pushed apart as the one-positive diagonal would)."""
    torch.manual_seed(1)
    audio, text = torch.randn(2, 6), torch.randn(5, 6)
    owner = torch.tensor([0, 0, 0, 1, 1])
    scale_a, scale_t = torch.tensor(math.log(10.0)), torch.tensor(math.log(3.0))
    a, t = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    rows = (10 * a @ t.T).log_softmax(1)
    a2t = -(rows[0, :3].mean() + rows[1, 3:].mean()) / 2
    cols = (3 * t @ a.T).log_softmax(1)
    t2a = -cols[torch.arange(5), owner].mean()
    loss = P.contrastive_loss(audio, text, scale_a, scale_t, owner)
    torch.testing.assert_close(loss, (a2t + t2a) / 2, rtol=1e-6, atol=1e-6)
    # With one caption per clip it is CLIP's loss.
    one = P.contrastive_loss(audio, text[[0, 3]], scale_a, scale_t, torch.tensor([0, 1]))
    torch.testing.assert_close(one, P.contrastive_loss(audio, text[[0, 3]], scale_a, scale_t), rtol=1e-6, atol=1e-6)


def test_all_captions_batches_bring_every_caption_of_each_clip():
    caption_clip = np.array([0, 0, 1, 2, 2, 2, 3])  # table row of each caption
    data = P.CaptionedFeatures(None, None, None, None, caption_clip, train_rows=np.array([0, 1, 2, 3]),
                               validation_rows=np.array([], dtype=np.int64))
    for all_captions in (True, False):
        batches = P.epoch_batches(data, 3, torch.Generator().manual_seed(0), all_captions)
        assert [len(rows) for rows, _, _ in batches] == [3]  # the last clip alone has no negative: dropped
        for rows, captions, owner in batches:
            assert (caption_clip[captions] == rows[owner]).all()  # each caption's owner is its clip's position
            counts = np.bincount(owner, minlength=len(rows))
            expected = np.bincount(caption_clip)[rows] if all_captions else np.ones(len(rows), int)
            np.testing.assert_array_equal(counts, expected)


def test_logit_scale_clamped_at_100(tiny):
    model, _ = tiny
    with torch.no_grad():
        model.logit_scale_a.fill_(10.0)
    P.clamp_logit_scale(model)
    assert float(model.logit_scale_a.detach().exp()) == pytest.approx(100.0, rel=1e-5)


def test_warmup_then_cosine(tiny):
    model, _ = tiny
    params = P.trainable_parameters(model, "none")
    recipe = P.PretrainConfig(lr=1.0, warmup=0.1)
    optimizer, schedule = P.optimizer_and_schedule(model, params, recipe, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[99] < 0.01
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.logit_scale_a) not in decayed and id(model.text_projection.linear1.weight) in decayed


def test_freeze_text_trains_only_the_audio_side(tiny):
    model, _ = tiny
    params = P.trainable_parameters(model, "text")
    assert params and not any(n.startswith(("text_model.", "text_projection.")) for n in params)
    assert not model.text_model.embeddings.word_embeddings.weight.requires_grad
    assert "logit_scale_a" in params and any(n.startswith("audio_model.") for n in params)
    P.trainable_parameters(model, "none")
    with pytest.raises(ValueError, match="--freeze"):
        P.PretrainConfig(freeze="both")


def _run(table, out, epochs=2, **kw):
    recipe = P.PretrainConfig(epochs=epochs, batch_size=4, lr=1e-3, **kw)
    return R.pretrain(table, R.PretrainSource("tiny"), recipe, R.PretrainRun(out, cache_dir=out.parent / "cache", device="cpu",
                                                                                wandb="disabled"))


def test_pretrain_writes_a_model_folder_with_provenance_and_keeps_the_best_epoch(captions, tmp_path, single_thread):
    folder = _run(captions, tmp_path / "run")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2] and np.isfinite(history["train_loss"][1:]).all()
    provenance = json.loads((folder / R.PROVENANCE_FILE).read_text())
    best = int(np.argmax(history["mean_r1"].to_numpy()))  # first maximum: ties keep the earlier epoch
    assert provenance["best_epoch"] == best and provenance["validation"]["mean_r1"] == history["mean_r1"][best]
    assert provenance["data"]["clips"] == captions.counts() and provenance["training"]["epochs"] == 2
    assert {"t2a_r1", "a2t_r5", "t2a_map10", "a2t_map10"} <= set(history.columns)
    bundle = load_clap(folder, device="cpu")  # every command takes it as --model DIR
    assert bundle.model.config.projection_dim == 32 and len(bundle.tokenizer) <= 512
    assert (folder / "model.safetensors").is_file()


def test_killed_run_resumes_to_the_uninterrupted_result(captions, tmp_path, monkeypatch, single_thread):
    whole = _run(captions, tmp_path / "whole", epochs=2, seed=3)
    from audio_residual.training import loop

    real_epoch = loop._epoch
    calls = {"n": 0}

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "_epoch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _run(captions, tmp_path / "killed", epochs=2, seed=3)
    monkeypatch.setattr(loop, "_epoch", real_epoch)
    resumed = _run(captions, tmp_path / "killed", epochs=2, seed=3)
    a = pd.read_csv(tmp_path / "whole" / "history.csv")
    b = pd.read_csv(tmp_path / "killed" / "history.csv")
    pd.testing.assert_frame_equal(a, b, atol=1e-6, rtol=1e-5)
    wa, wb = load_clap(whole, device="cpu").model.state_dict(), load_clap(resumed, device="cpu").model.state_dict()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)


def _tone(path, hz):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(57600) / 48000
    sf.write(path, 0.3 * np.sin(2 * np.pi * hz * t), 48000)


def test_cli_pretrains_on_clotho_and_audiocaps_layouts(tmp_path, capsys, single_thread):
    clotho = tmp_path / "clotho"
    for part, n in {"development": 4, "validation": 2}.items():
        names = [f"{part}{i}.wav" for i in range(n)]
        for i, name in enumerate(names):
            _tone(clotho / f"clotho_audio_{part}" / name, 200 + 300 * i)  # validation's two = development's first two
        rows = [[name] + [f"tone number {i} take {k}" for k in range(5)] for i, name in enumerate(names)]
        pd.DataFrame(rows, columns=["file_name"] + [f"caption_{k}" for k in range(1, 6)]).to_csv(
            clotho / f"clotho_captions_{part}.csv", index=False
        )
    common = ["--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--cache", str(tmp_path / "c"),
              "--wandb", "disabled"]  # fmt: skip
    # The same audio in two splits would be validated on what it trained on: refused, one line.
    assert main(["pretrain", "--data", str(clotho), "--out", str(tmp_path / "o1"), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "are the same audio" in err[-1] and "clotho_audio_validation/validation0.wav" in err[-1]
    for i in range(2):
        _tone(clotho / "clotho_audio_validation" / f"validation{i}.wav", 350 + 300 * i)
    assert main(["pretrain", "--data", str(clotho), "--out", str(tmp_path / "o1"), *common]) == 0
    assert load_clap(tmp_path / "o1" / "model", device="cpu").model_id.endswith("model")
    audiocaps = tmp_path / "audiocaps"
    header = "audiocap_id,youtube_id,start_time,caption\n"
    for i in range(4):
        _tone(audiocaps / "audio" / f"Yv{i}.wav", 300 + 200 * i)
    (audiocaps / "train.csv").write_text(header + "".join(f"{i},v{i},0,tone {i}\n" for i in range(3)) + "9,gone,0,x\n")
    (audiocaps / "val.csv").write_text(header + "5,v3,0,tone three\n6,v3,0,a third tone\n")
    assert main(["pretrain", "--data", str(audiocaps), "--out", str(tmp_path / "o2"), *common, "--freeze", "text"]) == 0
    skipped = pd.read_csv(tmp_path / "o2" / "skipped.csv")
    assert skipped.to_dict("records") == [{"filename": "gone_0", "reason": "no audio file", "split": "train"}]
    provenance = json.loads((tmp_path / "o2" / "model" / R.PROVENANCE_FILE).read_text())
    assert provenance["data"]["missing"] == 1 and provenance["training"]["freeze"] == "text"


def test_cli_pretrains_a_laion_checkpoint_offline(tmp_path, captions, laion_pt_for_captions, capsys, single_thread):
    """`--model FILE.pt --text-config DIR`: LAION's own checkpoint, converted offline, trained on, saved as a folder."""
    checkpoint, text_config = laion_pt_for_captions
    out = tmp_path / "o"
    assert main(["pretrain", "--data", str(captions.audio_dir), "--out", str(out), "--model", str(checkpoint),
                 "--text-config", str(text_config), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--cache", str(tmp_path / "c"), "--wandb", "disabled"]) == 0
    provenance = json.loads((out / "model" / R.PROVENANCE_FILE).read_text())
    assert provenance["start"]["model"] == {"model": str(checkpoint), "revision": None, "text_config": str(text_config)}
    assert provenance["training"]["epochs"] == 1 and [e["epoch"] for e in provenance["epochs"]] == [0, 1]
    reloaded = load_clap(out / "model", device="cpu")
    assert reloaded.model.config.projection_dim == 32  # a --model folder now
    assert provenance["data"]["text_length"]["max_tokens"] == 77  # trained on captions cut as LAION cuts them
    assert reloaded.text_length.max_tokens == 77  # and it keeps LAION's limit (saved with its tokenizer)
    capsys.readouterr()


def test_captions_are_tokenized_by_the_models_rule(long_caption_data):
    """Pretraining's captions are cut where the model reads (`ClapBundle.text_length`), not at a fixed 64
    tokens: the tiny tower's 78, the 600-word caption keeping its first 78 tokens (</s> last)."""
    from types import SimpleNamespace

    bundle = load_clap("tiny", device="cpu")
    table = load_captions(long_caption_data)
    data = P.CaptionedFeatures.build(table, SimpleNamespace(input_features=None, is_longer=None), bundle.tokenizer,
                                     bundle.text_length)
    texts, _ = table.caption_pairs()
    longest = max(range(len(texts)), key=lambda i: len(texts[i]))
    full = bundle.tokenizer(texts[longest], truncation=False)["input_ids"]
    assert len(full) > 600 and data.input_ids.shape[1] == 78
    assert data.input_ids[longest].tolist() == full[:77] + [bundle.tokenizer.eos_token_id]


def test_cli_pretrains_on_a_600_word_caption(tmp_path, long_caption_data, capsys, single_thread):
    """A caption longer than the text tower reads (the tiny one: 78 tokens) used to crash (pretraining cut
    captions at a fixed 64 tokens, retrieval's text side not at all); it is truncated by the model's rule."""
    out = tmp_path / "o"
    assert main(["pretrain", "--data", str(long_caption_data), "--out", str(out), "--model", "tiny", "--epochs", "1",
                 "--batch-size", "4", "--device", "cpu", "--cache", str(tmp_path / "c"), "--wandb", "disabled"]) == 0
    provenance = json.loads((out / "model" / R.PROVENANCE_FILE).read_text())
    assert provenance["data"]["text_length"]["max_tokens"] == 78
    assert [e["epoch"] for e in provenance["epochs"]] == [0, 1]
    capsys.readouterr()


def test_cli_bad_pretrain_input_is_one_line(tmp_path, capsys, captions):
    data = str(captions.audio_dir)
    assert main(["pretrain", "--data", data, "--out", str(tmp_path / "o"), "--config", "htsat-base", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer DIR" in err and len(err.strip().splitlines()) == 1
    assert main(["pretrain", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "cannot recognise captioned audio" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "value"), [("--lr", "inf"), ("--weight-decay", "nan"), ("--weight-decay", "inf")])
def test_cli_refuses_a_non_finite_learning_rate_or_weight_decay(cli, captions, tmp_path, option, value):
    """One line naming the option, before any training (it used to train into a TrainingDiverged traceback that
    blamed the learning rate even for a NaN weight decay)."""
    run = cli("pretrain", "--data", captions.audio_dir, "--out", tmp_path / "o", option, value, "--epochs", "1",
              "--device", "cpu", "--cache", tmp_path / "c", "--wandb", "disabled")
    assert run.code == 2 and len(run.errors.splitlines()) == 1
    assert f"{option} must be a finite number" in run.errors and value in run.errors
    assert "learning rate" not in run.errors
    assert not (tmp_path / "o" / R.CHECKPOINT_FILE).exists()


@pytest.mark.slow
def test_a_second_run_into_the_same_out_at_once_is_refused(captions, tmp_path):
    """Two `pretrain` processes with different options into one --out at once: the second stops with one line
    naming the folder and the first run's process, and leaves the first run's files alone; the model folder holds
    the first run's weights and says so (it used to die with "epoch0.json is missing or from another run", the
    folder keeping one run's weights with no word of the other)."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "out"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}  # fmt: skip

    def command(lr: str, epochs: str) -> list[str]:
        return ["pretrain", "--data", str(captions.audio_dir), "--out", str(out), "--cache", str(tmp_path / "cache"),
                "--device", "cpu", "--wandb", "disabled", "--batch-size", "4", "--lr", lr, "--epochs", epochs]

    # The second process imports the package first and starts its command the moment it is told to: while the first
    # run holds OUT (or, without a lock, has begun training), however long imports take on a busy machine.
    go = tmp_path / "go"
    waiting = ("import pathlib, sys, time; from audio_residual.cli import main; go = pathlib.Path(sys.argv[1])\n"
               "while not go.exists(): time.sleep(0.02)\nraise SystemExit(main(sys.argv[2:]))")
    second = subprocess.Popen([sys.executable, "-c", waiting, str(go), *command("2e-3", "1")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "audio_residual", *command("1e-3", "40")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        def started() -> bool:
            lock = out / ".pretrain.lock"
            return (lock.is_file() and f"pid {first.pid}" in lock.read_text()) or (out / R.EPOCH0_FILE).is_file()

        deadline = time.monotonic() + 300
        while not started() and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.02)
        go.touch()
        second_err = second.communicate(timeout=300)[1]
        overlapped = first.poll() is None
    finally:
        second.kill()
        first_err = first.communicate(timeout=600)[1]
    second = subprocess.CompletedProcess(second.args, second.returncode, "", second_err)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "in use by another pretrain run" in errors[0] and f"pid {first.pid}" in errors[0]
    assert str(out) in errors[0] and overlapped  # refused while the first run was still training
    assert first.returncode == 0, first_err[-2000:]
    provenance = json.loads((out / "model" / R.PROVENANCE_FILE).read_text())
    assert provenance["training"]["lr"] == 1e-3 and provenance["training"]["epochs"] == 40
    assert pd.read_csv(out / R.HISTORY_FILE)["epoch"].tolist() == list(range(41))


def test_preset_refuses_to_run_under_torchrun(cli, tmp_path, monkeypatch):
    """`--preset` generates its data and trains in one process: several torchrun processes would all write it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    run = cli("pretrain", "--preset", "tiny", "--out", tmp_path / "o", "--cache", tmp_path / "c")
    assert run.code == 2 and "--preset runs in one process" in run.errors
    assert not (tmp_path / "o" / "data").exists()
