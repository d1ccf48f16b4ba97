"""What the service remembers about its inputs: compact per-request summaries, never the image unless asked.

A summary is a handful of image statistics (size, brightness, contrast, saturation, channel means, sharpness), the
predicted species and, where cheap, the model's embedding of the image. `birds drift` computes the very same numbers
for a folder of images (`summarize`, `Embedder`), so a store and a folder compare like for like.

The store is JSON lines (one object per request, human-readable, `jq`-able) rotated by size like a log file:
`requests.jsonl`, then `requests.jsonl.1` ... `.N`, oldest dropped. Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from birdcli import images

# The image statistics `birds drift` compares, in report order. Pixel statistics are in [0, 1].
FEATURES = ("width", "height", "aspect", "brightness", "contrast", "saturation", "red", "green", "blue", "sharpness")
STATS_SIDE = 256  # statistics are taken on at most 256 x 256 pixels: cheap, and stable across photo sizes
STORE_NAME = "requests.jsonl"
_ROTATED = re.compile(r".*\.jsonl(\.\d+)?$")


# ---------------------------------------------------------------- image statistics


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """Pixel statistics of a uint8 (H, W, 3) image, taken on a copy scaled down to at most STATS_SIDE pixels a side."""
    h, w = rgb.shape[:2]
    scale = STATS_SIDE / max(h, w)
    if scale < 1:
        rgb = images.resize(rgb, (max(1, round(h * scale)), max(1, round(w * scale))))
    x = rgb.astype(np.float32) / 255  # (h, w, 3)
    luma = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (h, w), ITU-R BT.601
    hi, lo = x.max(axis=2), x.min(axis=2)
    saturation = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)  # HSV saturation per pixel
    lap = np.abs(4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:])
    means = x.reshape(-1, 3).mean(axis=0)
    return {
        "brightness": float(luma.mean()),
        "contrast": float(luma.std()),
        "saturation": float(saturation.mean()),
        "red": float(means[0]),
        "green": float(means[1]),
        "blue": float(means[2]),
        "sharpness": float(lap.mean()) if lap.size else 0.0,
    }


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Header facts and statistics of one image file (raises images.ImageError with the reason it is unusable)."""
    header = images.probe(path)
    rgb = images.load_rgb(path)  # fully decoded: a truncated file fails here, before the model sees it
    return {
        "format": header.format,
        "mode": header.mode,
        "bytes": Path(path).stat().st_size,
        "width": header.width,
        "height": header.height,
        "aspect": round(header.width / header.height, 4),
        **{k: round(v, 5) for k, v in image_stats(rgb).items()},
    }


# ---------------------------------------------------------------- the model's view of an image


class Embedder:
    """Per-image vectors from a predictor's forward pass, for the embedding-distance drift test.

    A torch predictor gives its pooled embedding (the classifier head's input, captured by a forward pre-hook, so no
    second forward pass); a backend without one (an ONNX export outputs logits only) gives its class probabilities,
    the "black-box shift detection" signal of Lipton et al. (2018). `kind` says which, and drift only compares
    like with like. Not thread-safe by itself: call it from the one thread that runs the model.
    """

    def __init__(self, predictor: Any) -> None:
        self._last: np.ndarray | None = None
        head = getattr(getattr(predictor, "net", None), "classifier", None)
        if head is not None and hasattr(head, "register_forward_pre_hook"):
            head.register_forward_pre_hook(self._hook)
            self.kind = "pooled"
        else:
            self.kind = "probs"

    def _hook(self, module: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().float()
        self._last = x.reshape(x.shape[0], -1).cpu().numpy()  # (B_good, D): the images that decoded, in order

    def rows(self, outcomes: Sequence[Any]) -> list[np.ndarray | None]:
        """One vector per outcome of the predict() call that just ran (None for the ones that failed)."""
        last, self._last = self._last, None
        good = iter(range(len(outcomes)))
        vectors: list[np.ndarray | None] = []
        for o in outcomes:
            if o.probs is None:
                vectors.append(None)
            elif self.kind == "probs":
                vectors.append(np.asarray(o.probs, dtype=np.float32))
            else:
                row = next(good)
                vectors.append(last[row] if last is not None and row < len(last) else None)
        return vectors


def encode_vector(v: np.ndarray) -> str:
    """float32 (D,) -> base64 of little-endian float16: 2 bytes a dimension, plenty for a distance test."""
    return base64.b64encode(np.asarray(v, dtype="<f2").tobytes()).decode("ascii")


def decode_vector(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<f2").astype(np.float32)


# ---------------------------------------------------------------- the store


class Store:
    """Append-only JSON lines, rotated by size (`requests.jsonl` -> `.1` -> ... -> `.backups`, oldest dropped).

    Thread-safe within a process. With several server processes each writes its own file (`name` carries the pid),
    so no two processes ever rotate the same file.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        max_bytes: int = 50 * 2**20,
        backups: int = 5,
        save_images: bool = False,
        name: str = STORE_NAME,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / name
        self.max_bytes, self.backups, self.save_images = max(1024, int(max_bytes)), max(0, backups), save_images
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held open for the server's lifetime)
        self._size = self.path.stat().st_size

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        with self._lock:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self._size += len(data)

    def _rotate(self) -> None:
        self._file.close()
        for i in range(self.backups, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._size = 0

    def keep_image(self, data: bytes, suffix: str) -> str:
        """Save an uploaded image (only when the server was started with --monitor-images); returns its name."""
        digest = hashlib.sha256(data).hexdigest()[:16]
        folder = self.folder / "images"
        folder.mkdir(exist_ok=True)
        ext = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix) else ""
        name = digest + ext
        if not (folder / name).exists():
            (folder / name).write_bytes(data)
        return f"images/{name}"

    def close(self) -> None:
        with self._lock:
            self._file.close()


def now() -> str:
    """UTC timestamp with milliseconds, sortable as text."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_store(path: str | os.PathLike[str]) -> bool:
    """A store file (`*.jsonl`, `*.jsonl.N`) or a folder holding some."""
    p = Path(path)
    if p.is_file():
        return bool(_ROTATED.fullmatch(p.name))
    return p.is_dir() and any(_ROTATED.fullmatch(f.name) for f in p.iterdir() if f.is_file())


def store_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files of a store, oldest first: a folder's `*.jsonl*`, or a file plus its rotated siblings (`.1`, ...)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and _ROTATED.fullmatch(f.name)]
    else:
        files = [p, *(f for f in p.parent.glob(f"{p.name}.*") if f.suffix[1:].isdigit())]

    def age(f: Path) -> tuple[str, int]:  # requests.jsonl.3 is older than .1, which is older than requests.jsonl
        base, _, n = f.name.partition(".jsonl")
        return base, -int(n[1:]) if n[1:].isdigit() else 0

    return sorted(files, key=age)


def read_store(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """(records oldest first, lines that were not valid JSON objects: e.g. one cut short by a crash)."""
    records: list[dict[str, Any]] = []
    bad = 0
    for f in store_files(path):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(rec, dict):
                    records.append(rec)
                else:
                    bad += 1
    records.sort(key=lambda r: str(r.get("ts", "")))
    return records, bad


def elapsed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
