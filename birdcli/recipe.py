"""The pieces of an experiment that `birds train` and `birds profile` build the same way from the config:
its dataset (fetched when allowed), training Dataset, model, optimizer and number of DataLoader workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from birdcli import model as models
from birdcli.data import layout
from birdcli.data.cache import DecodedCache
from birdcli.data.dataset import BirdImages, train_transform
from birdcli.errors import BirdsError


def ensure_data(data: DictConfig, root: Path, fetch_here: bool = True) -> None:
    """The dataset must be there; the synthetic one is generated when `data.auto_fetch` allows it."""
    if layout.looks_complete(root):
        return
    if data.auto_fetch and data.source == "synthetic":
        if fetch_here:
            from birdcli.data.fetch import fetch

            fetch("synthetic", root, synthetic=OmegaConf.to_container(data.synthetic))  # type: ignore[arg-type]
        return
    raise BirdsError(
        f"no dataset at {root}",
        f"get one with: birds data fetch --root {root} --source kaggle (or --source synthetic, --source dir --path ..)",
    )


def train_dataset(cfg: DictConfig, items: list[tuple[Path, int]], size: tuple[int, int]) -> BirdImages:
    """The training Dataset: augmentation from `augment`, per-sample seeds from `train.seed`, optional decoded cache."""
    aug, data = cfg.augment, cfg.data
    cache = DecodedCache(Path(data.cache_dir), [p for p, _ in items], size) if data.cache else None
    return BirdImages(
        items,
        train_transform(size, aug.enabled, aug.crop_scale, aug.hflip, aug.color_jitter, aug.rand_augment),
        seed=cfg.train.seed,
        max_bad_in_row=data.max_bad_in_row,
        cache=cache,
    )


def build_model(m: DictConfig, labels: list[str]) -> tuple[Any, Any]:
    """(model, image processor) from the `model` section."""
    return models.build(
        m.name_or_path,
        labels,
        m.pretrained,
        OmegaConf.to_container(m.architecture),  # type: ignore[arg-type]
        m.attn_implementation,
        m.image_size,
        m.image_mean,
        m.image_std,
    )


def num_workers(requested: int, processes_per_node: int = 1) -> int:
    """-1: chosen from the cores, leaving one per process for compute."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = min(8, cores // processes_per_node - 1)
    return spare if spare >= 2 else 0  # one worker on a 2-core machine only fights the compute threads


def optimizer(net: torch.nn.Module, oc: DictConfig) -> torch.optim.Optimizer:
    """The configured optimizer; no weight decay on biases and norm weights (1-d parameters)."""
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if oc.name == "sgd":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=oc.nesterov)
    return torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas))
