"""Training throughput: `birds train` vs Hugging Face `Trainer` (its defaults) on the same model, data and batch.

    python benchmarks/bench_train.py [--data ../shared/data/birds-485] [--steps 30] [--batch 32]

Both train ViT-Tiny (224 px, from scratch, 485 classes) on the same real JPEGs with the same global batch, one after
the other in this process. Trainer gets the seed project's dataset (PIL + ViTImageProcessorPil per image) and its
defaults (fp32 on CPU, no dataloader workers); birdcli gets its config defaults (bf16 autocast where the CPU has
AMX/AVX512-BF16, workers from the cores, uint8 batches normalised on the device). Also prints model FLOP utilisation
against a matmul peak measured here. Needs `pip install -e '.[bench]'` (accelerate, for Trainer).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from birdcli.config import load
from birdcli.data.dataset import class_names, samples
from birdcli.device import cpu_has_fast_bf16
from birdcli.train import train

sys.path.insert(0, str(Path(__file__).parent))
from bench_data import SeedDataset  # noqa: E402  (the same baseline dataset)

MEAN = STD = (0.5, 0.5, 0.5)


class TrainerDataset(SeedDataset):
    """The seed project's per-image pipeline (bench_data.py), as the dicts Trainer expects."""

    def __getitem__(self, i):
        pixels, label = super().__getitem__(i)
        return {"pixel_values": pixels, "labels": label}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def train_flops_per_image(model: torch.nn.Module, size: int = 224) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(pixel_values=x).logits.sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())  # forward + backward


def run_trainer(items, labels, steps: int, batch: int, out: str) -> float:
    from transformers import Trainer, TrainingArguments, ViTImageProcessorPil

    from birdcli.model import build

    model, _ = build("vit-tiny", labels, False, _tiny_arch(), _attention())  # the same model birds trains
    processor = ViTImageProcessorPil(size={"height": 224, "width": 224}, image_mean=MEAN, image_std=STD)
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=batch, max_steps=steps, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=TrainerDataset(items, processor))
    result = trainer.train()
    return result.metrics["train_samples_per_second"]


def run_birdcli(root: Path, steps: int, batch: int, out: str, precision: str) -> float:
    cfg = load(
        None,
        ["model=vit-tiny", f"data.root={root}", f"runs_dir={out}", f"train.max_steps={steps}", "train.epochs=1",
         f"train.batch_size={batch}", "tracking.wandb.mode=disabled", f"train.precision={precision}",
         "optimizer.lr=1e-4", "train.log_every=1000", "train.checkpoint_every=100000"],
    )  # fmt: skip
    run = train(cfg, device="cpu")
    rows = list(csv.DictReader((run / "history.csv").open()))
    return float(rows[-1]["images_per_s"])


def attention_step_times(labels, batch: int, steps: int = 5) -> dict[str, float]:
    """Seconds per training step (bf16 autocast where fast) of ViT-Tiny with eager vs sdpa attention, interleaved."""
    from birdcli.model import build

    dtype = torch.bfloat16 if cpu_has_fast_bf16() else None
    models = {impl: build("vit-tiny", labels, False, _tiny_arch(), impl)[0] for impl in ("eager", "sdpa")}
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, len(labels), (batch,))
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 1):
        for impl, model in models.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)
            loss.backward()
            if i:  # the first round is warm-up
                times[impl].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _attention() -> str:
    return str(load(None).model.attn_implementation)


def _tiny_arch() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(load(None, ["model=vit-tiny"]).model.architecture)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "birds-485"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    root = Path(args.data)
    labels = class_names(root)
    n_images = args.steps * args.batch
    items = samples(root, "train", labels)[:n_images]
    print(
        f"ViT-Tiny 224 px, {len(labels)} classes, batch {args.batch}, {args.steps} steps, "
        f"threads {torch.get_num_threads()}"
    )
    att = attention_step_times(labels, args.batch)
    print(f"attention, median s/step: eager {att['eager']:.3f}, sdpa {att['sdpa']:.3f} "
          f"(sdpa {att['eager'] / att['sdpa']:.2f}x)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        hf = run_trainer(items, labels, args.steps, args.batch, tmp + "/hf")
        ours = run_birdcli(root, args.steps, args.batch, tmp + "/runs", "auto")
        ours32 = run_birdcli(root, args.steps, args.batch, tmp + "/runs32", "fp32")
    from birdcli.model import build

    model, _ = build("vit-tiny", labels, False, _tiny_arch(), _attention())
    flops = train_flops_per_image(model)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    mode = "bf16" if cpu_has_fast_bf16() else "fp32"
    print(f"{'':28} {'images/s':>9} {'vs Trainer':>10} {'MFU':>7}")
    print(f"{'HF Trainer (defaults, fp32)':28} {hf:>9.1f} {1.0:>9.2f}x {hf * flops / peak['fp32']:>6.1%}")
    print(f"{'birds train (fp32)':28} {ours32:>9.1f} {ours32 / hf:>9.2f}x {ours32 * flops / peak['fp32']:>6.1%}")
    print(f"{'birds train (auto: ' + mode + ')':28} {ours:>9.1f} {ours / hf:>9.2f}x {ours * flops / peak[mode]:>6.1%}")
    print(f"train FLOPs/image {flops / 1e9:.2f} GFLOP; matmul peak fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s (MFU vs the peak of the precision used)")  # fmt: skip


if __name__ == "__main__":
    main()
