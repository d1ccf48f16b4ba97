"""Cold-start wall time and batch throughput of `birds predict`: the torch path, the ONNX path, and a baseline script
that loads the same model with `transformers.pipeline("image-classification")`.

    python benchmarks/bench_predict.py                            # ViT-B/16-sized model (random weights), 525 classes
    python benchmarks/bench_predict.py --model runs/exp2/X/best --image photo.jpg --repeats 7
    python benchmarks/bench_predict.py --model runs/smoke/X/best --skip-throughput

Cold = a new process per prediction, as a user runs it (the OS file cache is warm: one untimed run of each command
comes first). Commands run interleaved, round after round, so background load hits them alike; the table shows
median and minimum wall time and each median as a multiple of the pipeline script's. Throughput runs each backend
in its own process over the same images (decode and preprocessing included), batch 32. Results also go to
<work>/bench_predict.json. Targets from the issue: ONNX path <= 0.1x, torch path <= 0.5x of the pipeline script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE_SCRIPT = """\
import sys
from transformers import pipeline

classify = pipeline("image-classification", model=sys.argv[1], device=-1)
for p in classify(sys.argv[2], top_k=5):
    print(f"{p['label']}\\t{p['score']:.4f}")
"""

THROUGHPUT_WORKER = """\
import json, sys, time
backend, model, files = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
batch = 32
if backend == "pipeline":
    from transformers import pipeline
    clf = pipeline("image-classification", model=model, device=-1)
    run = lambda chunk: clf(chunk, top_k=5, batch_size=batch)
else:
    from birdcli.predict import load_predictor
    kind, _, precision = backend.partition(":")
    predictor = load_predictor(model, "cpu", precision or "fp32", kind)
    run = predictor.predict
run(files[:batch])  # warm-up
t0 = time.perf_counter()
for i in range(0, len(files), batch):
    run(files[i : i + batch])
print(json.dumps({"images_per_s": len(files) / (time.perf_counter() - t0)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF model folder or run folder (default: build a ViT-B/16-sized one)")
    ap.add_argument("--image", help="the one image (default: first birds-mini photo, else a generated one)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "birds-bench"), help="scratch folder")
    ap.add_argument("--classes", type=int, default=525, help="classes of the generated model")
    ap.add_argument("--repeats", type=int, default=5, help="timed cold runs per command")
    ap.add_argument("--throughput-images", type=int, default=128)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else build_vit_base(work / "vit-base", args.classes)
    model = resolve(model)
    image = Path(args.image) if args.image else default_image(work)
    onnx_fp32 = export(model, image, work / f"{model.parent.name}-{model.name}-onnx-fp32", "none")
    onnx_int8 = export(model, image, work / f"{model.parent.name}-{model.name}-onnx-int8", "int8")
    (work / "pipeline_predict.py").write_text(PIPELINE_SCRIPT)
    env = {**os.environ, "BIRDS_QUIET": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    commands = {
        "transformers pipeline script": [sys.executable, str(work / "pipeline_predict.py"), str(model), str(image)],
        "birds predict (torch)": [sys.executable, "-m", "birdcli", "predict", str(image), "--model", str(model)],
        "birds predict (ONNX fp32)": [
            sys.executable,
            "-m",
            "birdcli",
            "predict",
            str(image),
            "--model",
            str(onnx_fp32),
        ],
        "birds predict (ONNX int8)": [
            sys.executable,
            "-m",
            "birdcli",
            "predict",
            str(image),
            "--model",
            str(onnx_int8),
        ],
    }
    print(f"model {model}, image {image}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, cmd in commands.items():  # untimed: warms the file cache, and shows each command works
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr}")
    names = list(commands)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            subprocess.run(commands[name], env=env, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    cold = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "ratio": statistics.median(t) / base, "runs": t}
        for name, t in times.items()
    }
    print(f"\ncold single-image prediction ({args.repeats} runs each, new process per run)")
    print(f"{'command':32} {'median s':>9} {'min s':>7} {'x pipeline':>11}")
    for name, c in cold.items():
        print(f"{name:32} {c['median_s']:9.2f} {c['min_s']:7.2f} {c['ratio']:11.2f}")

    throughput: dict[str, float] = {}
    if not args.skip_throughput:
        files = images_for_throughput(image, args.throughput_images)
        backends = {
            "transformers pipeline": ("pipeline", model),
            "torch fp32": ("torch:fp32", model),
            "torch bf16 (autocast)": ("torch:bf16", model),
            "ONNX Runtime fp32": ("onnx", onnx_fp32),
            "ONNX Runtime int8": ("onnx", onnx_int8),
        }
        print(f"\nthroughput over {len(files)} images, batch 32, decode and preprocessing included")
        for name, (backend, folder) in backends.items():
            r = subprocess.run(
                [sys.executable, "-c", THROUGHPUT_WORKER, backend, str(folder), json.dumps(files)],
                env=env,
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                print(f"{name:28} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            throughput[name] = json.loads(r.stdout.strip().splitlines()[-1])["images_per_s"]
            print(f"{name:28} {throughput[name]:8.1f} images/s")

    result = {"model": str(model), "image": str(image), "cpus": os.cpu_count(), "cold": cold, "throughput": throughput}
    (work / "bench_predict.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten {work / 'bench_predict.json'}")


def resolve(model: Path) -> Path:
    for candidate in (model, model / "best", model / "last"):
        if (candidate / "config.json").is_file():
            return candidate
    sys.exit(f"{model} is not a model folder")


def build_vit_base(folder: Path, classes: int) -> Path:
    """A ViT-B/16 at 224 px with random weights: the size of the real fine-tuned model, no download needed."""
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = {i: f"SPECIES {i:03d}" for i in range(classes)}
    config = ViTConfig(num_labels=classes, id2label=labels, label2id={v: k for k, v in labels.items()})  # type: ignore[call-arg]
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def default_image(work: Path) -> Path:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "birds-mini" / "valid"
    found = sorted(shared.rglob("*.jpg")) if shared.is_dir() else []
    if found:
        return found[0]
    import numpy as np
    from PIL import Image

    path = work / "bird.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path)
    return path


def images_for_throughput(image: Path, n: int) -> list[str]:
    """n files: the photos of the image's split (e.g. birds-mini/valid/*/*.jpg), repeated as needed."""
    found = sorted(str(p) for p in image.parent.parent.rglob("*.jpg"))[:n] or [str(image)]
    return (found * (n // len(found) + 1))[:n]


def export(model: Path, image: Path, out: Path, quantize: str) -> Path:
    if (out / "model.onnx").is_file():
        return out
    cmd = [sys.executable, "-m", "birdcli", "export", str(model), "--out", str(out), "--quantize", quantize]
    cmd += ["--check-images", str(image), "--no-bench", "--min-agreement", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BIRDS_QUIET": "1"})
    if r.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        sys.exit(f"export failed:\n{r.stderr}")
    return out


if __name__ == "__main__":
    main()
