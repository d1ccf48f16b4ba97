"""`birds predict`: top-k species for image files, folders (recursively) and globs.

Bad files never stop the batch: each gets one line naming it and the reason, the rest are predicted.
The backend is a small seam: `load_predictor(model_dir, device)` returns an object with `.labels`, `.preprocess` and
`.predict(paths) -> list[Outcome]`; the torch one is imported lazily, so `import birdcli.predict` stays torch-free
and another backend (ONNX) only needs those three things.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from birdcli import images
from birdcli.console import err, out, progress
from birdcli.data.layout import IMAGE_EXTS
from birdcli.errors import UsageError
from birdcli.model import Preprocess

FORMATS = ("table", "json", "csv")


@dataclass
class Outcome:
    """One input file: class probabilities (C,) float32, or the reason it could not be used."""

    file: str
    probs: np.ndarray | None = None
    error: str | None = None


class Predictor(Protocol):
    labels: list[str]
    preprocess: Preprocess

    def predict(self, paths: Sequence[str]) -> list[Outcome]: ...


def load_predictor(
    model_dir: str | os.PathLike[str], device: str = "auto", precision: str = "auto", backend: str = "auto"
) -> Predictor:
    """The predictor for a model folder. `backend`: torch, onnx, or auto (onnx when the folder holds model.onnx)."""
    from birdcli.onnx_backend import OnnxPredictor, is_export

    if backend == "auto":
        backend = "onnx" if is_export(model_dir) else "torch"
    if backend == "onnx":  # an export folder (`birds export`): onnxruntime + NumPy + Pillow, no torch imported
        return OnnxPredictor(model_dir, device)
    if backend == "torch":
        return TorchPredictor(Path(model_dir), device, precision)
    raise UsageError(f"unknown backend '{backend}'", "use auto, torch or onnx")


class TorchPredictor:
    """A Hugging Face model folder on a torch device, preprocessing exactly as training evaluated it."""

    def __init__(self, model_dir: Path, device: str = "auto", precision: str = "auto") -> None:
        import warnings

        import torch
        from PIL import Image

        from birdcli import model as models
        from birdcli.data.dataset import eval_transform
        from birdcli.device import pick_device, pick_precision

        self.device = pick_device(device)
        self.dtype = pick_precision(precision, self.device)
        net, processor = models.load(model_dir)
        self.net = net.to(self.device)
        self.labels = models.labels_of(net)
        self.preprocess = models.preprocess_of(processor)
        self._transform = eval_transform(self.preprocess.size)
        self._torch = torch
        self._pool: Any = None
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # images.probe enforces our own limit

    def load(self, path: str) -> Any:
        """The uint8 (3, H, W) tensor the model sees before normalisation (raises ImageError)."""
        from birdcli.data.dataset import decode

        images.probe(path)  # clean reasons for missing/empty/non-image/bomb files before any decoder runs
        try:
            return self._transform(decode(path))
        except Exception as e:  # any decoder failure is a property of the file
            raise images.ImageError(images.reason(e)) from None

    def _try_load(self, path: str) -> Any:
        try:
            return self.load(path)
        except images.ImageError as e:
            return e

    def predict(self, paths: Sequence[str]) -> list[Outcome]:
        torch = self._torch
        from birdcli.data.dataset import normalize
        from birdcli.device import autocast

        if self._pool is None and len(paths) > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        loaded = list(self._pool.map(self._try_load, paths)) if self._pool else [self._try_load(p) for p in paths]
        pairs = zip(paths, loaded, strict=True)
        results = [Outcome(p, error=str(x) if isinstance(x, Exception) else None) for p, x in pairs]
        good = [i for i, x in enumerate(loaded) if not isinstance(x, Exception)]
        if good:
            batch = torch.stack([loaded[i] for i in good]).to(self.device)  # uint8 (B, 3, H, W)
            with torch.no_grad(), autocast(self.device, self.dtype):
                logits = self.net(pixel_values=normalize(batch, self.preprocess.mean, self.preprocess.std)).logits
            probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            for row, i in enumerate(good):
                results[i].probs = probs[row]
        return results


# ---------------------------------------------------------------- inputs


def collect(args: Sequence[str]) -> tuple[list[str], list[Outcome]]:
    """(image files in a deterministic order, failures for arguments that name nothing usable).

    A file is taken as given (whatever its extension); a folder contributes its image files recursively, sorted;
    a pattern is expanded with glob (`**` allowed). Duplicates are dropped, first occurrence wins.
    """
    files: list[str] = []
    failed: list[Outcome] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            files.append(path)

    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = _images_under(p)
            if not found:
                failed.append(Outcome(arg, error=f"folder has no images ({' '.join(sorted(IMAGE_EXTS))})"))
            for f in found:
                add(f)
        elif p.exists() or p.is_symlink():
            add(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            expanded = [f for m in matches for f in (_images_under(Path(m)) if Path(m).is_dir() else [m])]
            if not expanded:
                failed.append(Outcome(arg, error="no image matches this pattern"))
            for f in expanded:
                add(f)
        else:
            failed.append(Outcome(arg, error="no such file or folder"))
    return files, failed


def _images_under(folder: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS:
                found.append(os.path.normpath(os.path.join(dirpath, name)))  # "./a.jpg" -> "a.jpg"
    return found


def batched(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The k most likely species, highest first (ties: lower class index first)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [(labels[i], float(probs[i])) for i in order]


# ---------------------------------------------------------------- the stage


def predict(
    paths: Sequence[str],
    model: str | None = None,
    runs_dir: str = "runs",
    top: int = 5,
    fmt: str = "table",
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
    backend: str = "auto",
) -> tuple[int, int]:
    """Predict every image PATHS name and print the results; returns (predicted, failed)."""
    from birdcli.model import resolve

    if fmt not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}'", f"use one of {', '.join(FORMATS)}")
    if top < 1:
        raise UsageError(f"--top-k {top}: must be at least 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    files, failed = collect(paths)
    for f in failed:
        _report(f)
    if not files:
        return 0, len(failed)
    predictor = load_predictor(resolve(model, runs_dir), device, precision, backend)
    k = min(top, len(predictor.labels))

    try:
        done = _run(predictor, files, failed, _Writer(fmt, k), k, batch_size)
    except BrokenPipeError:  # `birds predict ... --json | head`: the reader has gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None  # 128 + SIGPIPE, as a shell reports it
    if failed:
        err.print(f"{done} predicted, {len(failed)} failed", highlight=False)
    return done, len(failed)


def _run(predictor: Predictor, files: list[str], failed: list[Outcome], writer: _Writer, k: int, batch: int) -> int:
    """Predict in batches, reporting failures as they happen; returns how many files were predicted."""
    for f in failed:
        writer.add(f, [])
    done = 0
    show = len(files) > batch and err.is_terminal  # elsewhere a bar would only leave blank lines behind
    bar: Any = progress(transient=True) if show else _NoBar()
    with bar:
        task = bar.add_task("predict", total=len(files))
        for chunk in batched(files, batch):
            for o in predictor.predict(chunk):
                if o.error is not None or o.probs is None:
                    failed.append(o)
                    _report(o)
                    writer.add(o, [])
                else:
                    done += 1
                    writer.add(o, top_k(o.probs, predictor.labels, k))
            bar.advance(task, len(chunk))
    writer.close()
    return done


class _NoBar:
    """What `progress()` offers, doing nothing."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def advance(self, task: int, n: float = 1) -> None:
        pass


def _report(o: Outcome) -> None:
    from rich.markup import escape

    line = f"[red]failed:[/] {escape(o.file)}: {escape(o.error or 'unknown error')}"
    err.print(line, highlight=False, soft_wrap=True)


class _Writer:
    """Prints results as they come (json lines, csv) or as one table at the end."""

    def __init__(self, fmt: str, k: int) -> None:
        self.fmt, self.k = fmt, k
        self.rows: list[tuple[str, list[tuple[str, float]]]] = []
        if fmt == "csv":
            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            self.csv.writerow(["file", "rank", "species", "probability", "error"])

    def add(self, o: Outcome, preds: list[tuple[str, float]]) -> None:
        if self.fmt == "json":
            obj: dict[str, Any] = {"file": o.file}
            if o.error is not None:
                obj["error"] = o.error
            else:
                obj["predictions"] = [{"species": s, "probability": round(p, 6)} for s, p in preds]
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        elif self.fmt == "csv":
            if o.error is not None:
                self.csv.writerow([o.file, "", "", "", o.error])
            for rank, (s, p) in enumerate(preds, start=1):
                self.csv.writerow([o.file, rank, s, f"{p:.6f}", ""])
            sys.stdout.flush()
        elif o.error is None:
            self.rows.append((o.file, preds))

    def close(self) -> None:
        if self.fmt != "table" or not self.rows:
            return
        from rich.table import Table
        from rich.text import Text

        table = Table(show_edge=False, header_style="bold")
        table.add_column("file", overflow="fold")
        table.add_column("species")
        table.add_column("prob", justify="right")
        if self.k > 1:
            table.add_column(f"next {self.k - 1}", overflow="fold")
        for file, preds in self.rows:
            (s, p), rest = preds[0], preds[1:]
            cells: list[Text | str] = [Text(file), Text(s), f"{p:.3f}"]
            if self.k > 1:
                cells.append(Text(", ".join(f"{name} {q:.3f}" for name, q in rest)))
            table.add_row(*cells)
        out.print(table)
