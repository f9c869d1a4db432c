"""Provenance of hub models: the revision asked for and the commit it resolved to (offline, from a hub cache);
OUT/provenance.json always describes the outputs beside it."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import transformers

from audio_residual.clap.loading import load_clap
from audio_residual.clap.tiny import build_tiny_clap

COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding `fake/clap` at two commits, `main` and tag `v1` (different weights)."""
    repo = tmp_path / "models--fake--clap"
    (repo / "refs").mkdir(parents=True)
    for seed, (ref, commit) in enumerate(COMMITS.items()):
        (repo / "refs" / ref).write_text(commit)
        model, processor = build_tiny_clap(("dog", "rain"), seed=seed)
        model.save_pretrained(repo / "snapshots" / commit)
        processor.save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hub_model_records_revision_and_resolved_commit(hub_cache):
    latest = load_clap("fake/clap", device="cpu")
    pinned = load_clap("fake/clap", device="cpu", revision="v1")
    assert latest.provenance == {"model": "fake/clap", "revision": None, "commit": COMMITS["main"],
                                 "transformers": transformers.__version__, "enable_fusion": False,
                                 "text_length": {"max_tokens": 78, "rule": latest.text_length.rule}}
    assert pinned.provenance["revision"] == "v1" and pinned.provenance["commit"] == COMMITS["v1"]
    differs = any(
        not (a == b).all() for a, b in zip(latest.model.parameters(), pinned.model.parameters(), strict=True)
    )
    assert differs  # the revision chose other weights, not just another label


def test_local_and_tiny_models_have_no_commit(tiny_bundle, tmp_path):
    assert tiny_bundle.provenance["commit"] is None and tiny_bundle.provenance["model"] == "tiny-random"
    model, processor = build_tiny_clap(("dog",))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert load_clap(tmp_path, device="cpu").provenance["commit"] is None


def test_provenance_describes_the_outputs_beside_it(small_data, tmp_path, cli, monkeypatch):
    from audio_residual.evaluation import zeroshot as zeroshot_module

    out = tmp_path / "out"
    argv = ["zeroshot", "--data", small_data, "--model", "tiny-random", "--device", "cpu", "--out", out,
            "--cache", tmp_path / "cache"]
    assert cli(*argv, "--template", "A sound of {label}.").code == 0
    before = (out / "zeroshot.csv").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zeroshot_module, "zero_shot_by_fold", killed)
    assert cli(*argv, "--template", "Another {label}.").code == 130  # stopped midway
    assert (out / "zeroshot.csv").read_bytes() == before
    assert json.loads((out / "provenance.json").read_text())["templates"] == ["A sound of {label}."]
