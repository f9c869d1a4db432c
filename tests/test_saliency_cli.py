"""End to end: `audio-residual saliency` on generated data writes maps, faithfulness.csv, clips.csv, figures,
wavs and the before/after comparison of a ResiDual-adapted model; a killed run resumes per clip; bad input
(λ files included) is one line and exit 2. The mel inversion's round trip is measured here too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from audio_residual.cli import main

matplotlib.use("Agg")

METHODS = "gradient,integrated_gradients"


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    from audio_residual.analysis import ResidualStatistics
    from audio_residual.clap.loading import ModelSource
    from audio_residual.data_processing import make_synthetic_esc50
    from audio_residual.layout import AnalysisLayout
    from audio_residual.names import parse_block
    from audio_residual.residual.units import build_residual
    from audio_residual.workspace import Workspace

    root = tmp_path_factory.mktemp("saliency")
    data = make_synthetic_esc50(root / "data", n_classes=3, clips_per_class=5, seconds=2.0, seed=0)
    ws = Workspace.open(data, ModelSource("tiny-random", device="cpu"), cache_dir=root / "cache")
    train = ws.split(1).train
    stats = ResidualStatistics.fit(ws.bundle.model, ws.features.input_features, train[:4], batch_size=4)
    residual = build_residual(stats, stages=(3,))
    with torch.no_grad():
        for lam in residual.lambdas.values():
            lam.copy_(1 + torch.linspace(-0.9, 2.0, lam.numel()))
    lambdas = residual.save(root / "lambdas.safetensors", metadata={"fold": 1, "provenance": ws.provenance()})
    analysis = AnalysisLayout(root / "analysis")  # what `analyze --fold 1` writes, made cheaply
    stats.save(analysis.stats(1))
    units = [f"layers.{s}.blocks.{b}.attn.head.{h}" for block in stats.blocks
             for s, b in [parse_block(block)] for h in range(stats.num_heads(block))]
    ablation = pd.DataFrame({"unit": units, "clips": 3, "delta": np.linspace(-0.5, 0, len(units)),
                             "logit_shift": np.linspace(1, 0, len(units))})
    ablation.to_csv(analysis.ablation, index=False)
    out = root / "out"
    argv = ["saliency", "--data", str(data), "--model", "tiny-random", "--out", str(out), "--cache", str(root / "cache"),
            "--device", "cpu", "--clips", "2", "--steps", "8", "--methods", METHODS, "--lambdas", str(lambdas),
            "--batch-size", "8", "--analysis", str(analysis.root)]
    torch.set_num_threads(1)
    assert main(argv) == 0
    return root, out, ws


def test_outputs_describe_every_method_and_clip(explained):
    _, out, ws = explained
    table = pd.read_csv(out / "faithfulness.csv")
    assert list(table["method"]) == METHODS.split(",")
    for column in ("deletion_auc", "deletion_auc_random", "deletion_auc_randomised", "insertion_auc",
                   "beats_random", "differs_from_randomised", "rank_corr_randomised", "clips_normalised",
                   "mean_score", "mean_baseline_score", "p_deletion_vs_random"):
        assert table[column].notna().all(), column
    assert (table["baseline"] == "neutral").all()
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert len(rows) == 2 and set(rows) <= set(ws.split(1).test.tolist())
    assert summary["steps"] == 8 and summary["provenance"]["model"] == "tiny-random"
    clips = pd.read_csv(out / "clips.csv")
    assert clips["row"].tolist() == rows
    np.testing.assert_allclose(clips["score"], summary["scores"], atol=1e-4)
    np.testing.assert_allclose(clips["baseline_score"], summary["baseline_scores"], atol=1e-4)
    np.testing.assert_allclose(table["mean_score"], np.mean(summary["scores"]), atol=1e-4)
    np.testing.assert_allclose(table["mean_baseline_score"], np.mean(summary["baseline_scores"]), atol=1e-4)
    baseline = summary["baseline"]
    assert baseline["kind"] == "neutral" and len(baseline["spectrum_db"][0]) == 64
    assert set(baseline["reading"]["class_probabilities"]) == set(ws.table.class_names)
    assert set(summary["baselines"]) == {"neutral", "train_mean", "blur", "median", "floor"}
    assert summary["ig"]["rule"].startswith("|Σ IG − (s(x) − s(b))| ≤ ig_tolerance") and summary["ig"]["on_cap"]
    flagged = clips.loc[~clips["explainable"], "row"].tolist()
    assert summary["flagged_rows"] == flagged and (clips["change"] >= 1.0).tolist() == clips["explainable"].tolist()
    with np.load(out / "maps.npz", allow_pickle=False) as maps:
        assert maps["integrated_gradients"].shape == (2, 1001, 64)
        assert maps["randomised_gradient"].shape == (2, 1001, 64)
        assert list(maps["rows"]) == rows
    for row in rows:
        assert (out / "figures" / f"saliency_clip{row}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "figures" / "curves.png").stat().st_size > 0
    assert not list(out.rglob(".*.tmp"))


def test_wavs_hold_the_original_and_the_salient_part(explained):
    _, out, _ = explained
    for row in json.loads((out / "summary.json").read_text())["rows"]:
        original, rate = sf.read(out / "wavs" / f"clip{row}_original.wav")
        salient, _ = sf.read(out / "wavs" / f"clip{row}_integrated_gradients_top10.wav")
        assert rate == 48_000 and len(original) == len(salient) == 1000 * 480
        assert 0.5 < np.abs(original).max() <= 1.0 and np.abs(salient).max() > 0
        assert not np.allclose(original, salient)


def test_adapted_model_is_compared_with_zero_shot(explained):
    _, out, _ = explained
    clips = pd.read_csv(out / "change_clips.csv")
    regions = pd.read_csv(out / "change_regions.csv")
    assert len(clips) == 2 * 2 and clips["rank_corr"].between(-1, 1).all()
    assert (clips["change_l1"] > 0).all()  # λ ≠ 1 changed the maps
    assert set(regions["region"]) >= {"0-500 Hz", ">6000 Hz", "onsets"}
    for method, group in regions[regions["region"] != "onsets"].groupby("method"):
        assert group["change_share"].sum() == pytest.approx(1.0, abs=1e-6), method
        assert group["area_share"].sum() == pytest.approx(1.0, abs=1e-6), method


def test_head_attribution_on_the_ablation_clips(explained):
    _, out, ws = explained
    heads = pd.read_csv(out / "heads_attribution.csv")
    ablation = pd.read_csv(out.parent / "analysis" / "ablation.csv")
    assert set(heads["unit"]) == set(ablation["unit"]) and heads["clips"].eq(3).all()
    assert heads["grad_x_centred"].abs().sum() > 0
    correlation = pd.read_csv(out / "head_vs_ablation.csv")
    assert len(correlation) == 4 and correlation["heads"].eq(len(ablation)).all()
    assert correlation["spearman"].between(-1, 1).all()


def _base(root: Path, out: str) -> list[str]:
    return ["saliency", "--data", str(root / "data"), "--model", "tiny-random", "--out", str(root / out),
            "--cache", str(root / "cache"), "--device", "cpu"]


def test_bad_input_is_one_line(explained, capsys):
    root, _, _ = explained
    base = _base(root, "bad")
    assert main([*base, "--lambdas", str(root / "missing.safetensors")]) == 2
    assert "--lambdas file not found" in capsys.readouterr().err
    assert main([*base, "--fold", "9"]) == 2
    assert "--fold" in capsys.readouterr().err
    assert main([*base, "--clips", "1", "--methods", "gradient", "--listen", "gradient", "--analysis", str(root)]) == 2
    assert "no ablation.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--methods", "occlusion"])
    assert "unknown saliency method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--baseline", "zeros"])
    assert "invalid choice: 'zeros'" in capsys.readouterr().err


def _broken_lambdas(root: Path) -> dict[str, Path]:
    """λ files that are not what they claim: each must fail in one line naming the file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = root / "lambdas.safetensors"
    with safe_open(str(good), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    folder = root / "broken"
    folder.mkdir(exist_ok=True)
    files = {name: folder / f"{name}.safetensors" for name in
             ("random", "empty", "text", "wrong_keys", "too_long", "all_nan")}
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["empty"].write_bytes(b"")
    files["text"].write_text("lambda = 1.0\n" * 50)
    save_file({"weight": torch.ones(3)}, str(files["wrong_keys"]))
    group = next(name for name in tensors if name.startswith("lambda."))
    longer = dict(tensors)
    longer[group] = torch.cat([tensors[group], torch.ones(1)])
    save_file(longer, str(files["too_long"]), metadata=header)
    nan = {name: torch.full_like(t, float("nan")) if name.startswith("lambda.") else t for name, t in tensors.items()}
    save_file(nan, str(files["all_nan"]), metadata=header)
    return files


def test_a_broken_lambda_file_is_one_line_naming_it_before_any_work(explained, capsys, tmp_path):
    root, _, _ = explained
    for name, path in _broken_lambdas(root).items():
        out, cache = tmp_path / name / "out", tmp_path / name / "cache"
        argv = [*_base(root, "unused"), "--lambdas", str(path)]
        argv[argv.index("--out") + 1], argv[argv.index("--cache") + 1] = str(out), str(cache)
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "Traceback" not in err, (name, err)
        assert not [p for p in (out, cache) for p in p.rglob("*")], name  # failed before features or outputs
    assert "NaN or infinite" in main_err(root, _broken_lambdas(root)["all_nan"], capsys)


def main_err(root: Path, lambdas: Path, capsys, *extra: str) -> str:
    code = main([*_base(root, "checked"), "--clips", "1", "--steps", "4", "--methods", "gradient", "--listen",
                 "none", "--baseline", "median", "--lambdas", str(lambdas), *extra])
    captured = capsys.readouterr()
    return f"{code}\n{captured.err}"


def _resaved(root: Path, name: str, metadata: dict) -> Path:
    from audio_residual.residual.units import ResiDual

    return ResiDual.load(root / "lambdas.safetensors").save(root / f"{name}.safetensors", metadata=metadata)


def test_lambdas_of_another_model_or_fold_are_refused(explained, capsys):
    """λ record the model, dataset and fold they were trained on: another model's λ live in other head
    spaces, another fold's λ were trained on this fold's test clips. Both are refused before any work."""
    root, _, ws = explained
    provenance = ws.provenance()
    other_model = _resaved(root, "other_model", {"fold": 1, "provenance": {**provenance, "model": "tiny"}})
    err = main_err(root, other_model, capsys)
    assert err.startswith("2\n") and "trained on model 'tiny'" in err and str(other_model) in err
    other_fold = _resaved(root, "other_fold", {"fold": 2, "provenance": provenance})
    err = main_err(root, other_fold, capsys)
    assert err.startswith("2\n") and "trained on fold 2" in err and "fold 1's test clips" in err
    assert main_err(root, other_fold, capsys, "--fold", "2").startswith("0\n")  # its own fold is fine


def test_lambdas_that_cannot_be_checked_run_with_a_warning(explained, capsys):
    root, _, _ = explained
    unrecorded = _resaved(root, "unrecorded", {})
    with pytest.warns(UserWarning, match="records no model, dataset or fold"):
        assert main_err(root, unrecorded, capsys).startswith("0\n")
    other_data = _resaved(root, "other_data", {"fold": 3, "provenance": {"model": "tiny-random", "dataset": "urbansound"}})
    with pytest.warns(UserWarning, match="trained on 'urbansound'"):
        assert main_err(root, other_data, capsys).startswith("0\n")


def test_a_short_clip_is_said_to_be_repeat_padded(explained):
    from audio_residual.analysis.saliency_report import padding_of

    _, _, ws = explained
    padding = padding_of(ws, int(ws.split(1).test[0]))
    assert padding.seconds == pytest.approx(2.0, abs=0.01)
    assert "2.0 s clip repeat-padded to 10 s" in padding.note
    np.testing.assert_allclose(padding.copies_at, [2.0, 4.0, 6.0, 8.0], atol=0.01)


@pytest.mark.slow
def test_a_killed_run_resumes_per_clip_and_ends_as_an_uninterrupted_one(explained, tmp_path, capsys):
    """kill -9 after the first clip is stored: the rerun reads the stored clips back untouched, computes the
    others, and its maps and table equal those of a run that was never interrupted."""
    import audio_residual

    root, _, _ = explained
    argv = [*_base(root, "unused"), "--clips", "3", "--steps", "8", "--max-steps", "16", "--methods",
            "gradient,integrated_gradients", "--listen", "none", "--baseline", "median"]
    out = tmp_path / "killed"
    argv[argv.index("--out") + 1] = str(out)
    src = str(Path(audio_residual.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "audio_residual", *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((out / "clips").glob("clip*.npz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stored = {path.name: path.stat().st_mtime_ns for path in (out / "clips").glob("clip*.npz")}
    assert 1 <= len(stored) < 3 and not (out / "summary.json").exists()

    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(f"clip{row}.npz" for row in summary["resumed_rows"]) == sorted(stored)
    assert {name: (out / "clips" / name).stat().st_mtime_ns for name in stored} == stored  # read, not redone
    fresh = tmp_path / "fresh"
    argv[argv.index("--out") + 1] = str(fresh)
    assert main(argv) == 0
    capsys.readouterr()
    with np.load(out / "maps.npz") as resumed, np.load(fresh / "maps.npz") as uninterrupted:
        for name in ("gradient", "integrated_gradients", "score", "baseline_score", "randomised_gradient"):
            np.testing.assert_allclose(resumed[name], uninterrupted[name], rtol=1e-6, atol=1e-9, err_msg=name)
    pd.testing.assert_frame_equal(pd.read_csv(out / "faithfulness.csv"), pd.read_csv(fresh / "faithfulness.csv"))


def test_a_rerun_with_other_options_rewrites_the_wavs_of_its_new_maps(explained, tmp_path, capsys):
    """A clip recomputed under new options (here another baseline) gets new wavs; they used to be kept from the
    earlier run whenever the file existed, so the wav no longer matched the maps beside it."""
    root, _, _ = explained
    argv = [*_base(root, "unused"), "--clips", "1", "--steps", "4", "--methods", "integrated_gradients", "--listen",
            "integrated_gradients", "--baseline", "median"]
    out = tmp_path / "out"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    (wav,) = (out / "wavs").glob("*_integrated_gradients_top*.wav")
    before = sf.read(wav)[0]
    argv[argv.index("median")] = "floor"
    assert main(argv) == 0
    capsys.readouterr()
    assert not np.allclose(sf.read(wav)[0], before)  # IG from the floor: another map, other top cells


def test_mel_inversion_round_trip(tiny_bundle):
    """log-mel → audio (NNLS + Griffin-Lim, 32 iterations) → log-mel. Measured on this clip (2 s chirp over a
    −40 dB noise floor): median |error| 0.64 dB (mean 2.8, 90th percentile 8.8) on the cells within 40 dB of
    the peak, 1.49 dB mean over all cells, correlation 0.94 (the noise floor is re-drawn, not copied)."""
    from audio_residual.analysis.listen import log_mel, mel_to_audio

    extractor = tiny_bundle.feature_extractor
    t = np.arange(2 * 48_000) / 48_000
    audio = 0.5 * np.sin(2 * np.pi * (400 * t + 300 * t**2)) * (t > 0.5)
    audio += 0.01 * np.random.default_rng(0).standard_normal(t.size)
    reference = log_mel(audio, extractor)
    cached = extractor(audio, sampling_rate=48_000, return_tensors="np")["input_features"][0, 0]
    np.testing.assert_allclose(reference[:-2], cached[: len(reference) - 2], atol=1e-4)  # the last frames see padding
    again = log_mel(mel_to_audio(reference, extractor), extractor)
    assert again.shape == reference.shape
    loud = reference > reference.max() - 40
    error = np.abs(again - reference)
    assert np.median(error[loud]) < 1.0 and error.mean() < 2.0
    assert np.corrcoef(again.ravel(), reference.ravel())[0, 1] > 0.9
