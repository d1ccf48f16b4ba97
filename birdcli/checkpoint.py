"""Atomic save and safe load of the resumable training state.

`checkpoint/` holds `model.safetensors` (weights) and `state.pt` (optimizer, scheduler, scaler, RNG states, counters:
tensors and plain types only, loaded with `weights_only=True`). A checkpoint is written to a temporary folder and
swapped in with renames, so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from birdcli.errors import BirdsError


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temp folder next to `dst`; on success it replaces `dst` (the old one survives any crash)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():  # make the bytes durable before the rename makes them visible
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing(dst: Path) -> Path | None:
    """The folder, or the `.old` copy a crash between the two renames left behind."""
    dst = Path(dst)
    if dst.is_dir():
        return dst
    old = dst.with_name(f".{dst.name}.old")
    return old if old.is_dir() else None


def save(folder: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]) -> None:
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    found = existing(folder)
    if found is None:
        raise BirdsError(f"no checkpoint in {folder.parent}", "start a new run instead of --resume")
    try:
        weights = load_file(str(found / "model.safetensors"))
        state = torch.load(found / "state.pt", map_location="cpu", weights_only=True)
        meta = json.loads((found / "meta.json").read_text())
    except Exception as e:  # any corruption: say which file
        raise BirdsError(f"checkpoint in {found} is unreadable: {e}") from e
    return weights, state, meta
