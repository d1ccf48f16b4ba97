"""W&B when it is on, a null tracker when it is off: the training loop never branches on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from birdcli.console import warn


class NullTracker:
    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_model(self, folder: Path, name: str) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(self, run: Any, mode: str, log_model: bool) -> None:
        self.run = run
        self.mode = mode
        self.run_id = run.id
        self.log_model_enabled = log_model

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_model(self, folder: Path, name: str) -> None:
        if self.mode != "online" or not self.log_model_enabled:
            return
        import wandb

        art = wandb.Artifact(name, type="model")
        art.add_dir(str(folder))
        self.run.log_artifact(art, aliases=["best", "latest"])

    def summary(self, metrics: dict[str, Any]) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        self.run.finish()


def start(
    mode: str,
    project: str,
    entity: str | None,
    name: str,
    run_dir: Path,
    config: dict[str, Any],
    tags: list[str],
    run_id: str | None = None,
    log_model: bool = True,
) -> NullTracker | WandbTracker:
    """A W&B run (resumed when `run_id` is given), or a NullTracker when disabled or wandb is missing."""
    if mode == "disabled":
        return NullTracker()
    try:
        import wandb
    except ImportError:
        warn("wandb is not installed; tracking is off (pip install wandb)")
        return NullTracker()
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc_login()):
        warn("tracking.wandb.mode=online but no WANDB_API_KEY; logging offline instead (`wandb sync` later)")
        mode = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        dir=str(run_dir),
        config=config,
        tags=tags,
        mode=mode,  # type: ignore[arg-type]  # one of wandb's Literal modes, checked by the config
        id=run_id,
        resume="allow" if run_id else None,
        reinit="finish_previous",
    )
    return WandbTracker(run, mode, log_model)


def _has_netrc_login() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
