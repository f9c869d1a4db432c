"""Saliency over the input log-mel: exactness and plumbing on the tiny random CLAP (fast).

What a trained model must show (faithfulness against random orders and a randomised model, saliency
inside the sound's own time-frequency region) is in tests/test_saliency_trained.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from audio_residual.analysis import ResidualStatistics
from audio_residual.analysis.faithfulness import (
    auc,
    cell_order,
    cell_scores,
    faithfulness_table,
    perturbation_curves,
    top_share_inside,
)
from audio_residual.analysis.head_attribution import compare_with_ablation, head_attribution
from audio_residual.analysis.saliency import (
    IG_ABS_TOLERANCE,
    METHODS,
    LogitScore,
    attribute,
    baseline,
    randomised_scorer,
    saliency_maps,
    zero_shot_scorer,
)
from audio_residual.analysis.saliency_change import saliency_change
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.zeroshot import ZeroShotClassifier
from audio_residual.residual.units import build_residual

CLASSES = ("dog", "rain", "sea_waves")
FRAMES = 1001


@pytest.fixture(scope="module")
def clips():
    """Three log-mels shaped like CLAP's (dB, a noise floor and a loud band in a known place)."""
    rng = np.random.default_rng(0)
    x = rng.normal(-60.0, 3.0, size=(3, 1, FRAMES, 64)).astype(np.float32)
    x[:, :, 300:500, 20:30] += 40.0
    return x


@pytest.fixture(scope="module")
def scorer(tiny_bundle):
    return zero_shot_scorer(ZeroShotClassifier(tiny_bundle, CLASSES))


@pytest.fixture(scope="module")
def stats(tiny_bundle, clips):
    return ResidualStatistics.fit(tiny_bundle.model, clips, np.arange(3), batch_size=3)


class Counting(nn.Module):
    """A scorer wrapper that records the batch size of every forward pass."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x, target, is_longer=None):
        self.sizes.append(x.shape[0])
        return self.inner(x, target, is_longer)


def test_ig_on_a_linear_score_is_exactly_complete_and_equals_gradient_x_input(clips):
    """On s(x) = Σ w·x, IG = gradient × input = w ⊙ (x − b) exactly: the offset-from-baseline convention."""
    weights = torch.from_numpy(np.random.default_rng(1).standard_normal(clips.shape[1:]).astype(np.float32))

    class Linear(nn.Module):
        def forward(self, x, target, is_longer=None):
            return (x.double() * weights.double()).sum((1, 2, 3)).float()

    x = torch.from_numpy(clips[:2])
    result = attribute(Linear(), x, torch.zeros(2), methods=("gradient_x_input", "integrated_gradients"), steps=8)
    expected = (weights * (x - baseline(x))).sum(1)
    for method in ("gradient_x_input", "integrated_gradients"):
        torch.testing.assert_close(result.maps[method], expected, rtol=1e-5, atol=1e-5)
    change = result.scores - result.baseline_scores
    assert float((result.maps["integrated_gradients"].double().sum((1, 2)) - change).abs().max()) < 1e-5 * float(change.abs().max())


def test_every_method_runs_and_ig_memory_is_bounded_by_the_batch(scorer, clips, single_thread):
    counting = Counting(scorer)
    x, target = torch.from_numpy(clips[:2]), torch.tensor([0, 2])
    result = attribute(counting, x, target, methods=METHODS, steps=16, noise_samples=4, batch_size=4)
    assert set(result.maps) == set(METHODS)
    for method, value in result.maps.items():
        assert value.shape == (2, FRAMES, 64) and torch.isfinite(value).all(), method
        assert float(value.abs().sum()) > 0, method
    assert (result.maps["gradient"] < 0).any() and (result.maps["gradient"] > 0).any()  # signed
    assert max(counting.sizes) <= 4  # 16 IG steps × 2 clips and 4 noise samples × 2 clips, 4 at a time
    assert len(counting.sizes) >= 16 * 2 // 4


def test_smoothgrad_is_seeded_and_maps_do_not_depend_on_the_batch(scorer, clips, single_thread):
    x, target = torch.from_numpy(clips), torch.tensor([0, 1, 2])
    together = attribute(scorer, x, target, methods=("smoothgrad", "gradient"), noise_samples=2, batch_size=3)
    again = attribute(scorer, x, target, methods=("smoothgrad",), noise_samples=2, batch_size=3)
    assert torch.equal(together.maps["smoothgrad"], again.maps["smoothgrad"])
    alone = attribute(scorer, x[1:2], target[1:2], methods=("gradient",))
    torch.testing.assert_close(alone.maps["gradient"][0], together.maps["gradient"][1], rtol=1e-4, atol=1e-6)


def test_residual_at_identity_explains_the_same_model_and_trained_lambdas_change_it(scorer, tiny_bundle, clips, stats):
    x, target = torch.from_numpy(clips[:1]), torch.tensor([1])
    plain = attribute(scorer, x, target, methods=("gradient",)).maps["gradient"]
    residual = build_residual(stats, stages=(2, 3))
    same = attribute(zero_shot_scorer(scorer_classifier(tiny_bundle), residual), x, target, methods=("gradient",))
    torch.testing.assert_close(same.maps["gradient"], plain, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        for lam in residual.lambdas.values():
            lam.mul_(3.0)
    hooks = sum(len(m._forward_pre_hooks) for m in tiny_bundle.model.modules())
    changed = attribute(zero_shot_scorer(scorer_classifier(tiny_bundle), residual), x, target, methods=("gradient",))
    assert float((changed.maps["gradient"] - plain).abs().max()) > 1e-3 * float(plain.abs().max())
    assert sum(len(m._forward_pre_hooks) for m in tiny_bundle.model.modules()) == hooks  # adapter detached


def scorer_classifier(bundle):
    return ZeroShotClassifier(bundle, CLASSES)


def test_a_classifier_module_with_the_zero_shot_head_gives_the_zero_shot_maps(scorer, tiny_bundle, clips):
    """Fine-tuned / LoRA models are scored by their own logits; with CLAP's head they equal zero-shot."""

    class Head(nn.Module):  # the shape of methods.finetune.AudioClassifier
        def __init__(self, model, classes, scale):
            super().__init__()
            self.audio_model, self.audio_projection = model.audio_model, model.audio_projection
            self.head = nn.Linear(classes.shape[1], classes.shape[0], bias=False)
            self.head.weight.data = scale * classes

        def forward(self, x, is_longer=None):
            return self.head(audio_embeddings(self, x, is_longer))

    module = Head(copy.deepcopy(tiny_bundle.model), scorer.texts, scorer.logit_scale).requires_grad_(False)
    x, target = torch.from_numpy(clips[:2]), torch.tensor([0, 2])
    expected = attribute(scorer, x, target, methods=("integrated_gradients",), steps=8)
    got = attribute(LogitScore(module), x, target, methods=("integrated_gradients",), steps=8)
    torch.testing.assert_close(got.maps["integrated_gradients"], expected.maps["integrated_gradients"], rtol=1e-4, atol=1e-6)


def test_randomised_scorer_has_other_weights_same_architecture_and_targets(scorer, tiny_bundle):
    random = randomised_scorer(scorer)
    trained = dict(tiny_bundle.model.audio_model.named_parameters())
    fresh = dict(random.encoder.audio_model.named_parameters())
    assert trained.keys() == fresh.keys()
    drawn = [k for k, v in trained.items() if v.dim() >= 2 and "relative_position" not in k]  # the rest start constant
    assert len(drawn) > 20 and all(not torch.equal(trained[k], fresh[k]) for k in drawn)
    assert torch.equal(random.texts, scorer.texts)


def test_saliency_maps_batches_over_a_feature_array(scorer, clips):
    maps = saliency_maps(scorer, clips, [2, 0], [1, 1], methods=("gradient",), batch_size=1)
    direct = attribute(scorer, torch.from_numpy(clips[[2, 0]]), torch.tensor([1, 1]), methods=("gradient",))
    torch.testing.assert_close(torch.from_numpy(maps["gradient"]), direct.maps["gradient"], rtol=1e-4, atol=1e-6)
    assert maps["score"].shape == (2,)
    with pytest.raises(ValueError, match="one target per clip"):
        saliency_maps(scorer, clips, [0, 1], [0])
    with pytest.raises(ValueError, match="unknown saliency method"):
        attribute(scorer, torch.from_numpy(clips[:1]), torch.tensor([0]), methods=("occlusion",))


def test_deletion_and_insertion_curves_end_at_the_baseline_and_the_clip(scorer, clips):
    x = torch.from_numpy(clips[0])
    saliency = np.random.default_rng(0).random((FRAMES, 64))
    orders = [cell_order(saliency), np.random.default_rng(1).permutation(cell_scores(saliency).size)]
    curves = perturbation_curves(scorer, x, 1, orders, steps=4, batch_size=5)
    with torch.no_grad():
        full = float(scorer(x[None], torch.tensor([1])))
        empty = float(scorer(baseline(x[None]), torch.tensor([1])))
    for o in range(2):
        assert curves["deletion"][o, 0] == pytest.approx(full, abs=1e-4)
        assert curves["deletion"][o, -1] == pytest.approx(empty, abs=1e-4)
        assert curves["insertion"][o, 0] == pytest.approx(empty, abs=1e-4)
        assert curves["insertion"][o, -1] == pytest.approx(full, abs=1e-4)
    assert auc(np.array([1.0, 0.0])) == 0.5 and auc(np.array([1.0, 1.0, 0.0])) == 0.75


def test_cell_order_puts_the_salient_region_first_and_top_share_finds_it():
    saliency = np.zeros((FRAMES, 64))
    saliency[300:500, 20:30] = 1.0
    region = saliency > 0
    order = cell_order(saliency)  # cells of 10 frames × 4 mels: the region covers 20 × 3 cells (partly 2 edges)
    grid = cell_scores(saliency)
    assert (grid.ravel()[order[:60]] > 0).all() and (grid.ravel()[order[60:]] <= grid.ravel()[order[59]]).all()
    assert top_share_inside(saliency + 1e-9 * np.random.default_rng(0).random(saliency.shape), region) > 0.3
    assert top_share_inside(np.random.default_rng(0).random(saliency.shape), region) < 0.1


def test_faithfulness_table_compares_pairs_of_clips():
    good = {"deletion": np.arange(8) * 0.1, "insertion": np.arange(8) + 5.0}
    bad = {"deletion": np.arange(8) * 0.1 + 1.0, "insertion": np.arange(8) * 0.5}
    table = faithfulness_table({"gradient": good, "random": bad, "randomised:gradient": good}, ["gradient"],
                               {"gradient": np.full(8, 0.2)})
    row = table.iloc[0]
    assert row["beats_random"] and not row["differs_from_randomised"]
    assert row["p_deletion_vs_random"] < 0.01 and row["p_insertion_vs_randomised"] == 1.0
    assert row["rank_corr_randomised"] == pytest.approx(0.2)


def test_head_attribution_is_the_first_order_effect_of_moving_a_head_towards_its_mean(scorer, tiny_bundle, clips, stats):
    """−Σ ∂s/∂z_h (z_h − m_h) ≈ (s(z_h − ε(z_h − m_h)) − s)/ε: checks token sums, window layout and means."""
    from audio_residual.analysis.ablation import head_mean
    from audio_residual.clap.hooks import ClapHooks

    frame = head_attribution(scorer, clips, [0, 1], [1, 1], stats, batch_size=2)
    heads = sum(stats.num_heads(block) for block in stats.blocks)
    assert len(frame) == heads and frame["clips"].eq(2).all()
    strongest = frame.loc[frame["grad_x_centred"].abs().idxmax()]
    block, head, eps = f"layers.{strongest['stage']}.blocks.{strongest['block']}", int(strongest["head"]), 0.1
    mean = head_mean(stats, block, head).float()

    def moved(step: float) -> torch.Tensor:
        def nudge(z, _point):
            z = z.clone()
            z[..., head, :] = z[..., head, :] - step * (z[..., head, :] - mean)
            return z

        with torch.no_grad(), ClapHooks(tiny_bundle.model).hooks([(f"{block}.attn.hook_z", nudge)]):
            return scorer(torch.from_numpy(clips[:2]), torch.tensor([1, 1]))

    central = float((moved(eps) - moved(-eps)).mean()) / (2 * eps)  # second-order terms cancel
    assert central == pytest.approx(-float(strongest["grad_x_centred"]), rel=0.02)


def test_head_attribution_against_an_ablation_table(scorer, clips, stats):
    frame = head_attribution(scorer, clips, [0, 1, 2], [0, 1, 2], stats, batch_size=3)
    ablation = frame[["unit"]].assign(delta=-frame["abs_grad_x_centred"].rank().to_numpy(), logit_shift=frame["abs_grad_x_centred"])
    table = compare_with_ablation(frame, ablation).set_index(["attribution", "ablation"])
    assert table.loc[("abs_grad_x_centred", "logit_shift"), "spearman"] == pytest.approx(1.0)
    assert len(table) == 4 and table["heads"].eq(len(frame)).all()
    with pytest.raises(ValueError, match="no head in common"):
        compare_with_ablation(frame, ablation.assign(unit="other"))


def test_saliency_change_finds_the_band_where_the_maps_differ(tiny_bundle):
    rng = np.random.default_rng(0)
    before = rng.random((2, FRAMES, 64))
    log_mels = rng.normal(-60, 1, size=(2, FRAMES, 64))
    clips, regions = saliency_change(before, before.copy(), log_mels, tiny_bundle.feature_extractor)
    assert np.allclose(clips["rank_corr"], 1.0) and np.allclose(clips["change_l1"], 0.0)
    after = before.copy()
    after[:, :, 60:] *= 5.0  # the top mel bins: the band above 6 kHz
    clips, regions = saliency_change(before, after, log_mels, tiny_bundle.feature_extractor)
    bands = regions.set_index("region")
    assert bands.loc[">6000 Hz", "enrichment"] > 2 and bands.loc["0-500 Hz", "enrichment"] < 1
    assert (clips["rank_corr"] < 1).all()


def test_scores_under_autocast_keep_float32_maps_close_to_fp32(tiny_bundle, scorer, clips):
    """The CUDA path runs the forward under autocast; CPU bf16 autocast exercises the same code here."""
    from audio_residual.analysis.saliency import TextScore

    bf16 = TextScore(tiny_bundle.model, scorer.texts, scorer.logit_scale,
                     autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    x, target = torch.from_numpy(clips[:1]), torch.tensor([2])
    low = attribute(bf16, x, target, methods=("gradient",)).maps["gradient"]
    full = attribute(scorer, x, target, methods=("gradient",)).maps["gradient"]
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and not torch.equal(low, full)  # bf16 did run
    assert float(torch.corrcoef(torch.stack([low.ravel(), full.ravel()]))[0, 1]) > 0.9


def test_a_caption_score_is_the_zero_shot_score_of_the_same_text(scorer, tiny_bundle, clips):
    from audio_residual.analysis.saliency import caption_scorer
    from audio_residual.clap.zeroshot import class_prompts

    captions = caption_scorer(tiny_bundle, class_prompts(CLASSES, "This is a sound of {label}."))
    x, target = torch.from_numpy(clips[:2]), torch.tensor([2, 0])
    with torch.no_grad():
        torch.testing.assert_close(captions(x, target), scorer(x, target), rtol=1e-5, atol=1e-5)


def test_ig_doubles_its_steps_only_for_clips_whose_path_is_too_sharp(clips):
    """A score that jumps along the path from b to x defeats 64 Gauss-Legendre points; a smooth one does not."""

    class Step(nn.Module):
        def forward(self, x, target, is_longer=None):
            level = x.double().mean((1, 2, 3))
            sharp = 10 * torch.sigmoid(40 * (level + 60))  # clip 0 crosses −60 dB on its way up
            smooth = 0.01 * level
            return torch.where(target == 0, sharp, smooth).float()

    x, target = torch.from_numpy(clips[:2, :, 300:400]), torch.tensor([0, 1])  # mean −54 dB, b: −71 dB
    plain = attribute(Step(), x, target, methods=("integrated_gradients",), steps=64)
    change = plain.scores - plain.baseline_scores
    assert abs(float(plain.ig_delta[0])) > 0.01 * abs(float(change[0]))  # 64 points miss the jump
    refined = attribute(Step(), x, target, methods=("integrated_gradients",), steps=64, ig_tolerance=0.01)
    assert (refined.ig_delta.abs() <= 0.01 * change.abs() + IG_ABS_TOLERANCE).all()
    assert int(refined.ig_steps[0]) > 64 and int(refined.ig_steps[1]) == 64
    torch.testing.assert_close(refined.maps["integrated_gradients"][1], plain.maps["integrated_gradients"][1])
