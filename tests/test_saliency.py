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
    Curves,
    FaithfulnessOptions,
    auc,
    cell_order,
    cell_scores,
    faithfulness_table,
    one_sided_p,
    perturbation_curves,
    top_share_inside,
)
from audio_residual.analysis.head_attribution import compare_with_ablation, head_attribution
from audio_residual.analysis.saliency import (
    METHODS,
    AttributionOptions,
    LogitScore,
    attribute,
    ig_within,
    randomised_scorer,
    saliency_maps,
    zero_shot_scorer,
)
from audio_residual.analysis.saliency_baselines import BLUR_SIGMA, Baseline, mean_spectrum
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
    options = AttributionOptions(Baseline("median"), steps=8)
    result = attribute(Linear(), x, torch.zeros(2), ("gradient_x_input", "integrated_gradients"), options=options)
    expected = (weights * (x - x.median(dim=2, keepdim=True).values)).sum(1)
    for method in ("gradient_x_input", "integrated_gradients"):
        torch.testing.assert_close(result.maps[method], expected, rtol=1e-5, atol=1e-5)
    change = result.scores - result.baseline_scores
    assert float((result.maps["integrated_gradients"].double().sum((1, 2)) - change).abs().max()) < 1e-5 * float(change.abs().max())


def test_every_method_runs_and_ig_memory_is_bounded_by_the_batch(scorer, clips, single_thread):
    counting = Counting(scorer)
    x, target = torch.from_numpy(clips[:2]), torch.tensor([0, 2])
    result = attribute(counting, x, target, METHODS, options=AttributionOptions(steps=16, noise_samples=4, batch_size=4))
    assert set(result.maps) == set(METHODS)
    for method, value in result.maps.items():
        assert value.shape == (2, FRAMES, 64) and torch.isfinite(value).all(), method
        assert float(value.abs().sum()) > 0, method
    assert (result.maps["gradient"] < 0).any() and (result.maps["gradient"] > 0).any()  # signed
    assert max(counting.sizes) <= 4  # 16 IG steps × 2 clips and 4 noise samples × 2 clips, 4 at a time
    assert len(counting.sizes) >= 16 * 2 // 4


def test_smoothgrad_is_seeded_and_maps_do_not_depend_on_the_batch(scorer, clips, single_thread):
    x, target = torch.from_numpy(clips), torch.tensor([0, 1, 2])
    options = AttributionOptions(noise_samples=2, batch_size=3)
    together = attribute(scorer, x, target, ("smoothgrad", "gradient"), options=options)
    again = attribute(scorer, x, target, ("smoothgrad",), options=options)
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
    options = AttributionOptions(steps=8)
    expected = attribute(scorer, x, target, ("integrated_gradients",), options=options)
    got = attribute(LogitScore(module), x, target, ("integrated_gradients",), options=options)
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
    maps = saliency_maps(scorer, clips, [2, 0], [1, 1], ("gradient",), options=AttributionOptions(batch_size=1))
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
    reference = Baseline("train_mean", np.full((1, 64), -45.0, dtype=np.float32))
    curves = perturbation_curves(scorer, x, 1, orders, options=FaithfulnessOptions(reference, steps=4, batch_size=5))
    with torch.no_grad():
        full = float(scorer(x[None], torch.tensor([1])))
        empty = float(scorer(torch.full_like(x[None], -45.0), torch.tensor([1])))
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


def _curves(score, base, deletion_frac, insertion_frac):
    """Curves of clips with s(x) = score, s(b) = base whose normalised values are the given fractions."""
    score, base = np.asarray(score, float)[:, None], np.asarray(base, float)[:, None]
    return {"deletion": base + (score - base) * np.asarray(deletion_frac, float),
            "insertion": base + (score - base) * np.asarray(insertion_frac, float)}


def test_faithfulness_is_judged_on_normalised_curves_of_the_clips_that_have_something_to_explain():
    """Clips of very different ranges: raw AUC means are dominated by the widest clip, the normalised ones
    are not; a clip whose s(x) − s(b) is under min_change is flagged and left out of the tests."""
    rng = np.random.default_rng(0)
    n = 8
    score, base = rng.uniform(2, 12, n), rng.uniform(-1, 1, n)
    score[-1] = base[-1] + 0.05  # nothing to explain: its normalised curve would be noise × 20
    steps = np.linspace(0, 1, 5)
    good_del = np.stack([np.concatenate([[1.0], 0.2 * np.ones(3), [0.0]])] * n)  # drops at once
    rand_del = np.stack([1 - steps] * n)  # linear
    good_ins = 1 - good_del[:, ::-1]
    good_del[-1], good_ins[-1] = 30.0, -30.0  # garbage on the flagged clip
    curves = Curves({"gradient": _curves(score, base, good_del, good_ins),
                     "random": _curves(score, base, rand_del, steps[None].repeat(n, 0)),
                     "randomised:gradient": _curves(score, base, rand_del, steps[None].repeat(n, 0))})
    np.testing.assert_allclose(curves.normalised("gradient", "deletion")[:-1], good_del[:-1], atol=1e-12)
    assert curves.explainable(1.0).tolist() == [True] * (n - 1) + [False]
    row = faithfulness_table(curves, ["gradient"], min_change=1.0).iloc[0]
    assert row["clips"] == n and row["clips_normalised"] == n - 1
    assert row["mean_score"] == pytest.approx(score.mean()) and row["mean_baseline_score"] == pytest.approx(base.mean())
    assert row["deletion_nauc"] == pytest.approx(auc(good_del[0])) and row["deletion_nauc_random"] == pytest.approx(0.5)
    assert row["insertion_nauc"] == pytest.approx(auc(good_ins[0]))
    raw = auc(curves.curves["gradient"]["deletion"])
    assert row["deletion_auc"] == pytest.approx(raw.mean())  # raw: every clip, in logits
    expected_p = one_sided_p(np.full(n - 1, 0.5), np.full(n - 1, auc(good_del[0])))
    assert row["p_deletion_vs_random"] == pytest.approx(expected_p) and row["beats_random"]
    assert row["differs_from_randomised"]
    everything = faithfulness_table(curves, ["gradient"], min_change=0.01).iloc[0]  # the garbage clip counts now
    assert everything["clips_normalised"] == n and everything["deletion_nauc"] > row["deletion_nauc"] + 3


def test_faithfulness_table_with_no_clip_to_explain_says_nothing_beats_random():
    curves = Curves({name: _curves([1.0, 1.2], [0.9, 1.0], np.ones((2, 3)), np.zeros((2, 3)))
                     for name in ("gradient", "random")})
    row = faithfulness_table(curves, ["gradient"]).iloc[0]
    assert row["clips_normalised"] == 0 and np.isnan(row["deletion_nauc"]) and not row["beats_random"]


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


class Step(nn.Module):
    """A score that rises by `height` where the clip's mean level crosses −60 dB, with slope `sharpness`: IG's
    64 Gauss-Legendre points miss a sharp rise (clip targets 0), a gentle slope (targets 1) they do not."""

    def __init__(self, height: float = 10.0, sharpness: float = 40.0):
        super().__init__()
        self.height, self.sharpness = height, sharpness

    def forward(self, x, target, is_longer=None):
        level = x.double().mean((1, 2, 3))
        sharp = self.height * torch.sigmoid(self.sharpness * (level + 60))
        return torch.where(target == 0, sharp, 0.01 * level).float()


FLOOR = Baseline("floor")  # the clips' quietest cell: their path from −71 dB to −54 dB crosses −60 dB


def test_ig_doubles_its_steps_only_for_clips_whose_path_is_too_sharp(clips):
    x, target = torch.from_numpy(clips[:2, :, 300:400]), torch.tensor([0, 1])  # mean −54 dB, b: −71 dB
    plain = attribute(Step(), x, target, ("integrated_gradients",), options=AttributionOptions(FLOOR, steps=64))
    change = plain.scores - plain.baseline_scores
    assert abs(float(plain.ig_delta[0])) > 0.01 * abs(float(change[0]))  # 64 points miss the jump
    assert plain.ig_converged.all()  # no tolerance asked: nothing to converge to
    refined = attribute(Step(), x, target, ("integrated_gradients",),
                        options=AttributionOptions(FLOOR, steps=64, ig_tolerance=0.01))
    assert (refined.ig_delta.abs() <= 0.01 * change.abs()).all() and refined.ig_converged.all()
    assert int(refined.ig_steps[0]) > 64 and int(refined.ig_steps[1]) == 64
    torch.testing.assert_close(refined.maps["integrated_gradients"][1], plain.maps["integrated_gradients"][1])


def test_ig_stops_only_within_one_percent_of_a_small_change(clips):
    """The issue's clip: s(x) − s(b) = 0.1 and 64 steps miss it by 1.35 % (0.00135). "Within 1 %" means
    ≤ 0.001 here; the earlier rule (1 % · |Δs| + 0.001 = 0.002) stopped at 64 steps."""
    assert not bool(ig_within(torch.tensor(0.00135), torch.tensor(0.1), 0.01))
    assert bool(ig_within(torch.tensor(-0.001), torch.tensor(0.1), 0.01))
    x = torch.from_numpy(clips[:1, :, 300:400])
    options = AttributionOptions(FLOOR, steps=64, ig_tolerance=0.01)
    result = attribute(Step(height=0.1, sharpness=8.0), x, torch.tensor([0]), ("integrated_gradients",), options=options)
    change = float(result.scores[0] - result.baseline_scores[0])
    assert change == pytest.approx(0.1, abs=1e-3)
    plain = attribute(Step(height=0.1, sharpness=8.0), x, torch.tensor([0]), ("integrated_gradients",),
                      options=AttributionOptions(FLOOR, steps=64))
    assert 0.011 < abs(float(plain.ig_delta[0])) / change < 0.02  # what the earlier rule accepted
    assert int(result.ig_steps[0]) >= 128 and abs(float(result.ig_delta[0])) <= 0.01 * change
    assert bool(result.ig_converged[0])


def test_a_clip_that_cannot_meet_the_rule_ends_at_the_step_cap_and_is_flagged(clips):
    """s(x) = s(b) exactly but a jump on the way: "within 1 % of 0" is out of reach at any finite steps."""

    class Bump(nn.Module):
        def forward(self, x, target, is_longer=None):
            level = x.double().mean((1, 2, 3))
            return (torch.sigmoid(40 * (level + 60)) - torch.sigmoid(40 * (level + 56))).float()

    x = torch.from_numpy(clips[:1, :, 300:400])
    options = AttributionOptions(FLOOR, steps=16, ig_tolerance=0.01, max_steps=64)
    result = attribute(Bump(), x, torch.tensor([0]), ("integrated_gradients",), options=options)
    assert abs(float(result.scores[0] - result.baseline_scores[0])) < 1e-3
    assert int(result.ig_steps[0]) == 64 and not bool(result.ig_converged[0])
    assert torch.isfinite(result.maps["integrated_gradients"]).all()


def test_baselines_are_what_their_names_say(clips):
    x = torch.from_numpy(clips[:2])
    median = Baseline("median")(x)
    assert median.shape == x.shape and torch.equal(median[:, :, 0], x.median(dim=2).values)
    assert torch.equal(median[:, :, 0], median[:, :, -1])  # constant over time
    from scipy.ndimage import gaussian_filter

    blurred = Baseline("blur")(x)
    np.testing.assert_allclose(blurred[1, 0].numpy(), gaussian_filter(clips[1, 0], BLUR_SIGMA, mode="nearest"), atol=1e-4)
    assert float(blurred.std()) < float(x.std())
    mean, std = mean_spectrum(clips, [0, 2], chunk=1)
    np.testing.assert_allclose(mean, clips[[0, 2]].mean(axis=(0, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(std, clips[[0, 2]].std(axis=(0, 2)), rtol=1e-4, atol=1e-4)
    train = Baseline("train_mean", mean)(x)
    np.testing.assert_allclose(train[1, 0, 500].numpy(), mean[0], rtol=1e-6)
    with pytest.raises(ValueError, match="spectrum is needed"):
        Baseline("train_mean")
    with pytest.raises(ValueError, match="unknown saliency baseline 'zeros'"):
        Baseline("zeros")
    with pytest.raises(ValueError, match="does not fit"):
        Baseline("train_mean", mean[:, :10])(x)


def test_head_attribution_table_says_when_no_single_head_ablation_changes_a_prediction(scorer, clips, stats):
    frame = head_attribution(scorer, clips, [0, 1], [0, 1], stats, batch_size=2)
    ablation = frame[["unit"]].assign(delta=0.0, logit_shift=np.linspace(0, 1, len(frame)))
    table = compare_with_ablation(frame, ablation).set_index(["attribution", "ablation"])
    for column in ("grad_x_output", "grad_x_centred"):
        assert np.isnan(table.loc[(column, "delta"), "spearman"])
        assert "no single-head ablation changed a prediction" in table.loc[(column, "delta"), "note"]
    assert table.loc[("abs_grad_x_centred", "logit_shift"), "note"] == ""
    assert np.isfinite(table.loc[("abs_grad_x_centred", "logit_shift"), "spearman"])


def test_maps_of_one_unit_share_one_colour_scale_and_the_frequency_axis_is_in_hz(tiny_bundle):
    """A map that sums to 1 % of another must look 1 % as strong: one scale per unit across the methods of a
    clip (IG and gradient × input in logit per cell, the gradients in logit per dB); mel bins labelled in Hz."""
    from audio_residual.analysis.saliency import UNITS
    from audio_residual.analysis.saliency_change import mel_centres
    from audio_residual.analysis.saliency_plots import saliency_figure, shared_bounds

    rng = np.random.default_rng(0)
    strong = rng.standard_normal((FRAMES, 64))
    maps = {"gradient": 1e-4 * rng.standard_normal((FRAMES, 64)), "gradient_x_input": strong,
            "integrated_gradients": 0.01 * strong}
    bounds = shared_bounds(maps, UNITS)
    assert bounds["logit per cell"] == pytest.approx(np.quantile(np.abs(strong), 0.99), rel=0.05)
    assert bounds["logit per dB"] < 1e-3
    mel_hz = mel_centres(tiny_bundle.feature_extractor)
    fig = saliency_figure(rng.normal(-50, 5, (FRAMES, 64)), maps, 0.01, mel_hz, "title", UNITS, (2.0, 4.0))
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title() in maps}
    limits = {name: ax.images[-1].get_clim() for name, ax in panels.items()}
    assert limits["gradient_x_input"] == limits["integrated_gradients"] == (-bounds["logit per cell"], bounds["logit per cell"])
    assert limits["gradient"] != limits["integrated_gradients"]
    ticks = [label.get_text() for label in panels["gradient"].get_yticklabels()]
    assert "1k" in ticks and "500" in ticks and panels["gradient"].get_ylabel() == "Hz (mel)"
    position = panels["gradient"].get_yticks()[ticks.index("1k")]
    # bin i is drawn over [i, i + 1], its centre frequency at i + 0.5: the tick sits where 1 kHz is
    assert np.interp(position - 0.5, np.arange(64), mel_hz) == pytest.approx(1000, rel=1e-6)
    labels = [ax.get_ylabel() for ax in fig.axes if "scale shared with" in ax.get_ylabel()]
    assert any("logit per cell" in label and "integrated_gradients" in label for label in labels)
    assert len([line for line in panels["gradient"].get_lines() if line.get_linestyle() == "--"]) == 2
