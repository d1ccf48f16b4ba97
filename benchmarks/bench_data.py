"""Input pipeline throughput: birdcli's loader vs the seed project's (PIL + a HF image processor per image).

    python benchmarks/bench_data.py [--data ../shared/data/birds-485] [--workers 0 2] [--epochs 2]

Both read the same real JPEGs (birds-485 train split), batch 32, and produce a normalised float batch ready for the
model. Numbers are images/s measured in this run; the ratio is what counts (same machine, same files).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from birdcli.data.cache import DecodedCache
from birdcli.data.dataset import BirdImages, class_names, collate, eval_transform, normalize, samples

MEAN = STD = (0.5, 0.5, 0.5)


class SeedDataset(Dataset):
    """The seed project's approach: PIL open + a Hugging Face ViT image processor called per image."""

    def __init__(self, items, processor):
        self.items, self.processor = items, processor

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        image = Image.open(path).convert("RGB")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels, label


def run(loader, birdcli: bool, epochs: int) -> float:
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x = normalize(batch[0], MEAN, STD) if birdcli else batch[0]
            n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "birds-485"))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit", type=int, default=1000, help="images per epoch")
    args = ap.parse_args()
    from transformers import ViTImageProcessorPil

    root = Path(args.data)
    items = samples(root, "train", class_names(root))[: args.limit]
    processor = ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=MEAN, image_std=STD)
    print(f"{len(items)} real JPEGs from {root}, batch 32, {args.epochs} epoch(s), threads {torch.get_num_threads()}")
    cache = DecodedCache(Path(tempfile.mkdtemp()), [p for p, _ in items], (224, 224))
    print(f"{'workers':>8} {'seed (PIL + ViTImageProcessorPil)':>34} {'birdcli':>10} {'speed-up':>9} "
          f"{'birdcli, data.cache=true (epoch 2+)':>36} {'speed-up':>9}")  # fmt: skip
    for w in args.workers:
        kw = {"batch_size": 32, "num_workers": w, "persistent_workers": w > 0}
        seed = DataLoader(SeedDataset(items, processor), **kw)
        ours = DataLoader(BirdImages(items, eval_transform((224, 224))), collate_fn=collate, **kw)
        cached = DataLoader(BirdImages(items, eval_transform((224, 224)), cache=cache), collate_fn=collate, **kw)
        run(ours, True, 1)  # warm the page cache for both, and fill the decoded cache (its "first epoch")
        run(cached, True, 1)
        a = run(seed, False, args.epochs)
        b = run(ours, True, args.epochs)
        c = run(cached, True, args.epochs)
        print(f"{w:>8} {a:>30.0f} img/s {b:>6.0f} img/s {b / a:>8.1f}x {c:>30.0f} img/s {c / a:>8.1f}x")


if __name__ == "__main__":
    main()
