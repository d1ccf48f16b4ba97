"""`birds export`: a model folder -> a verified ONNX folder that predicts without PyTorch.

load the HF model -> torch.onnx.export (dynamic batch, one file) -> optional int8 dynamic quantization ->
labels.json, preprocess.json and the HF config files beside it -> verification on real images (top-1 agreement and
max |logit diff| vs PyTorch, accuracy where labels are known, plus the torch-free Pillow pipeline end to end) ->
latency/throughput table -> export.json. The folder is published only when verification passes.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birdcli import __version__
from birdcli import model as models
from birdcli.console import info, out, warn
from birdcli.data import layout
from birdcli.errors import BirdsError, UsageError
from birdcli.onnx_backend import MODEL_FILE, OnnxPredictor, session, softmax

FORMATS = ("onnx",)
QUANTIZE = ("none", "int8")
DEFAULT_MIN_AGREEMENT = {"none": 1.0, "int8": 0.9}
LARGE_BYTES = 1_800_000_000  # protobuf's 2 GiB limit: above this the weights go to a side file


def export(
    model: str | None = None,
    fmt: str = "onnx",
    quantize: str = "none",
    opset: int = 18,
    out_dir: Path | None = None,
    check_images: Sequence[str] | None = None,
    min_agreement: float | None = None,
    max_check_images: int = 256,
    bench: bool = True,
    batch_sizes: Sequence[int] = (1, 32),
    runs_dir: str = "runs",
) -> dict[str, Any]:
    """Export, verify and benchmark; returns the report written to <out>/export.json."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'", f"use one of: {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"unknown --quantize '{quantize}'", f"use one of: {', '.join(QUANTIZE)}")
    if not 14 <= opset <= 23:
        raise UsageError(f"--opset {opset}: use 14 to 23 (18 is the default)")
    threshold = DEFAULT_MIN_AGREEMENT[quantize] if min_agreement is None else min_agreement
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--min-agreement {threshold}: must be between 0 and 1")

    # ---- the model and the images to verify on
    model_dir = models.resolve(model, runs_dir)
    net, processor = models.load(model_dir)
    labels, prep = models.labels_of(net), models.preprocess_of(processor)
    items, source = _check_items(model_dir, check_images, labels, max_check_images)
    out_dir = Path(out_dir) if out_dir else _default_out(model_dir, quantize)
    info(f"exporting {model_dir} ({len(labels)} species, {prep.height}x{prep.width}) -> {out_dir}")

    from birdcli.checkpoint import atomic_dir

    with tempfile.TemporaryDirectory(prefix="birds-export-") as scratch, atomic_dir(out_dir) as tmp:
        # ---- ONNX: fp32 graph, then (optionally) int8 weights
        fp32_path = Path(scratch) / MODEL_FILE
        exporter = _to_onnx(net, prep.size, fp32_path, opset)
        final = tmp / MODEL_FILE
        if quantize == "int8":
            _quantize_int8(fp32_path, final, Path(scratch))
        else:
            _move_onnx(fp32_path, final)
            fp32_path = final
        _write_metadata(model_dir, tmp, labels, prep)

        # ---- verification on real images: same inputs through PyTorch and ONNX Runtime
        x, y = _inputs(items, prep)  # float32 (N, 3, H, W), int64 (N,) with -1 for unknown
        ref = _torch_logits(net, x)
        check: dict[str, Any] = {"images": len(items), "source": source, "pytorch": _scores(ref, ref, y)}
        check["onnx_fp32"] = _scores(_ort_logits(fp32_path, x), ref, y)
        if quantize == "int8":
            check["onnx_int8"] = _scores(_ort_logits(final, x), ref, y)
        key = "onnx_int8" if quantize == "int8" else "onnx_fp32"
        # ---- and the torch-free consumer path (Pillow decode + NumPy preprocessing) end to end
        predictor = OnnxPredictor(tmp)
        outcomes = predictor.predict([str(p) for p, _ in items])
        ok = np.array([o.probs is not None for o in outcomes])
        probs = np.stack([o.probs for o in outcomes if o.probs is not None])
        check["consumer_pipeline"] = {
            "images": int(ok.sum()),
            "agreement": float((probs.argmax(1) == ref[ok].argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(probs - softmax(ref[ok])).max()),
        }
        agreement = check[key]["agreement"]
        passed = agreement >= threshold
        _print_check(check, threshold)

        # ---- latency and throughput
        rows = (
            _benchmark(net, fp32_path, final if quantize == "int8" else None, prep.size, batch_sizes)
            if (bench and passed)
            else []
        )
        if rows:
            _print_bench(rows)

        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        report: dict[str, Any] = {
            "format": fmt,
            "model": str(model_dir),
            "exporter": exporter,
            "opset": opset,
            "quantize": quantize,
            "input": {"name": "pixel_values", "shape": ["batch", 3, prep.height, prep.width], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", len(labels)]},
            "size_bytes": files[MODEL_FILE],
            "fp32_size_bytes": fp32_path.stat().st_size,
            "min_agreement": threshold,
            "passed": passed,
            "check": check,
            "benchmark": rows,
            "versions": _versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        if not passed:
            raise BirdsError(
                f"export failed verification: top-1 agreement {agreement:.2%} < {threshold:.2%} "
                f"(max |logit diff| {check[key]['max_abs_logit_diff']:.3g}); nothing written to {out_dir}",
                "lower --min-agreement for int8, or try another --opset",
            )
    size = report["size_bytes"]
    extra = f" ({size / report['fp32_size_bytes']:.0%} of fp32)" if quantize == "int8" else ""
    info(f"[green]exported[/]: {out_dir / MODEL_FILE} {size / 1e6:.2f} MB{extra}, verified on {len(items)} images")
    info(f"predict without torch: birds predict IMAGE --model {out_dir}")
    report["out"] = str(out_dir)
    return report


# ---------------------------------------------------------------- export


def _to_onnx(net: torch.nn.Module, size: tuple[int, int], path: Path, opset: int) -> str:
    """Write `net` as ONNX with a dynamic batch axis; returns which exporter did it.

    torch.export-based ("dynamo", needs onnxscript) first, the TorchScript exporter when that fails.
    """

    class Logits(torch.nn.Module):  # (B, 3, H, W) pixel_values -> (B, C) logits, no ModelOutput wrapper
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).logits

    wrapped = Logits(net).eval()
    example = (torch.randn(2, 3, *size),)
    big = sum(p.numel() * p.element_size() for p in net.parameters()) > LARGE_BYTES
    names = {"input_names": ["pixel_values"], "output_names": ["logits"], "opset_version": opset}
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency)

        torch.onnx.export(
            wrapped,
            example,
            str(path),
            dynamo=True,
            external_data=big,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=65536)}},
            verbose=False,
            **names,
        )
        return "dynamo"
    except Exception as e:  # exporter failures come in many types; the fallback below is the answer to all
        warn(f"torch.export-based ONNX export failed ({_first_line(e)}); using the TorchScript exporter")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks that are constant for a fixed size
        torch.onnx.export(
            wrapped,
            example,
            str(path),
            dynamo=False,
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            **names,
        )
    return "torchscript"


def _move_onnx(src: Path, dst: Path) -> None:
    shutil.move(str(src), dst)
    side = src.with_name(src.name + ".data")
    if side.exists():
        shutil.move(str(side), dst.with_name(dst.name + ".data"))


def _quantize_int8(fp32: Path, dst: Path, scratch: Path) -> None:
    """ONNX Runtime dynamic quantization: int8 weights, activations quantized per batch at run time."""
    import logging

    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the tool logs a pre-processing hint on the root logger
    try:
        prepped = scratch / "model.pre.onnx"
        try:
            quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        except Exception as e:  # pre-processing is an optimisation: quantize the plain graph if it fails
            warn(f"quantization pre-processing skipped: {_first_line(e)}")
            prepped = fp32
        quantize_dynamic(str(prepped), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def _write_metadata(model_dir: Path, folder: Path, labels: list[str], prep: models.Preprocess) -> None:
    """What a consumer needs beside the graph: labels, preprocessing, and the HF files they came from."""
    for name in ("config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, folder / name)
    (folder / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False) + "\n")
    preprocess = {
        "input": "pixel_values",
        "output": "logits",
        "height": prep.height,
        "width": prep.width,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "steps": [
            "decode to RGB, EXIF orientation applied, first frame",
            "resize to (height, width), bilinear with antialiasing, only when the size differs",
            "x / 255, then (x - mean) / std per channel",
            "layout NCHW float32",
        ],
    }
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")


# ---------------------------------------------------------------- verification


def _check_items(
    model_dir: Path, check_images: Sequence[str] | None, labels: list[str], limit: int
) -> tuple[list[tuple[Path, int]], str]:
    """(path, class index or -1) to verify on: --check-images, else the validation split of the model's run."""
    if check_images:
        files = _expand(check_images)
        if not files:
            raise UsageError("--check-images names no image files")
        return [(f, -1) for f in _spread(files, limit)], f"{len(files)} file(s) from --check-images"
    config = model_dir.parent / "config.yaml"
    if not config.is_file():
        raise BirdsError(
            f"no images to verify the export on: {model_dir} is not in a run folder with a config.yaml",
            "pass --check-images FILE_OR_FOLDER ...",
        )
    from omegaconf import OmegaConf

    root = Path(str(OmegaConf.load(config).data.root))
    if not root.is_dir():
        raise BirdsError(
            f"no images to verify the export on: the run's data root {root} is not here",
            "run from the folder the model was trained in, or pass --check-images FILE_OR_FOLDER ...",
        )
    index = {name: i for i, name in enumerate(labels)}
    for split in ("valid", "test"):
        found = [(p, index.get(s, -1)) for p, s in layout.split_files(root, split)]
        if found:
            return _spread(found, limit), f"{split} split of {root} ({len(found)} images)"
    raise BirdsError(f"no validation images in {root} (valid/ or test/)", "pass --check-images FILE_OR_FOLDER ...")


def _expand(args: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for arg in args:
        matches = [Path(m) for m in sorted(glob.glob(arg, recursive=True))] if glob.has_magic(arg) else [Path(arg)]
        for m in matches:
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.suffix.lower() in layout.IMAGE_EXTS and p.is_file())
            elif m.is_file():
                files.append(m)
            else:
                raise UsageError(f"--check-images {arg}: no such file or folder")
    return files


def _spread(items: list, limit: int) -> list:
    """At most `limit` items spread evenly over the list (so every class of a sorted split is seen)."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[math.floor(i * step)] for i in range(limit)]


def _inputs(items: list[tuple[Path, int]], prep: models.Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch path's preprocessing (torchvision decode + resize, normalize): the reference model inputs."""
    from birdcli.data.dataset import decode, eval_transform, normalize

    resize = eval_transform(prep.size)
    batch = []
    for path, _ in items:
        try:
            batch.append(resize(decode(path)))
        except Exception as e:  # a broken check image is a problem with the check set, named as such
            raise BirdsError(f"cannot read check image {path}: {_first_line(e)}") from e
    x = normalize(torch.stack(batch), prep.mean, prep.std).numpy().astype(np.float32)
    return x, np.array([label for _, label in items], dtype=np.int64)


@torch.no_grad()
def _torch_logits(net: torch.nn.Module, x: np.ndarray, batch: int = 32) -> np.ndarray:
    net.eval()
    parts = [net(pixel_values=torch.from_numpy(x[i : i + batch])).logits for i in range(0, len(x), batch)]
    return torch.cat(parts).float().numpy()


def _ort_logits(path: Path, x: np.ndarray, batch: int = 32) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def _scores(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement and max |logit diff| vs the reference; accuracy over the images with a known label."""
    known = labels >= 0
    return {
        "agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(logits - ref).max()),
        "accuracy": float((logits.argmax(1)[known] == labels[known]).mean()) if known.any() else None,
    }


def _print_check(check: dict[str, Any], threshold: float) -> None:
    from rich.table import Table

    t = Table(title=f"verification on {check['images']} images: {check['source']}")
    for col in ("model", "top-1 agreement", "max |logit diff|", "accuracy"):
        t.add_column(col, justify="left" if col == "model" else "right")
    names = {"pytorch": "PyTorch fp32 (reference)", "onnx_fp32": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}
    for key, name in names.items():
        if key in check:
            s = check[key]
            acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.2%}"
            t.add_row(name, f"{s['agreement']:.2%}", f"{s['max_abs_logit_diff']:.3g}", acc)
    c = check["consumer_pipeline"]
    t.add_row(
        "export folder, Pillow preprocessing", f"{c['agreement']:.2%}", f"(probs {c['max_abs_prob_diff']:.3g})", ""
    )
    out.print(t)
    out.print(f"required top-1 agreement: {threshold:.2%}", highlight=False)


# ---------------------------------------------------------------- benchmark


def _benchmark(
    net: torch.nn.Module, fp32: Path, int8: Path | None, size: tuple[int, int], batch_sizes: Sequence[int]
) -> list[dict[str, Any]]:
    """Median latency per batch and images/s: PyTorch fp32, bf16 (where fast), ONNX Runtime fp32 and int8 (CPU)."""
    from birdcli.device import cpu_has_fast_bf16

    net = net.eval().cpu()

    def torch_run(dtype: torch.dtype | None) -> Callable[[np.ndarray], Any]:
        def run(x: np.ndarray) -> Any:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                return net(pixel_values=torch.from_numpy(x)).logits

        return run

    def ort_run(path: Path) -> Callable[[np.ndarray], Any]:
        sess = session(path)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})

    candidates: list[tuple[str, str, Callable[[], Callable[[np.ndarray], Any]]]] = [
        ("PyTorch", "fp32", lambda: torch_run(None))
    ]
    if cpu_has_fast_bf16():
        candidates.append(("PyTorch", "bf16", lambda: torch_run(torch.bfloat16)))
    candidates.append(("ONNX Runtime", "fp32", lambda: ort_run(fp32)))
    if int8 is not None:
        candidates.append(("ONNX Runtime", "int8", lambda: ort_run(int8)))
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, 3, *size), dtype=np.float32) for b in batch_sizes}
    rows = []
    for backend, precision, make in candidates:  # one backend at a time: no idle thread pools competing
        run = make()
        for b, x in inputs.items():
            latency = _time(run, x)
            rows.append(
                {
                    "backend": backend,
                    "precision": precision,
                    "batch": b,
                    "latency_ms": latency * 1e3,
                    "images_per_s": b / latency,
                }
            )
        del run
    return sorted(rows, key=lambda r: r["batch"])


def _time(run: Callable[[np.ndarray], Any], x: np.ndarray, budget_s: float = 1.0, max_reps: int = 30) -> float:
    """Median seconds per call after one warm-up call; at least 3 calls, more while within the time budget."""
    run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _print_bench(rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    t = Table(title=f"latency and throughput on CPU ({torch.get_num_threads()} threads)")
    for col in ("backend", "precision", "batch", "ms / batch", "images/s"):
        t.add_column(col, justify="left" if col in ("backend", "precision") else "right")
    for r in rows:
        t.add_row(r["backend"], r["precision"], str(r["batch"]), f"{r['latency_ms']:.2f}", f"{r['images_per_s']:.1f}")
    out.print(t)


# ---------------------------------------------------------------- helpers


def _default_out(model_dir: Path, quantize: str) -> Path:
    """<run>/onnx-fp32 (or onnx-int8) for a run's model; <folder>-onnx-fp32 beside any other model folder."""
    tag = "onnx-int8" if quantize == "int8" else "onnx-fp32"
    if model_dir.name in ("best", "last") and (model_dir.parent / "config.yaml").is_file():
        return model_dir.parent / (tag if model_dir.name == "best" else f"{tag}-last")
    return model_dir.with_name(f"{model_dir.name}-{tag}")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "birdcli": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "ort": onnxruntime.__version__,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
