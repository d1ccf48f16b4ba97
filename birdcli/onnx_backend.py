"""Predict from an ONNX export folder with onnxruntime, NumPy and Pillow only: no torch, torchvision or transformers.

An export folder (`birds export`) holds model.onnx, labels.json and preprocess.json (plus the Hugging Face
config.json / preprocessor_config.json they were derived from). Preprocessing is the same contract as the torch path
(`birdcli.data.dataset`): decode to RGB with EXIF orientation applied, resize to (H, W) with antialiased bilinear
only when the size differs, `(x / 255 - mean) / std`, NCHW float32. Everything heavy is imported here, lazily, so a
consumer needs only `pip install birdcli[onnx]`-level packages: onnxruntime, numpy, pillow (plus typer and rich for
the CLI).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from birdcli import images
from birdcli.errors import BirdsError
from birdcli.model import Preprocess

MODEL_FILE = "model.onnx"
INSTALL_HINT = "install onnxruntime: pip install 'birdcli[onnx]' (or just onnxruntime)"


def is_export(folder: str | os.PathLike[str]) -> bool:
    """An ONNX export folder: it holds model.onnx."""
    return (Path(folder) / MODEL_FILE).is_file()


def session(path: str | os.PathLike[str], threads: int | None = None, device: str = "cpu") -> Any:
    """An onnxruntime InferenceSession (CUDA provider when asked for and present, else CPU)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BirdsError("onnxruntime is not installed", INSTALL_HINT) from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no "removing initializer" chatter
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") or device == "auto":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device.startswith("cuda"):
            raise BirdsError(f"--device {device}: this onnxruntime has no CUDA provider", "pip install onnxruntime-gpu")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise BirdsError(f"cannot load {path}: {str(e).strip().splitlines()[0]}") from e


def read_export(folder: str | os.PathLike[str]) -> tuple[list[str], Preprocess]:
    """(labels, preprocessing) of an export folder: labels.json + preprocess.json, else the HF config files."""
    folder = Path(folder)
    try:
        if (folder / "labels.json").is_file() and (folder / "preprocess.json").is_file():
            labels = json.loads((folder / "labels.json").read_text())
            p = json.loads((folder / "preprocess.json").read_text())
            return list(labels), Preprocess(int(p["height"]), int(p["width"]), tuple(p["mean"]), tuple(p["std"]))
        config = json.loads((folder / "config.json").read_text())
        proc = json.loads((folder / "preprocessor_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BirdsError(
            f"{folder} has no readable labels.json/preprocess.json or config.json/preprocessor_config.json ({e})",
            "export the model again with `birds export`",
        ) from e
    id2label = {int(k): v for k, v in config["id2label"].items()}
    labels = [id2label[i] for i in range(len(id2label))]
    size = proc.get("crop_size") or proc["size"]
    h, w = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    mean = tuple(proc.get("image_mean") or (0.5, 0.5, 0.5))
    std = tuple(proc.get("image_std") or (0.5, 0.5, 0.5))
    return labels, Preprocess(int(h), int(w), mean, std)  # type: ignore[arg-type]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class OnnxPredictor:
    """The `birdcli.predict` backend seam (`.labels`, `.preprocess`, `.predict(paths)`) over an export folder."""

    def __init__(self, folder: str | os.PathLike[str], device: str = "cpu", threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.labels, self.preprocess = read_export(self.folder)
        self.session = session(self.folder / MODEL_FILE, threads, device)
        self.input = self.session.get_inputs()[0].name
        self._pool: Any = None

    def load(self, path: str) -> np.ndarray:
        """uint8 (H, W, 3) at the model's size, before normalisation (raises images.ImageError)."""
        return images.resize(images.load_rgb(path), self.preprocess.size)

    def _try_load(self, path: str) -> np.ndarray | Exception:
        try:
            return self.load(path)
        except images.ImageError as e:
            return e

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, 3, H, W) normalised pixels -> float32 (B, C) logits."""
        return self.session.run(None, {self.input: batch})[0]

    def _load_all(self, paths: Sequence[str]) -> list[np.ndarray | Exception]:
        if self._pool is None and len(paths) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # Pillow decodes without the GIL
        return list(self._pool.map(self._try_load, paths)) if self._pool else [self._try_load(p) for p in paths]

    def _run(self, loaded: list[np.ndarray | Exception]) -> tuple[np.ndarray, list[int]]:
        good = [i for i, x in enumerate(loaded) if not isinstance(x, Exception)]
        if not good:
            return np.zeros((0, len(self.labels)), np.float32), good
        batch = np.stack([loaded[i] for i in good])  # uint8 (B, H, W, 3)
        x = images.normalize(batch, self.preprocess.mean, self.preprocess.std)  # float32 (B, 3, H, W)
        return self.logits(x), good

    def logits_of(self, paths: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        """(float32 (B, C) logits of the readable files, their positions in `paths`); unreadable ones are left out."""
        return self._run(self._load_all(paths))

    def predict(self, paths: Sequence[str]) -> list[Any]:
        """One `birdcli.predict.Outcome` per path, in order: probabilities (C,), or the reason the file failed."""
        from birdcli.predict import Outcome

        loaded = self._load_all(paths)
        results = [
            Outcome(p, error=str(x) if isinstance(x, Exception) else None) for p, x in zip(paths, loaded, strict=True)
        ]
        logits, good = self._run(loaded)
        for row, i in enumerate(good):
            results[i].probs = softmax(logits[row])
        return results
