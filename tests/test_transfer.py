"""Zero-shot retention: encoders adapted on A, scored zero-shot on B's disjoint classes."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.loading import load_clap
from audio_residual.data_processing import ClipTable, load_esc50, make_synthetic_esc50
from audio_residual.data_processing.audio_config import AudioConfig
from audio_residual.evaluation.transfer import PLAIN_ROW, transfer_accuracy, transfer_matrix, transfer_table
from audio_residual.methods import get
from audio_residual.methods.contrastive_adapter import ContrastiveAdapter
from audio_residual.methods.residual import ResidualChoice
from audio_residual.residual.units import build_residual
from audio_residual.tasks import CLASSIFICATION
from audio_residual.workspace import Workspace

RESIDUAL, ADAPTER = get("residual"), get("contrastive_adapter")


def classes(table: ClipTable, keep: list[int], name: str) -> ClipTable:
    """The clips of the `keep` classes, relabelled 0..len(keep)-1, as a dataset of their own."""
    rows = np.flatnonzero(np.isin(table.labels, keep))
    relabel = {old: new for new, old in enumerate(keep)}
    return ClipTable(name, table.audio_dir, [table.filenames[i] for i in rows],
                     [relabel[int(table.labels[i])] for i in rows], table.folds[rows],
                     [table.class_names[i] for i in keep])  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory, single_thread):
    """A (3 classes) and B (2 other classes) on one tiny model whose tokenizer knows all five names."""
    tmp = tmp_path_factory.mktemp("transfer")
    full = load_esc50(make_synthetic_esc50(tmp / "data", n_classes=5, clips_per_class=3, seconds=1.0,
                                           sample_rate=16000))  # fmt: skip
    bundle = load_clap("tiny-random", device="cpu", class_names=full.class_names)
    table_a = classes(full, [0, 1, 2], "a")
    exp_a = Workspace.of(table_a, bundle, AudioConfig(), tmp / "cache")
    exp_b = exp_a.on(classes(full, [3, 4], "b"))  # B on A's model, audio configuration and cache
    assert exp_b.cache_dir == exp_a.cache_dir and exp_b.audio == exp_a.audio
    assert set(exp_a.table.class_names).isdisjoint(exp_b.table.class_names)
    stats = ResidualStatistics.fit(bundle.model, exp_a.features.input_features, exp_a.valid_indices(), batch_size=9)
    return exp_a, exp_b, build_residual(stats, granularity="head")


def trained(residual, ws, steps: int = 5):
    """A few cross-entropy steps on A's clips: λ moves away from 1 as in real training."""
    residual = copy.deepcopy(residual)
    optimizer = torch.optim.Adam(residual.parameters(), lr=0.2)
    rows = ws.valid_indices()
    x, longer = ws.batch(rows)
    for _ in range(steps):
        with residual.attached(ws.bundle.model):
            logits = ws.classifier.logits(audio_embeddings(ws.bundle.model, x, longer))
        loss = F.cross_entropy(logits, torch.as_tensor(ws.table.labels[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not all(torch.allclose(p, torch.ones_like(p)) for p in residual.lambdas.values())
    return residual


def transfer_logits(target: Workspace, adapted=None) -> torch.Tensor:
    """Zero-shot logits of every usable clip of `target`: of the plain model, or of (method, fitted model)."""
    rows = target.valid_indices()
    if adapted is None:
        return CLASSIFICATION.scores(target, target.embeddings(rows), rows)
    method, model = adapted
    return method.transfer_scores(model, target, rows)


def as_residual(residual) -> tuple:
    return RESIDUAL, ResidualChoice(residual)


def test_residual_at_one_retains_plain_zero_shot_and_trained_differs(pair):
    exp_a, exp_b, residual = pair
    plain = transfer_logits(exp_b)
    assert plain.shape == (len(exp_b.table), 2)
    torch.testing.assert_close(transfer_logits(exp_b, as_residual(residual)), plain, atol=1e-5, rtol=0)
    moved = transfer_logits(exp_b, as_residual(trained(residual, exp_a)))
    assert moved.shape == plain.shape and (moved - plain).abs().max() > 1e-3


def test_adapter_map_uses_the_target_classes(pair):
    exp_a, exp_b, _ = pair
    adapter = ContrastiveAdapter(exp_a.classifier.class_embeddings, exp_a.classifier.logit_scale)  # 3 A classes
    plain = transfer_logits(exp_b)
    torch.testing.assert_close(transfer_logits(exp_b, (ADAPTER, adapter)), plain, atol=1e-5, rtol=0)  # identity map
    with torch.no_grad():
        adapter.delta.copy_(0.5 * torch.randn(adapter.delta.shape, generator=torch.Generator().manual_seed(0)))
    moved = transfer_logits(exp_b, (ADAPTER, adapter))
    assert moved.shape == plain.shape and (moved - plain).abs().max() > 1e-3
    assert not get("linear_probe").transferable  # tied to A's classes: a probe has no text side to transfer
    with pytest.raises(NotImplementedError, match="linear_probe does not embed audio for CLAP's text side"):
        transfer_logits(exp_b, (get("linear_probe"), torch.nn.Linear(2, 2)))


def test_transfer_table_and_matrix(pair):
    exp_a, exp_b, residual = pair
    moved = trained(residual, exp_a)
    adapter = ContrastiveAdapter(exp_a.classifier.class_embeddings, exp_a.classifier.logit_scale)
    frame = transfer_table(
        {"A": exp_a, "B": exp_b},
        {("A", "residual"): [as_residual(residual), as_residual(moved)], ("A", "adapter"): [(ADAPTER, adapter)],
         ("B", "residual"): [as_residual(residual)]},
    )
    assert list(zip(frame["source"], frame["method"], frame["target"], strict=True)) == [
        ("A", "residual", "B"), ("A", "adapter", "B"), ("B", "residual", "A")]  # fmt: skip
    scores = [transfer_accuracy(exp_b, as_residual(residual)), transfer_accuracy(exp_b, as_residual(moved))]
    first = frame.iloc[0]
    assert first["encoders"] == 2 and first["accuracy"] == pytest.approx(np.mean(scores))
    assert first["accuracy_std"] == pytest.approx(np.std(scores, ddof=1))
    assert first["zeroshot"] == pytest.approx(transfer_accuracy(exp_b))
    assert frame["retention"].iloc[1:].tolist() == [0.0, 0.0]  # identity adapter, λ = 1: nothing lost

    matrix = transfer_matrix(frame, "residual")
    assert matrix.index.tolist() == [PLAIN_ROW, "A", "B"] and matrix.columns.tolist() == ["B", "A"]
    assert matrix.loc["A", "B"] == first["accuracy"] and matrix.loc[PLAIN_ROW, "A"] == transfer_accuracy(exp_a)
    assert np.isnan(matrix.loc["A", "A"]) and np.isnan(matrix.loc["B", "B"])
    with pytest.raises(ValueError, match="no transfer rows for method 'probe'"):
        transfer_matrix(frame, "probe")
