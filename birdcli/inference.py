"""Batched forward passes over a DataLoader of uint8 images: the one inference loop train, evaluate and profile use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from birdcli.data.dataset import BirdImages, collate, eval_transform, normalize
from birdcli.device import autocast


def loader_for(
    items: Sequence[tuple[Path, int]],
    size: tuple[int, int],
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    max_bad_in_row: int = 20,
) -> DataLoader:
    """A deterministic, unshuffled loader with the eval transform."""
    ds = BirdImages(items, eval_transform(size), max_bad_in_row=max_bad_in_row)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # never draw from the global RNG
    )


@torch.no_grad()
def logits_over(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype | None,
    mean: Sequence[float],
    std: Sequence[float],
    on_batch=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits float32 (N, C), labels (N,), dataset indices (N,)) over every decodable sample."""
    was_training = model.training
    model.eval()
    all_logits, all_labels, all_idx = [], [], []
    for images, labels, idx in batches:
        if len(labels):
            x = normalize(images.to(device, non_blocking=True), mean, std)
            with autocast(device, dtype):
                logits = model(pixel_values=x).logits
            all_logits.append(logits.float().cpu())
            all_labels.append(labels)
            all_idx.append(idx)
        if on_batch is not None:
            on_batch(len(labels))
    model.train(was_training)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_labels), torch.cat(all_idx)


def basic_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy averaged over samples (not over batches)."""
    n = len(labels)
    if n == 0:
        return {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "samples": 0}
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return {
        "loss": F.cross_entropy(logits, labels, reduction="sum").item() / n,
        "acc": (top[:, 0] == labels).float().sum().item() / n,
        "top5": (top == labels[:, None]).any(dim=1).float().sum().item() / n,
        "samples": n,
    }
