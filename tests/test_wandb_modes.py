"""One W&B vocabulary for every command: auto | online | offline | disabled."""

import pytest

from audio_residual.cli import build_parser
from audio_residual.training import tracking
from audio_residual.training.tracking import MODES, RunTracker, resolve_mode


def test_auto_is_online_only_when_logged_in(monkeypatch):
    monkeypatch.setattr(tracking, "wandb_available", lambda: True)
    assert resolve_mode("auto") == "online"
    monkeypatch.setattr(tracking, "wandb_available", lambda: False)
    assert resolve_mode("auto") == "disabled"
    assert RunTracker("auto").run is None
    assert [resolve_mode(m) for m in ("online", "offline", "disabled", True, False)] == [
        "online", "offline", "disabled", "online", "disabled"]
    with pytest.raises(ValueError, match=r"W&B mode must be one of .*got 'on'"):
        resolve_mode("on")


@pytest.mark.parametrize("command", ["train-residual", "sweep", "experiment", "retrieval", "pretrain"])
def test_every_command_takes_the_same_words(command):
    parser = build_parser()
    assert parser.parse_args([command, "--data", "x", "--out", "o"]).wandb == "auto"  # one default everywhere
    for mode in MODES:
        assert parser.parse_args([command, "--data", "x", "--out", "o", "--wandb", mode]).wandb == mode
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--data", "x", "--out", "o", "--wandb", "off"])
