"""Shared fixtures: real files, tiny models, no network. Data from ../shared is used when present, else skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIRDS_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def copy_worktree(dest: Path) -> Path:
    """Copy what git would hold (tracked and new, not ignored files; links kept as links) into `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src, dst = REPO / rel, dest / rel
        if not (src.is_file() or src.is_symlink()):
            continue  # deleted in the working tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "train").is_dir():
        pytest.skip(f"{path} not present (../shared/data/{name})")
    return path


@pytest.fixture(scope="session")
def birds_mini() -> Path:
    return shared_dataset("birds-mini")


@pytest.fixture(scope="session")
def birds_485() -> Path:
    return shared_dataset("birds-485")


def run_birds(*args: str, cwd: Path | str | None = None, env: dict | None = None, timeout: float = 300):
    """Run the real CLI in a subprocess, as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "BIRDS_QUIET": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "birdcli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic dataset (6 species, 32 px), generated once per session."""
    from birdcli.data.fetch import fetch

    root = tmp_path_factory.mktemp("synthetic") / "raw"
    synth = {"num_classes": 6, "train_per_class": 16, "valid_per_class": 4, "test_per_class": 4, "image_size": 32}
    return fetch("synthetic", root, synthetic={**synth, "seed": 0})


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, synthetic_data) -> Path:
    """A run of the smoke experiment, trained for a few steps in this session (in-process, W&B off)."""
    from birdcli.config import load
    from birdcli.train import train

    runs = tmp_path_factory.mktemp("runs")
    cfg = load(
        "smoke",
        [
            f"data.root={synthetic_data}",
            f"runs_dir={runs}",
            "train.epochs=2",
            "data.num_workers=0",
            "tracking.wandb.mode=disabled",
        ],
    )
    return train(cfg, device="cpu", name="fixture")
