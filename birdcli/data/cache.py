"""An optional memory-mapped cache of decoded, resized uint8 images (`data.cache=true`).

The first epoch decodes each JPEG once and stores it at the model's input size; later epochs (and every DataLoader
worker, through the shared page cache) read raw pixels instead of decoding again. The file name hashes the file
list, sizes, modification times and the image size, so a changed dataset never meets a stale cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


class DecodedCache:
    def __init__(self, folder: Path, files: Sequence[Path], size: tuple[int, int]) -> None:
        h = hashlib.sha256(f"{size}".encode())
        for f in files:
            st = Path(f).stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        key = h.hexdigest()[:20]
        folder.mkdir(parents=True, exist_ok=True)
        self.pixels_path = folder / f"{key}-{size[0]}x{size[1]}.u8.npy"
        self.done_path = folder / f"{key}-{size[0]}x{size[1]}.done.npy"
        self.size: tuple[int, int] = (size[0], size[1])
        n = len(files)
        if not (self.pixels_path.exists() and self.done_path.exists()):
            np.lib.format.open_memmap(self.pixels_path, mode="w+", dtype=np.uint8, shape=(n, size[0], size[1], 3))
            np.lib.format.open_memmap(self.done_path, mode="w+", dtype=np.uint8, shape=(n,))
        self._pixels: np.memmap | None = None
        self._done: np.memmap | None = None

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._pixels is None or self._done is None:  # lazily, in each worker process
            self._pixels = np.load(self.pixels_path, mmap_mode="r+")
            self._done = np.load(self.done_path, mmap_mode="r+")
        return self._pixels, self._done

    def get(self, index: int) -> torch.Tensor | None:
        pixels, done = self._open()
        if not done[index]:
            return None
        return torch.from_numpy(np.array(pixels[index])).permute(2, 0, 1)  # (3, H, W), channels-last memory

    def put(self, index: int, image: torch.Tensor) -> None:
        pixels, done = self._open()
        pixels[index] = image.permute(1, 2, 0).numpy()
        done[index] = 1  # after the pixels: a reader never sees a half-written row marked done

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None, "_done": None}

    @property
    def filled(self) -> int:
        return int(self._open()[1].sum())
