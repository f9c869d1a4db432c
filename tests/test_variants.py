"""ResiDual variants: each option's algebra at the unit's output, which ones are the identity at λ = 1,
the paper preset, distinct labels, and persistence of the options."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from audio_residual.analysis.stats import ResidualStatistics
from audio_residual.clap.encode import audio_embeddings
from audio_residual.clap.hooks import ClapHooks
from audio_residual.cli import build_parser, main
from audio_residual.cli.study import train_config as _train_config
from audio_residual.residual.units import ResiDual, ResidualConfig
from audio_residual.training.trainer import TrainConfig

BLOCK = "layers.3.blocks.0"  # the tiny model's last stage has one block: editing it leaves its input as is
K = 3  # a pruned basis, so that the tail (directions outside Φ) is not empty


@pytest.fixture(scope="module")
def features():
    return torch.randn(8, 1, 1001, 64, generator=torch.Generator().manual_seed(3)).numpy()


@pytest.fixture(scope="module")
def stats(tiny_bundle, features):
    return ResidualStatistics.fit(tiny_bundle.model, features, np.arange(6), batch_size=6)


@pytest.fixture(scope="module")
def clip(features):
    return torch.from_numpy(features[6:7])  # not among the clips the statistics saw


@pytest.fixture(scope="module")
def plain(tiny_bundle, clip):
    """Every unit output of the unedited model, in one forward pass."""
    with torch.no_grad():
        _, cache = ClapHooks(tiny_bundle.model).run_with_cache(clip, names=[hook for _, _, hook in UNITS.values()])
    return {name: tensor.double() for name, tensor in cache.items()}


# Each variant's closed form for one unit u with mean μ, basis Φ (k×d) and gains λ (k,), written out
# independently of ResiDual.edit.
def _proj(phi, v, lam):
    return ((v @ phi.T) * lam) @ phi  # Φᵀ diag(λ) Φ v


FORMULAS = {
    "keep-keep": lambda u, mu, phi, lam: u + _proj(phi, u - mu, lam - 1),
    "keep-zero": lambda u, mu, phi, lam: mu + _proj(phi, u - mu, lam),
    "drop-keep": lambda u, mu, phi, lam: u - mu + _proj(phi, u - mu, lam - 1),
    "drop-zero": lambda u, mu, phi, lam: _proj(phi, u - mu, lam),  # the paper's adapter
    # A coarse unit's λ is one scalar (λ[0]; the test checks the others equal it).
    "coarse-mean-keep": lambda u, mu, phi, lam: u + (lam[0] - 1) * (u - mu) @ phi.T @ phi,
    "coarse-zero-keep": lambda u, mu, phi, lam: u + (lam[0] - 1) * u @ phi.T @ phi,
    "coarse-zero-zero": lambda u, mu, phi, lam: lam[0] * u @ phi.T @ phi,  # λ·u on the unit's span
    "coarse-zero-zero-drop": lambda u, mu, phi, lam: lam[0] * u @ phi.T @ phi - mu,
}
OPTIONS = {
    "keep-keep": {},
    "keep-zero": dict(tail="zero"),
    "drop-keep": dict(center="drop"),
    "drop-zero": dict(center="drop", tail="zero"),
    "coarse-mean-keep": dict(coarse=True),
    "coarse-zero-keep": dict(coarse=True, coarse_center="zero"),
    "coarse-zero-zero": dict(coarse=True, coarse_center="zero", tail="zero"),
    "coarse-zero-zero-drop": dict(coarse=True, coarse_center="zero", tail="zero", center="drop"),
}
# unit → (granularity, kind, hook point of its output in the plain and the edited model)
UNITS = {
    "head": ("head", "attn", f"{BLOCK}.attn.hook_result"),
    "block-attn": ("block", "attn", f"{BLOCK}.hook_attn_out"),
    "layer-mlp": ("layer", "mlp", f"{BLOCK}.hook_mlp_out"),
}


def _capture(model, x, name):
    with torch.no_grad():
        return ClapHooks(model).run_with_cache(x, names=[name])[1][name].double()


def _unit_lambdas(residual: ResiDual) -> dict[str, torch.Tensor]:
    """Per unit, its λ per kept component (a coarse unit's one λ repeated), read from the module."""
    out = {}
    for site in residual.sites:
        lam, index = residual.lambdas[site.group].detach().double(), getattr(residual, site.buffers["index"])
        if site.kind == "head":
            for h in range(index.shape[0]):
                out[f"{BLOCK}.attn.head.{h}"] = lam[index[h][index[h] >= 0]]
        else:
            out[site.unit] = lam[index]
    return out


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("variant", list(FORMULAS))
def test_each_variant_matches_its_formula_at_the_unit_output(tiny_bundle, stats, clip, plain, single_thread, unit, variant):
    granularity, kind, hook = UNITS[unit]
    config = ResidualConfig(granularity=granularity, kinds=(kind,), stages=(3,), k=K, init="randn", **OPTIONS[variant])
    residual = ResiDual.from_statistics(stats, config)
    with residual.attached(tiny_bundle.model):
        edited = _capture(tiny_bundle.model, clip, hook)
    bases = {name: basis.prune(k=K) for name, basis in stats.pca(granularity, kind, (3,)).items()}
    for name, lam in _unit_lambdas(residual).items():
        basis = bases[name]
        assert len(basis.eigenvalues) == K and len(lam) == K
        assert config.coarse == bool((lam == lam[0]).all())
        if granularity == "head":
            h = int(name.rsplit(".", 1)[1])
            u, got = plain[hook][..., h, :], edited[..., h, :]
        else:
            u, got = plain[hook], edited
        expected = FORMULAS[variant](u, basis.mean, basis.components, lam)
        assert float((got - expected).abs().max()) <= 1e-5, name
        assert float((got - u).abs().max()) > 1e-3  # λ drawn from 1 + N(0, 1): the unit did change


def test_paper_variant_equals_a_padded_full_basis_adapter(tiny_bundle, stats, clip, plain):
    """The paper's adapter keeps the full eigenbasis, pads the pruned components' gains with 0 and never
    adds μ back: Φ_fullᵀ diag(λ, 0, …, 0) Φ_full (u − μ). Built here from a fresh eigendecomposition."""
    config = TrainConfig.preset("paper", granularity="block", stages=(3,)).residual_config()
    residual = ResiDual.from_statistics(stats, config)
    u = plain[f"{BLOCK}.hook_attn_out"]
    with residual.attached(tiny_bundle.model):
        got = _capture(tiny_bundle.model, clip, f"{BLOCK}.hook_attn_out")
    moments = stats.unit_moments("block", "attn", (3,))[f"{BLOCK}.attn"]
    values, vectors = torch.linalg.eigh(moments.cov)
    full = vectors.flip(1).T  # every direction, largest variance first
    lam = residual.lambdas[f"{BLOCK}.attn".replace(".", "_")].detach().double()
    explained = torch.cumsum(values.flip(0), 0) / values.clamp(min=0).sum()
    assert len(lam) == int((explained < 0.9).sum()) + 1  # the fewest components reaching 90 % EVR
    padded = torch.cat([lam, torch.zeros(len(full) - len(lam), dtype=lam.dtype)])
    expected = ((u - moments.mean) @ full.T * padded) @ full
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("variant", list(OPTIONS))
def test_identity_at_lambda_one_only_where_promised(tiny_bundle, stats, clip, single_thread, variant):
    model, x = tiny_bundle.model, clip
    config = ResidualConfig(granularity="head" if "coarse" in variant else "block", stages=(2, 3), k=K, **OPTIONS[variant])
    residual = ResiDual.from_statistics(stats, config)
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with residual.attached(model):
            edited = audio_embeddings(model, x)
    gap = float((edited - plain).abs().max())
    assert config.identity_at_one == (config.center == "keep" and config.tail == "keep")
    assert gap <= 1e-5 if config.identity_at_one else gap > 1e-3


def test_each_block_is_edited_once_and_its_mlp_runs_once(tiny_bundle, stats, features, single_thread):
    """The earlier project applied each patched block twice. λ = 3 on block 0's attention: its output must be
    u + 2 Φᵀ Φ (u − μ) (once, not twice), and the block output the shortcut + edited attention + one MLP pass."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[6:])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block", stages=(0,), k=4))
    with torch.no_grad():
        for p in residual.lambdas.values():
            p.fill_(3.0)
    hooks = ClapHooks(model)
    names = ["layers.0.blocks.0." + s for s in ("hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad():
        u = hooks.run_with_cache(x, names=["layers.0.blocks.0.hook_attn_out"])[1]["layers.0.blocks.0.hook_attn_out"]
        mlp_calls = []
        layer = hooks.encoder.layers[0].blocks[0]
        counter = layer.output.register_forward_hook(lambda *_: mlp_calls.append(1))
        try:
            with residual.attached(model):
                _, cache = hooks.run_with_cache(x, names=names)
        finally:
            counter.remove()
    basis = stats.pca("block", "attn", (0,))["layers.0.blocks.0.attn"].prune(k=4)
    u = u.double()
    expected_attn = u + 2 * ((u - basis.mean) @ basis.components.T) @ basis.components
    pre, mid, mlp, post = (cache[n].double() for n in names)
    assert (mid - pre - expected_attn).abs().max() <= 1e-5
    assert (post - mid - mlp).abs().max() <= 1e-5
    assert len(mlp_calls) == 1


def test_lambda_one_is_the_identity_only_because_the_mean_is_kept(tiny_bundle, stats, features, single_thread):
    """The earlier project dropped the PCA mean. With μ the edit at λ = 1 is exactly zero; the mean-free form
    u + Φᵀ(λ−1)Φu would also be zero at λ = 1, so check λ ≠ 1 too: the edit must be centred (zero on μ itself)."""
    model = tiny_bundle.model
    x = torch.from_numpy(features[6:])
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block"))
    with torch.no_grad():
        plain = audio_embeddings(model, x)
        with residual.attached(model):
            assert (audio_embeddings(model, x) - plain).abs().max() <= 1e-5
    site = next(s for s in residual.sites if s.hook.endswith("hook_attn_out"))
    with torch.no_grad():
        residual.lambdas[site.group].fill_(0.25)
        mean = getattr(residual, site.buffers["mean"])
        torch.testing.assert_close(residual.edit(mean[None, None], site)[0, 0], mean, rtol=0, atol=1e-6)


def test_paper_preset_fields_and_overrides():
    paper = TrainConfig.preset("paper")
    assert (paper.init, paper.evr, paper.center, paper.tail) == ("randn", 0.9, "drop", "zero")
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.epochs, paper.patience) == ("schedulefree", 0.8, 64, 30, 5)
    assert paper.variant == "residual-paper"
    unit = paper.residual_config()
    assert (unit.init, unit.evr, unit.center, unit.tail, unit.coarse) == ("randn", 0.9, "drop", "zero", False)
    # Which units carry λ is configuration; changing a preset field is another procedure.
    assert TrainConfig.preset("paper", granularity="layer", stages=(3,)).variant == "residual-paper"
    assert TrainConfig.preset("paper", lr=0.1).variant == "residual-center-drop-tail-zero-init-randn"
    assert TrainConfig().variant == "residual" and TrainConfig(coarse=True).variant == "residual_coarse"
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.preset("papper")
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.preset("paper", learning_rate=0.1)


def test_labels_are_distinct_for_distinct_variants():
    combos = []
    for center, tail, init, coarse in itertools.product(("keep", "drop"), ("keep", "zero"), ("ones", "randn"), (False, True)):
        for coarse_center in ("mean", "zero") if coarse else ("mean",):
            combos.append(TrainConfig(center=center, tail=tail, init=init, coarse=coarse, coarse_center=coarse_center))
    labels = [c.variant for c in combos]
    assert len(set(labels)) == len(combos) == 24
    assert "residual-paper" not in labels and labels[0] == "residual"
    assert TrainConfig.preset("paper").variant not in labels


@pytest.mark.parametrize(
    "options, message",
    [(dict(center="middle"), "center"), (dict(tail="pad"), "tail"), (dict(coarse_center="zero"), "coarse units only")],
)
def test_bad_variant_option_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        ResidualConfig(**options)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


def test_save_load_round_trip_carries_the_options(tiny_bundle, stats, clip, tmp_path):
    model, x = tiny_bundle.model, clip
    config = ResidualConfig(granularity="head", stages=(3,), coarse=True, coarse_center="zero", tail="zero",
                            center="drop", init="randn")
    residual = ResiDual.from_statistics(stats, config)
    loaded = ResiDual.load(residual.save(tmp_path / "lambda.safetensors"))
    assert loaded.config == config
    with torch.no_grad():
        with residual.attached(model):
            a = audio_embeddings(model, x)
        with loaded.attached(model):
            b = audio_embeddings(model, x)
    assert torch.equal(a, b)


def test_file_written_before_the_options_loads_with_defaults(tiny_bundle, stats, clip, tmp_path):
    model, x = tiny_bundle.model, clip
    residual = ResiDual.from_statistics(stats, ResidualConfig(granularity="block", stages=(3,), init="randn"))
    path = residual.save(tmp_path / "new.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    old = json.loads(header["config"])
    for option in ("center", "tail", "coarse_center"):
        del old[option]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**header, "config": json.dumps(old)})
    loaded = ResiDual.load(tmp_path / "old.safetensors")
    assert (loaded.config.center, loaded.config.tail, loaded.config.coarse_center) == ("keep", "keep", "mean")
    with torch.no_grad():
        with residual.attached(model):
            a = audio_embeddings(model, x)
        with loaded.attached(model):
            b = audio_embeddings(model, x)
    assert torch.equal(a, b)


def test_cli_preset_and_options_build_the_named_config():
    parser = build_parser()
    base = ["train-residual", "--data", "d", "--out", "o"]
    assert _train_config(parser.parse_args(base)) == TrainConfig()
    assert _train_config(parser.parse_args([*base, "--preset", "paper"])) == TrainConfig.preset("paper")
    given = _train_config(parser.parse_args([*base, "--preset", "paper", "--batch-size", "8", "--stages", "3"]))
    assert given == TrainConfig.preset("paper", batch_size=8, stages=(3,))
    options = ["--center", "drop", "--tail", "zero", "--init", "randn", "--coarse", "--coarse-center", "zero"]
    config = _train_config(parser.parse_args([*base, *options]))
    assert config.variant == "residual_coarse-around-zero-center-drop-tail-zero-init-randn"


def test_train_residual_rows_carry_the_variant_label(synthetic_esc50, tmp_path):
    common = ["--data", str(synthetic_esc50), "--model", "tiny-random", "--cache", str(tmp_path / "cache"), "--device", "cpu"]
    args = ["train-residual", *common, "--out", str(tmp_path / "run"), "--preset", "paper", "--epochs", "1",
            "--granularity", "layer", "--stages", "3", "--folds", "1"]
    assert main(args) == 0
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert results["method"].tolist() == ["zeroshot", "residual-center-drop-tail-zero-init-randn"]
