"""`birds profile`: where a training step's time goes, measured on real steps of the configured experiment.

warm-up -> FLOP count of one step -> N clean timed steps (data wait / forward / backward / optimizer, synchronised)
-> the same N steps again under cProfile and torch.profiler -> profile.prof, trace.json, summary.json and a table.
The clean phase gives the numbers (images/s, FLOP utilisation); the profiled phase gives the call graph and the
operator breakdown (profiling slows Python-heavy code, so its timings are not the ones reported as throughput).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, record_function
from torch.utils.data import DataLoader

from birdcli import model as models
from birdcli import recipe
from birdcli.console import info, out, warn
from birdcli.data import layout
from birdcli.data.dataset import class_names, collate, normalize, samples
from birdcli.device import autocast, device_name, pick_device, pick_precision, precision_name, seed_everything
from birdcli.errors import BirdsError, UsageError
from birdcli.inference import loader_for

PHASES = ("data", "forward", "backward", "optimizer")


def profile(
    cfg: DictConfig,
    device: str = "auto",
    steps: int = 10,
    warmup: int = 3,
    out_dir: Path | None = None,
    inference: bool = True,
) -> dict[str, Any]:
    """Profile `steps` training steps (and an inference pass) of `cfg`; returns the summary written to summary.json."""
    if steps < 1 or warmup < 0:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    tc = cfg.train
    dev = pick_device(device)
    dtype = pick_precision(tc.precision, dev)
    seed_everything(tc.seed)
    out_dir = _out_dir(out_dir, cfg.exp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if dev.type == "cpu" and load > cores - 0.5:  # busy threads make every op wait: timings come out several x slower
        warn(f"the CPU is busy (load average {load:.1f} on {cores} cores): timings will be slower and noisy")

    # ---- data: the experiment's train split with its augmentation, and its validation split for inference
    root = Path(cfg.data.root)
    recipe.ensure_data(cfg.data, root)
    classes = class_names(root)
    train_items = samples(root, "train", classes)[: tc.max_train_samples or None]
    if not train_items:
        raise BirdsError(f"no training images in {root}/train", "run `birds data check`")
    val_split = "valid" if layout.species_dirs(root, "valid") else "test"
    val_items = samples(root, val_split, classes) or train_items

    # ---- model, preprocessing, optimizer: as `birds train` builds them
    m = cfg.model
    net, processor = recipe.build_model(cfg.model, classes)
    prep = models.preprocess_of(processor)
    net.to(dev).train()
    raw_net = net
    if tc.compile:
        net = torch.compile(net)
    optimizer = recipe.optimizer(raw_net, cfg.optimizer)
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    workers = recipe.num_workers(cfg.data.num_workers)
    train_ds = recipe.train_dataset(cfg, train_items, prep.size)
    loader = DataLoader(
        train_ds,
        batch_size=tc.batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=len(train_ds) >= tc.batch_size,
    )
    eval_batch = tc.eval_batch_size or 2 * tc.batch_size
    val_loader = loader_for(val_items[: eval_batch * steps], prep.size, eval_batch, workers, dev.type == "cuda")
    batches = _forever(loader)
    info(
        f"profiling {cfg.exp}: {m.name_or_path}, {len(classes)} species, batch {tc.batch_size}, {dev} "
        f"{precision_name(dtype)}, {workers} loader worker(s) | {warmup} warm-up + {steps} timed + {steps} profiled "
        f"steps -> {out_dir}"
    )

    def train_step() -> tuple[list[float], int]:
        """One optimizer step (train.grad_accum micro-batches), synchronised between phases.

        Returns ([data wait, forward, backward, optimizer] seconds, images).
        """
        split, seen = [0.0] * len(PHASES), 0
        for _ in range(tc.grad_accum):
            t0 = time.perf_counter()
            with record_function("data"):
                images, labels, _ = next(batches)
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            t1 = _sync(dev)
            with record_function("forward"):
                with autocast(dev, dtype):
                    logits = net(pixel_values=normalize(images, prep.mean, prep.std)).logits
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=tc.label_smoothing)
            t2 = _sync(dev)
            with record_function("backward"):
                scaler.scale(loss / tc.grad_accum).backward()
            t3 = _sync(dev)
            split = [split[0] + t1 - t0, split[1] + t2 - t1, split[2] + t3 - t2, 0.0]
            seen += len(labels)
        t3 = time.perf_counter()
        with record_function("optimizer"):
            if tc.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_net.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        split[3] = _sync(dev) - t3
        return split, seen

    @torch.no_grad()
    def inference_pass() -> tuple[float, int]:
        """Eval-mode forward passes over (part of) the validation split: (seconds, images)."""
        net.eval()
        seen, t0 = 0, time.perf_counter()
        for images, _, _ in val_loader:
            with record_function("inference"), autocast(dev, dtype):
                net(pixel_values=normalize(images.to(dev), prep.mean, prep.std))
            seen += len(images)
        seconds = _sync(dev) - t0
        net.train()
        return seconds, seen

    # ---- warm-up (kernels, allocator, loader workers), then the FLOPs of one step
    for _ in range(warmup):
        train_step()
    try:
        flops_per_step = _count_flops(train_step)
    except Exception as e:  # e.g. a compiled model the counter cannot follow: report no utilisation, not a crash
        warn(f"could not count FLOPs ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})")
        flops_per_step = 0
    if inference:
        inference_pass()  # warms the eval path

    # ---- clean timed steps: the numbers
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    split, seen = [0.0] * len(PHASES), 0
    for _ in range(steps):
        times, n = train_step()
        split = [a + b for a, b in zip(split, times, strict=True)]
        seen += n
    step_s = sum(split) / steps
    infer_s, infer_n = inference_pass() if inference else (0.0, 0)

    # ---- the same again under cProfile and torch.profiler: the call graph and the operators
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's own log lines (e.g. "no GPU") off the terminal
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    cprof = cProfile.Profile()
    with torch.profiler.profile(activities=activities, record_shapes=True) as tprof:
        cprof.enable()
        for _ in range(steps):
            train_step()
        if inference:
            inference_pass()
        cprof.disable()
    prof_path, trace_path = out_dir / "profile.prof", out_dir / "trace.json"
    cprof.dump_stats(prof_path)
    tprof.export_chrome_trace(str(trace_path))

    # ---- summary: split, throughput, FLOP utilisation, top functions and operators
    peak = _matmul_peak(dev, dtype)
    achieved = flops_per_step / step_s if step_s > 0 else 0.0
    summary: dict[str, Any] = {
        "exp": cfg.exp,
        "model": str(m.name_or_path),
        "device": str(dev),
        "device_name": device_name(dev),
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "precision": precision_name(dtype),
        "batch_size": tc.batch_size,
        "grad_accum": tc.grad_accum,
        "image_size": list(prep.size),
        "loader_workers": workers,
        "warmup_steps": warmup,
        "steps": steps,
        "step_seconds": step_s,
        "split_seconds": {k: v / steps for k, v in zip(PHASES, split, strict=True)},
        "train_images_per_s": seen / sum(split) if sum(split) > 0 else 0.0,
        "inference_images_per_s": infer_n / infer_s if infer_s > 0 else None,
        "flops_per_step": flops_per_step,
        "achieved_flops_per_s": achieved,
        "peak_matmul_flops_per_s": peak,
        "mfu": achieved / peak if peak > 0 and flops_per_step else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
        "top_functions": _top_functions(prof_path),
        "top_operators": _top_operators(tprof, dev),
        "profile": str(prof_path),
        "trace": str(trace_path),
        "snakeviz": f"snakeviz {shlex.quote(str(prof_path))}",
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------- report


def print_summary(s: dict[str, Any]) -> None:
    """The rich tables: step split, throughput and utilisation, top functions, top operators, then where files are."""
    from rich.table import Table

    accum = f" x {s['grad_accum']} micro-batches" if s["grad_accum"] > 1 else ""
    t = Table(title=f"training step: {s['exp']} on {s['device']} ({s['precision']}), batch {s['batch_size']}{accum}")
    t.add_column("phase")
    t.add_column("ms/step", justify="right")
    t.add_column("share", justify="right")
    for phase, sec in s["split_seconds"].items():
        t.add_row("data wait" if phase == "data" else phase, f"{sec * 1e3:.2f}", f"{sec / s['step_seconds']:.0%}")
    t.add_row("[bold]step[/]", f"[bold]{s['step_seconds'] * 1e3:.2f}[/]", "100%")
    out.print(t)

    infer = s["inference_images_per_s"]
    mfu = s["mfu"]
    out.print(
        f"train {s['train_images_per_s']:.1f} images/s"
        + (f" | inference {infer:.1f} images/s" if infer else "")
        + f" | {s['flops_per_step'] / 1e9:.3g} GFLOP/step -> {s['achieved_flops_per_s'] / 1e12:.3g} TFLOP/s"
        f" of a measured {s['peak_matmul_flops_per_s'] / 1e12:.3g} TFLOP/s {s['precision']} matmul peak"
        + (f" = [bold]{mfu:.1%} MFU[/]" if mfu is not None else "")
        + (f" | peak GPU memory {s['peak_memory_bytes'] / 2**30:.2f} GiB" if s["peak_memory_bytes"] else ""),
        highlight=False,
    )

    t = Table(title="top functions by cumulative time (cProfile, profiled steps)")
    for col in ("function", "calls", "cumulative s", "own s"):
        t.add_column(col, justify="left" if col == "function" else "right")
    for f in s["top_functions"]:
        t.add_row(f["function"], str(f["calls"]), f"{f['cumulative_s']:.3f}", f"{f['own_s']:.3f}")
    out.print(t)

    t = Table(title="top operators by self time (torch.profiler)")
    for col in ("operator", "calls", "self ms", "total ms", "share"):
        t.add_column(col, justify="left" if col == "operator" else "right")
    for o in s["top_operators"]:
        t.add_row(o["name"], str(o["calls"]), f"{o['self_ms']:.2f}", f"{o['total_ms']:.2f}", f"{o['share']:.1%}")
    out.print(t)

    out.print(f"cProfile: {s['profile']}  (python -m pstats {shlex.quote(s['profile'])})", highlight=False)
    out.print(f"trace:    {s['trace']}  (open in https://ui.perfetto.dev or chrome://tracing)", highlight=False)
    out.print(f"view the call graph: [bold]{s['snakeviz']}[/]", highlight=False)


def open_snakeviz(prof: Path) -> None:
    """Serve the profile with snakeviz (blocks until Ctrl-C), or say how to get it."""
    import importlib.util

    if importlib.util.find_spec("snakeviz") is None and shutil.which("snakeviz") is None:
        raise BirdsError("snakeviz is not installed", f"pip install snakeviz, then: snakeviz {shlex.quote(str(prof))}")
    info("starting snakeviz (Ctrl-C to stop)")
    try:
        subprocess.run([sys.executable, "-m", "snakeviz", str(prof)], check=False)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- helpers


def _out_dir(path: Path | None, exp: str) -> Path:
    if path is None:
        base = Path("profiles") / f"{exp}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, k = base, 1
        while path.exists():
            path, k = base.with_name(f"{base.name}-{k}"), k + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def _forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def _sync(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _count_flops(step) -> int:
    """FLOPs of one training step (forward + backward matmuls, convolutions, attention) by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    cpu_attention = {  # the CPU flash-attention kernels are not in the counter's registry: same formulas
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        step()
    return int(counter.get_total_flops())


def _matmul_peak(dev: torch.device, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """Measured FLOP/s of a large square matmul in the step's precision: the reference for utilisation."""
    n = 4096 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype or torch.float32)
    b = torch.randn(n, n, device=dev, dtype=dtype or torch.float32)
    a @ b
    _sync(dev)
    reps, elapsed = 1, 0.0
    while elapsed < seconds:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        elapsed = _sync(dev) - t0
        if elapsed < seconds:
            reps *= 2
    return 2 * n**3 * reps / elapsed


def _top_functions(prof: Path, n: int = 15) -> list[dict[str, Any]]:
    """Top functions by cumulative time, leaving out this module and the profilers themselves."""
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, own, cum, _) in stats.items():
        if file.endswith(("profiling.py", "profiler.py")) or name == "<module>" or "cProfile" in name:
            continue
        where = f"{_short_path(file)}:{line}" if file != "~" else "built-in"
        rows.append({"function": f"{name} ({where})", "calls": calls, "cumulative_s": cum, "own_s": own})
    return sorted(rows, key=lambda r: -r["cumulative_s"])[:n]


def _top_operators(tprof: Any, dev: torch.device, n: int = 15) -> list[dict[str, Any]]:
    """aten operators by self time (device time on CUDA); our phase labels are left out."""
    on_device = dev.type == "cuda"
    events = [
        e
        for e in tprof.key_averages()
        if e.key not in (*PHASES, "inference")
        and not e.key.startswith(("ProfilerStep", "enumerate(DataLoader)"))
        and not e.is_user_annotation
        and e.count > 0
    ]
    key = (lambda e: e.self_device_time_total) if on_device else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1.0
    top = sorted(events, key=key, reverse=True)[:n]
    return [
        {
            "name": e.key,
            "calls": e.count,
            "self_ms": key(e) / 1e3,
            "total_ms": (e.device_time_total if on_device else e.cpu_time_total) / 1e3,
            "share": key(e) / total,
        }
        for e in top
    ]


def _short_path(file: str) -> str:
    parts = Path(file).parts
    for anchor in ("site-packages", "birdcli"):
        if anchor in parts:
            i = parts.index(anchor)
            return "/".join(parts[i + (anchor == "site-packages") :])
    return "/".join(parts[-2:])
