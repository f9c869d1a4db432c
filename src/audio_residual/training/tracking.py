"""Weights & Biases logging. One vocabulary for every command (`--wandb`) and function:

* `auto`: online when logged in (`wandb login` or WANDB_API_KEY), else disabled;
* `online`: log to the W&B server (and `sweep` launches a W&B sweep with agents);
* `offline`: log to local files, `wandb sync` later (a sweep runs its grid locally, each point logged offline);
* `disabled`: no W&B at all (tests, no account).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str | bool) -> str:
    """`mode` as one of online/offline/disabled: `auto` is online when logged in; True/False mean online/disabled."""
    if isinstance(mode, bool):
        return "online" if mode else "disabled"
    if mode not in MODES:
        raise ValueError(f"W&B mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "online" if wandb_available() else "disabled"
    return mode


def wandb_available() -> bool:
    """True when W&B can reach an account: an API key is configured and no offline mode is forced."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return False
    try:
        import wandb

        return bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:  # noqa: BLE001 — any failure to find credentials means: not logged in
        return False


class RunTracker:
    """Per-epoch metrics and λ histograms; a no-op when disabled, so training code never branches."""

    def __init__(
        self,
        mode: str = "disabled",
        project: str = "audio-residual",
        config: dict | None = None,
        wandb_dir: str | Path | None = None,  # W&B's files go to wandb_dir/wandb instead of ./wandb
        **init,
    ):
        mode = self.mode = resolve_mode(mode)
        self.run = None
        if mode != "disabled":
            import wandb

            if wandb_dir is not None:
                Path(wandb_dir).mkdir(parents=True, exist_ok=True)
                init["dir"] = str(wandb_dir)
            self.run = wandb.run or wandb.init(project=project, config=config, mode=mode, **init)

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_lambdas(self, residual, prefix: str = "") -> None:
        """One histogram of λ per unit group (which components were amplified, which suppressed)."""
        if self.run is None:
            return
        import wandb

        self.run.log(
            {f"{prefix}/lambda/{group}": wandb.Histogram(np.asarray(p.detach().cpu())) for group, p in residual.lambdas.items()}
        )

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
