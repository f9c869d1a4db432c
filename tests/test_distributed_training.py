"""Data-parallel pretraining on CPU processes (gloo): the gathered loss and its gradients are the one-process
ones, `torchrun -m audio_residual pretrain` on 2 processes trains the weights and validation figures of one
process with the whole batch (with and without accumulation), and a rank that dies or hangs ends the job with
a one-line message instead of a hang."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from audio_residual.analysis.distributed_stats import loopback_address
from audio_residual.training import pretrain as P
from audio_residual.training.distributed import Ranks

SRC = Path(__file__).resolve().parents[1] / "src"


# ------------------------------------------------------------------------------ the gathered loss, 2 processes
def _toy_batch():
    """7 clips and 11 captions (clip 2 has three, clips 0, 4 and 6 two): uneven shares, several positives."""
    generator = torch.Generator().manual_seed(0)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6])
    return (torch.randn(7, 12, generator=generator), torch.randn(11, 10, generator=generator), owner,
            torch.randn(12, 6, generator=generator), torch.randn(10, 6, generator=generator))  # fmt: skip


def _toy_loss(audio_in, text_in, owner, w_audio, w_text, scales):
    return P.contrastive_loss(audio_in @ w_audio, text_in @ w_text, scales[0], scales[1], owner)


def _gathered_rank(rank: int, world: int, address: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        audio_in, text_in, owner, w_audio, w_text = _toy_batch()
        params = [w_audio.requires_grad_(True), w_text.requires_grad_(True),
                  torch.tensor([math.log(10.0), math.log(3.0)], requires_grad=True)]  # fmt: skip
        ranks = Ranks.current()
        clips = ranks.bounds(len(audio_in))
        captions = np.searchsorted(owner.numpy(), clips).tolist()
        mine, mine_text = ranks.share(len(audio_in)), slice(captions[rank], captions[rank + 1])
        audio = ranks.gather(audio_in[mine] @ params[0], np.diff(clips).tolist(), grad=True)
        text = ranks.gather(text_in[mine_text] @ params[1], np.diff(captions).tolist(), grad=True)
        loss = P.contrastive_loss(audio, text, params[2][0], params[2][1], owner)
        loss.backward()
        ranks.average_gradients(params)
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": [p.grad for p in params]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters importing the package
def test_gathered_loss_and_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    """Each rank embeds its share (4 and 3 clips, 6 and 5 captions); the gathered loss and the rank-averaged
    gradients of both encoders and both temperatures are those of one process on the concatenated batch."""
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_gathered_rank, args=(2, loopback_address(), str(out)), nprocs=2)
    shared = torch.load(out, weights_only=True)
    audio_in, text_in, owner, w_audio, w_text = _toy_batch()
    params = [w_audio.requires_grad_(True), w_text.requires_grad_(True),
              torch.tensor([math.log(10.0), math.log(3.0)], requires_grad=True)]  # fmt: skip
    loss = _toy_loss(audio_in, text_in, owner, params[0], params[1], params[2])
    loss.backward()
    assert abs(float(shared["loss"]) - loss.item()) <= 1e-5
    for got, expected in zip(shared["grads"], (p.grad for p in params), strict=True):
        assert float(expected.abs().max()) > 1e-3  # every gradient is there to compare
        assert float((got - expected).abs().max()) <= 1e-5


# ------------------------------------------------------------------------ accumulation: GradCache, 1 process
@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    from audio_residual.data_processing.captions import load_captions
    from audio_residual.data_processing.synthetic_captions import make_synthetic_captions

    root = make_synthetic_captions(tmp_path_factory.mktemp("ddp") / "caps", n_clips=16, seconds=1.0, seed=4,
                                   split_fractions=(0.75, 0.2, 0.05))  # fmt: skip
    return load_captions(root)


def _step_gradients(model, data, batch, accumulate: int) -> tuple[float, dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    loss = P.ContrastiveStep(model, data, "cpu", contextlib.nullcontext, accumulate, Ranks())(batch)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("all_captions", [False, True])
def test_accumulation_gives_the_whole_batch_gradients(captions, all_captions, single_thread):
    """GradCache: 3 micro-batches embedded in turn give the loss, every gradient and the input BatchNorm's running
    statistics of one pass over the whole batch of 10 clips — in float64 to 1e-10 (the two are the same sum), in
    float32 to its rounding (the gradient of a conv bias sums thousands of terms: up to 2e-5 apart at |g| ≈ 4)."""
    from audio_residual.clap.loading import TextLength
    from audio_residual.data_processing.features import CachedFeatures

    table = captions
    rng = np.random.default_rng(0)
    features = CachedFeatures(rng.standard_normal((len(table), 1, 100, 64)).astype(np.float32) * 3 - 20,
                              np.zeros(len(table), bool), np.ones(len(table), bool), [], tuple(table.filenames), "x")
    model, processor = P.new_clap("tiny", P.caption_tokenizer([c for cs in table.captions for c in cs]), seed=0)
    data = P.CaptionedFeatures.build(table, features, processor.tokenizer, TextLength(77, "test"))
    batch = P.epoch_batches(data, 10, torch.Generator().manual_seed(1), all_captions)[0]
    norm = "audio_model.audio_encoder.batch_norm."
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        model.to(dtype).train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        loss, grads, buffers = _step_gradients(model, data, batch, accumulate=1)
        model.load_state_dict(state)
        loss3, grads3, buffers3 = _step_gradients(model, data, batch, accumulate=3)
        model.load_state_dict(state)
        assert abs(loss - loss3) <= tolerance
        assert grads.keys() == grads3.keys() and len(grads) > 50
        assert max(float(g.abs().max()) for g in grads.values()) > 1.0  # gradients of a size that shows any gap
        for name, grad in grads.items():
            assert float((grad - grads3[name]).abs().max()) <= tolerance, (dtype, name)
        for name in (norm + "running_mean", norm + "running_var"):
            assert float((buffers[name] - state[name]).abs().max()) > 1e-3  # the step did update them
            assert float((buffers[name] - buffers3[name]).abs().max()) <= tolerance, name
        assert int(buffers3[norm + "num_batches_tracked"]) == int(state[norm + "num_batches_tracked"]) + 1


# ------------------------------------------------------------------------------ torchrun pretrain, 2 processes
def _env(threads: int = 1) -> dict:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled"}  # fmt: skip


def _pretrain_args(data: Path, out: Path, cache: Path, batch: int, accumulate: int = 1) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--cache", str(cache), "--epochs", "1",
            "--batch-size", str(batch), "--accumulate", str(accumulate), "--lr", "1e-4", "--warmup", "0",
            "--device", "cpu", "--wandb", "disabled", "--seed", "2"]  # fmt: skip


def _torchrun(args: list[str], nproc: int, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "audio_residual", *args]  # fmt: skip
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)


def _trained(out: Path) -> dict[str, torch.Tensor]:
    """The weights at the end of the last epoch (OUT/model keeps the best epoch, which may be the start)."""
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as handle:
        return {k[len("params."):]: handle.get_tensor(k) for k in handle.keys() if k.startswith("params.")}


def _trained_start(captions, cache: Path) -> dict[str, torch.Tensor]:
    """The weights `pretrain --seed 2` starts from (the tiny configuration, its tokenizer trained on the captions)."""
    from audio_residual.training.pretrain_run import PretrainSource, start_model

    return start_model(PretrainSource("tiny"), captions, 2, cache)[0].state_dict()


def _differences(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((run[k].double() - reference[k].double()).abs().max()) for k in reference}


KEY_BIAS = "attention.self.key.bias"  # softmax ignores it: its true gradient is 0, its computed one rounding noise


@pytest.mark.slow
def test_torchrun_two_processes_train_the_one_process_weights(captions, tmp_path):
    """One epoch on 12 training clips (2 steps of 8 and 4 clips) at the default --lr 1e-4: 2 gloo processes with
    4 (then 2) clips each, or with 2 + 2 in two accumulated micro-batches, end at the weights (≤ 1e-5, fp32) and
    with the validation figures of one process with the whole batch of 8; rank 0 alone wrote the run's files.

    Attention key biases are left out of the weight comparison: softmax is invariant to them, so their gradient is
    float rounding noise, which Adam's normalisation turns into steps of up to ±lr that differ with any change of
    summation order (here about 2e-4 apart); they change no embedding, as the equal validation figures show."""
    from audio_residual.cli import main

    data, cache = captions.audio_dir, tmp_path / "cache"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(_pretrain_args(data, tmp_path / "one", cache, batch=8)) == 0
    two = _torchrun(_pretrain_args(data, tmp_path / "two", cache, batch=8), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    accumulated = _torchrun(_pretrain_args(data, tmp_path / "acc", cache, batch=4, accumulate=2), nproc=2)
    assert accumulated.returncode == 0, accumulated.stderr[-3000:]
    assert two.stdout.count("pretrained CLAP →") == 1  # rank 0 alone reports (and writes)
    one = _trained(tmp_path / "one")
    moved = _differences(one, _trained_start(captions, cache))
    assert np.median(list(moved.values())) > 1e-4  # two Adam steps moved the weights ten times the tolerance
    history = pd.read_csv(tmp_path / "one" / "history.csv")
    for run in ("two", "acc"):
        other = _trained(tmp_path / run)
        assert other.keys() == one.keys()
        differences = _differences(other, one)
        worst = max((d, k) for k, d in differences.items() if not k.endswith(KEY_BIAS))
        assert worst[0] <= 1e-5, (run, worst)
        figures = pd.read_csv(tmp_path / run / "history.csv")
        metrics = [c for c in history.columns if c.startswith(("t2a_", "a2t_", "mean_"))]
        pd.testing.assert_frame_equal(figures[metrics], history[metrics], atol=1e-6, rtol=0)
        np.testing.assert_allclose(figures["train_loss"][1:], history["train_loss"][1:], atol=1e-5)
        provenance = json.loads((tmp_path / run / "model" / "pretraining.json").read_text())
        assert provenance["ranks"] == 2


FLOAT64_CLI = ("import sys, torch; torch.set_default_dtype(torch.float64); from audio_residual.cli import main; "
               "raise SystemExit(main())")  # the command line with every model built in float64


@pytest.mark.slow
def test_in_float64_two_processes_train_exactly_the_one_process_weights(captions, tmp_path):
    """The same epoch at lr 1e-3 with every model in float64: the 2-process weights equal the 1-process ones to
    1e-10, attention key biases included — what is left of the float32 gaps above is rounding, not the algorithm."""
    data, cache = captions.audio_dir, tmp_path / "cache"
    args = [a if a != "1e-4" else "1e-3" for a in _pretrain_args(data, tmp_path / "one", cache, batch=8)]
    one = subprocess.run([sys.executable, "-c", FLOAT64_CLI, *args], env=_env(), capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    args = [a if a != str(tmp_path / "one") else str(tmp_path / "two") for a in args]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--no-python", sys.executable, "-c", FLOAT64_CLI, *args], env=_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    reference, other = _trained(tmp_path / "one"), _trained(tmp_path / "two")
    assert reference["logit_scale_a"].dtype == torch.float64
    assert max(_differences(other, reference).values()) <= 1e-10
    assert np.median(list(_differences(reference, _trained_start(captions, cache)).values())) > 1e-3


# ------------------------------------------------------------------------------------ a rank dies or hangs
def _cli_rank(rank: int, world: int, port: int, argv: list[str], results: str, fault: str) -> None:
    """`audio-residual ARGV` as rank `rank` of a torchrun-like group; rank 1 dies (`exit`) or stops answering
    (`hang`) at its fourth training step (the first of epoch 2). The exit code and stderr go to RESULTS/rank<r>.json."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    from audio_residual.cli import main

    if rank == 1:
        real, calls = P.ContrastiveStep.__call__, []

        def faulty(self, batch):
            calls.append(1)
            if len(calls) == 4:
                if fault == "exit":
                    os._exit(7)
                time.sleep(120)
            return real(self, batch)

        P.ContrastiveStep.__call__ = faulty
    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    Path(results, f"rank{rank}.json").write_text(json.dumps({"code": code, "stderr": err.getvalue(),
                                                             "seconds": time.perf_counter() - started}))


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_a_lost_rank_ends_the_job_with_one_line_and_one_process_resumes_it(captions, tmp_path, fault):
    """Rank 1 dies (or hangs) in epoch 2 of 2: rank 0 stops at once (or after --dist-timeout 20 s) with a one-line
    error naming the lost processes and how to resume, exit 2 — no hang. The same command in one process then
    resumes the 2-process job's epoch-1 checkpoint and ends where one uninterrupted process does."""
    from audio_residual.cli import main

    def args(out: str) -> list[str]:
        return [*_pretrain_args(captions.audio_dir, tmp_path / out, tmp_path / "cache", batch=4), "--epochs", "2"]

    port = int(loopback_address().rsplit(":", 1)[1])
    context = torch.multiprocessing.start_processes(
        _cli_rank, args=(2, port, [*args("out"), "--dist-timeout", "20"], str(tmp_path), fault), nprocs=2, join=False,
        start_method="spawn")  # fmt: skip
    rank0 = tmp_path / "rank0.json"
    deadline = time.monotonic() + 300
    while not rank0.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in context.processes:
        if process.is_alive():
            process.kill()  # the hanging rank 1 (torchrun's agent would stop it)
        process.join()
    result = json.loads(rank0.read_text())
    assert result["code"] == 2
    lines = [line for line in result["stderr"].splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in result["stderr"]
    assert "rank 0 of 2 lost the other processes" in lines[0] and "Rerun the same command" in lines[0]
    if fault == "hang":
        assert result["seconds"] < 100  # bounded by the timeout, not by rank 1's sleep
        return
    with safe_open(str(tmp_path / "out" / "checkpoint.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["info"])["epoch"] == 1
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(args("out")) == 0  # resumed alone
        assert main(args("whole")) == 0
    resumed, whole = _trained(tmp_path / "out"), _trained(tmp_path / "whole")
    differences = _differences(resumed, whole)
    assert max(d for k, d in differences.items() if not k.endswith(KEY_BIAS)) <= 1e-5
    history, expected = pd.read_csv(tmp_path / "out" / "history.csv"), pd.read_csv(tmp_path / "whole" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    metrics = [c for c in history.columns if c.startswith(("t2a_", "a2t_", "mean_"))]
    pd.testing.assert_frame_equal(history[metrics], expected[metrics], atol=1e-6, rtol=0)


# ---------------------------------------------------------- ResiDual's contrastive training, 2 processes
def _residual_fits(data: str, cache: str) -> list:
    """λ trained for retrieval twice: selected on the validation clips, and without validation (the last epoch's)."""
    import dataclasses

    from audio_residual.clap.loading import ModelSource
    from audio_residual.training import TrainConfig, train_residual_fold
    from audio_residual.workspace import Workspace

    ws = Workspace.open(data, ModelSource("tiny-random", device="cpu"), cache_dir=cache, captions=True)
    config, split = TrainConfig(epochs=2, batch_size=6, lr=0.01, seed=1), ws.split(0)
    unvalidated = dataclasses.replace(split, val=split.val[:0])
    return [train_residual_fold(ws, s, config) for s in (split, unvalidated)]


def _residual_rank(rank: int, world: int, address: str, data: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        results = _residual_fits(data, cache)
        if rank == 0:
            torch.save([{"lambdas": {k: v.detach() for k, v in r.residual.lambdas.items()}, "best": r.best_epoch,
                         "val": [h["val_mean_r1"] for h in r.history]} for r in results], out)  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_residual_retrieval_training_on_two_processes_learns_the_one_process_lambdas(captions, tmp_path, single_thread):
    """ResiDual's λ trained for retrieval through `encoder_steps` by 2 gloo processes (3 clips of each batch of 6
    each, the contrastive loss over the gathered 6) have one process's validation scores and kept epoch, and,
    trained without validation, its last epoch's λ."""
    data, cache = str(captions.audio_dir), str(tmp_path / "cache")
    validated, last = _residual_fits(data, cache)  # also fills the caches the two processes read
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_residual_rank, args=(2, loopback_address(), data, cache, str(out)), nprocs=2)
    two_validated, two_last = torch.load(out, weights_only=True)
    assert two_validated["best"] == validated.best_epoch
    np.testing.assert_allclose(two_validated["val"], [r["val_mean_r1"] for r in validated.history], atol=1e-6)
    assert last.best_epoch == 2
    moved = max(float((lam.detach() - 1).abs().max()) for lam in last.residual.lambdas.values())
    assert moved > 1e-2  # λ trained away from its start of ones
    for name, lam in last.residual.lambdas.items():
        assert float((two_last["lambdas"][name] - lam.detach()).abs().max()) <= 1e-5, name
