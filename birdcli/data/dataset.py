"""Class index, image decoding and the torch Dataset every stage uses.

One preprocessing contract, shared by train, evaluate and predict: decode to uint8 RGB (C, H, W), resize to the
model's (H, W) with antialiasing (skipped when the image already has that size), then on the device
`(x / 255 - mean) / std` with the mean/std of the model's image processor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from birdcli.console import warn
from birdcli.data import layout
from birdcli.data.cache import DecodedCache
from birdcli.errors import BirdsError

MAX_PIXELS = 16_000 * 16_000  # more than this is a decompression bomb, not a photo


def class_names(root: Path) -> list[str]:
    """The class index: species folders of train/, sorted. birds.csv, when present, must agree."""
    names = layout.species_dirs(Path(root), "train")
    if not names:
        raise BirdsError(f"{root}/train has no species folders", f"fetch data first: birds data fetch --root {root}")
    try:
        rows = layout.read_csv(Path(root))
    except (ValueError, KeyError):
        rows = None
    if rows:
        in_csv = {r.label for r in rows if r.split == "train"}
        if in_csv and in_csv != set(names):
            diff = sorted(set(names) ^ in_csv)
            warn(f"birds.csv and train/ disagree on {len(diff)} species (e.g. {diff[0]!r}); using the folders")
    return names


def samples(root: Path, split: str, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) pairs; species the class index does not know are left out."""
    index = {name: i for i, name in enumerate(classes)}
    return [(p, index[s]) for p, s in layout.split_files(Path(root), split) if s in index]


def decode(path: str | Path) -> torch.Tensor:
    """Any image file -> uint8 RGB (3, H, W): torchvision's decoders, Pillow for what they cannot read."""
    path = str(path)
    with Image.open(path) as header:  # reads the header only: refuse bombs before allocating anything
        w, h = header.size
        fmt = header.format
        mode = header.mode
    if w * h > MAX_PIXELS:
        raise ValueError(f"image declares {w}x{h} pixels (decompression bomb?)")
    if fmt in ("JPEG", "PNG", "WEBP") and mode in ("RGB", "L", "RGBA", "LA", "P"):
        try:
            img = decode_image(path, mode=ImageReadMode.RGB, apply_exif_orientation=True)
            return img[0] if img.ndim == 4 else img
        except RuntimeError:
            pass  # fall back to Pillow
    with Image.open(path) as opened:
        opened.seek(0)  # first frame of animations
        im = ImageOps.exif_transpose(opened)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            im = im.point(lambda v: v / 256).convert("L")
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


class ResizeIfNeeded:
    """Resize to (H, W) with antialiasing; images that already have that size pass through untouched."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)
        self.resize = v2.Resize(self.size, antialias=True)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img if tuple(img.shape[-2:]) == self.size else self.resize(img)


def eval_transform(size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    return ResizeIfNeeded(size)


def train_transform(
    size: tuple[int, int],
    enabled: bool,
    crop_scale: Sequence[float] = (0.7, 1.0),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    rand_augment: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Augmentation on uint8 tensors (torchvision v2); without it, the eval transform."""
    if not enabled:
        return eval_transform(size)
    steps: list[Callable] = [v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(color_jitter, color_jitter, color_jitter))
    if rand_augment:
        steps.append(v2.RandAugment())
    return v2.Compose(steps)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W), on whatever device `images` is (the GPU on CUDA)."""
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    return images.float().mul_(1 / (255 * s)).sub_(m / s)  # one allocation, two in-place passes


class BirdImages(Dataset):
    """Decoded, resized uint8 images and labels. Keys are an index or (index, epoch).

    With an epoch in the key, the random augmentation of a sample is seeded by (seed, epoch, index), so it does not
    depend on which worker draws it: that is what makes mid-epoch resume exact.
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
        max_bad_in_row: int = 20,
        cache: DecodedCache | None = None,
    ) -> None:
        self.items = list(items)
        self.transform = transform
        self.seed = seed
        self.max_bad_in_row = max_bad_in_row
        self.cache = cache
        self._bad_in_row = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.items[index]
        cached = self.cache.get(index) if self.cache is not None else None
        try:
            img = cached if cached is not None else decode(path)
        except Exception as e:  # any decoder error: skip this file, loudly
            self._bad_in_row += 1
            if self._bad_in_row >= self.max_bad_in_row:
                raise BirdsError(
                    f"{self._bad_in_row} unreadable images in a row (last: {path})", "run `birds data check`"
                ) from e
            warn(f"skipping unreadable image {path}: {e}")
            return None
        self._bad_in_row = 0
        if self.cache is not None and cached is None:  # stored at the model's input size
            img = ResizeIfNeeded(self.cache.size)(img)
            self.cache.put(index, img)
        if isinstance(self.transform, ResizeIfNeeded):  # deterministic: no RNG to seed
            return self.transform(img), label, index
        with torch.random.fork_rng(devices=[]):  # CPU generator only (torch.manual_seed also seeds CUDA, slowly)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + index) % (2**63))
            img = self.transform(img)
        return img, label, index


def collate(
    batch: list[tuple[torch.Tensor, int, int] | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack a batch, leaving out the samples that could not be decoded."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), torch.empty(0)
    # torchvision decodes into channels-last memory, so stack the HWC views (contiguous copies) with NumPy: a
    # torch.stack of the CHW views is ~4x slower, and torch's threaded copies stall on a busy 2-core machine.
    # The batch is (B, 3, H, W) in channels_last memory format.
    images = torch.from_numpy(np.stack([b[0].permute(1, 2, 0).numpy() for b in good])).permute(0, 3, 1, 2)
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, labels, indices
