"""`birds train`: the training loop, readable top to bottom.

setup (device, data, model, optimizer) -> for each epoch: batches -> autocast forward -> backward -> step ->
periodic log/checkpoint -> validation -> best/last model folders -> history. Resumes exactly from `checkpoint/`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from rich.progress import TextColumn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from birdcli import __version__, checkpoint, recipe, tracking
from birdcli import model as models
from birdcli.console import info, progress
from birdcli.data import layout
from birdcli.data.dataset import class_names, collate, normalize, samples
from birdcli.device import (
    Dist,
    autocast,
    cleanup_distributed,
    device_name,
    init_distributed,
    pick_device,
    pick_precision,
    precision_name,
    rng_state,
    seed_everything,
    set_rng_state,
)
from birdcli.errors import BirdsError, UsageError
from birdcli.inference import basic_metrics, loader_for, logits_over

HISTORY_FIELDS = [
    "epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "images_per_s", "seconds",
]  # fmt: skip


class ResumableSampler(Sampler):
    """DistributedSampler order, tagged with the epoch, skipping the samples a resumed epoch already saw."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base = base
        self.epoch = 0
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip
        self.base.set_epoch(epoch)

    def __iter__(self):
        for i, index in enumerate(self.base):
            if i >= self.skip:
                yield (index, self.epoch)

    def __len__(self) -> int:
        return len(self.base) - self.skip


def train(cfg: DictConfig, device: str = "auto", resume: str | None = None, name: str | None = None) -> Path:
    """Train per `cfg`; returns the run folder."""
    # ---- device, processes, precision
    dev = pick_device(device)
    dist = init_distributed(dev)
    try:
        return _train(cfg, dev, dist, resume, name)
    finally:
        cleanup_distributed()


def _train(cfg: DictConfig, dev: torch.device, dist: Dist, resume: str | None, name: str | None) -> Path:
    tc = cfg.train
    run_dir, resumed = _run_dir(cfg, dist, resume, name)
    if resumed:
        cfg = OmegaConf.load(run_dir / "config.yaml")  # type: ignore[assignment]  # a resumed run keeps its own config
        tc = cfg.train
    dtype = pick_precision(tc.precision, dev)
    seed_everything(tc.seed, tc.deterministic)
    if dist.enabled and tc.batch_size % dist.world_size:
        raise UsageError(f"train.batch_size={tc.batch_size} must divide by the {dist.world_size} processes")

    # ---- data: class index from train/, model-derived preprocessing
    root = Path(cfg.data.root)
    recipe.ensure_data(cfg.data, root, fetch_here=dist.main)
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()  # the other ranks wait for rank 0's fetch
    classes = class_names(root)
    train_items = samples(root, "train", classes)[: tc.max_train_samples or None]
    val_split = "valid" if layout.species_dirs(root, "valid") else "test"
    val_items = samples(root, val_split, classes)
    if not train_items:
        raise BirdsError(f"no training images in {root}/train", "run `birds data check`")

    # ---- model (pretrained hub id, local folder, or from scratch) and its preprocessing
    net, processor = recipe.build_model(cfg.model, classes)
    prep = models.preprocess_of(processor)
    net.to(dev)
    raw_net = net

    # ---- loaders: per-process batch, workers from the cores, (index, epoch) keys for exact resume
    per_rank_batch = tc.batch_size // dist.world_size
    workers = recipe.num_workers(cfg.data.num_workers, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    train_ds = recipe.train_dataset(cfg, train_items, prep.size)
    sampler = ResumableSampler(
        DistributedSampler(train_ds, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=tc.seed)
    )
    train_loader = DataLoader(
        train_ds,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=dev.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(tc.seed),  # keeps the global RNG untouched by loader start-up
    )
    val_loader = loader_for(val_items, prep.size, tc.eval_batch_size or 2 * tc.batch_size, workers, dev.type == "cuda")
    batches_per_epoch = math.ceil(len(train_ds) / dist.world_size / per_rank_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)

    # ---- optimizer, schedule, grad scaler (fp16 only)
    optimizer = recipe.optimizer(raw_net, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg.scheduler, total_steps))
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)

    # ---- resume: weights, optimizer, scheduler, scaler, RNGs, position, best metric, W&B id
    pos: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_acc": -1.0, "bad_epochs": 0, "sums": [0.0, 0, 0]}
    wandb_id = None
    if resumed:
        weights, state, meta = checkpoint.load(run_dir / "checkpoint")
        raw_net.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        pos = meta["position"]
        wandb_id = meta.get("wandb_id")
        info(f"resuming {run_dir} at epoch {pos['epoch'] + 1}, batch {pos['batch']}, step {pos['step']}")
    if tc.compile:
        net = torch.compile(net)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    # ---- run folder, manifest, tracking (rank 0 only)
    tracker: Any = tracking.NullTracker()
    if dist.main:
        if not resumed:
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        _write_manifest(run_dir, cfg, root, dev, dtype, dist)
        w = cfg.tracking.wandb
        tracker = tracking.start(
            w.mode, w.project, w.entity, run_dir.name, run_dir,
            OmegaConf.to_container(cfg, resolve=True), [cfg.exp, *w.tags], wandb_id, w.log_model,  # type: ignore[arg-type]
        )  # fmt: skip
    info(
        f"run {run_dir} | {len(classes)} species, {len(train_items)} train / {len(val_items)} {val_split} images | "
        f"{dev} {precision_name(dtype)} | {dist.world_size} process(es) x batch {per_rank_batch} x accum "
        f"{tc.grad_accum} | {total_steps} steps"
    )

    def save_checkpoint(epoch: int, batch: int) -> None:
        if not dist.main:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
        }
        p = {**pos, "epoch": epoch, "batch": batch}
        meta = {"position": p, "wandb_id": tracker.run_id, "saved_at": time.time(), "exp": cfg.exp}
        checkpoint.save(run_dir / "checkpoint", raw_net.state_dict(), state, meta)

    # ---- the loop
    stop = pos["step"] >= total_steps
    t_run = time.perf_counter()
    seen_total = 0
    for epoch in range(pos["epoch"], tc.epochs):
        if stop:
            break
        skip_batches = pos["batch"] if epoch == pos["epoch"] else 0
        sampler.set_position(epoch, skip_batches * per_rank_batch)
        if skip_batches == 0:
            pos["sums"] = [0.0, 0, 0]  # loss sum, correct, samples
        net.train()
        t0, seen = time.perf_counter(), 0
        with progress(TextColumn("{task.fields[stats]}"), transient=True) as bar:
            task = bar.add_task(
                f"epoch {epoch + 1}/{tc.epochs}", total=batches_per_epoch, completed=skip_batches, stats=""
            )
            for i, (images, labels, _) in enumerate(train_loader, start=skip_batches):
                images = images.to(dev, non_blocking=True)
                labels = labels.to(dev, non_blocking=True)
                last_micro = (i + 1) % tc.grad_accum == 0 or i + 1 == batches_per_epoch
                with _maybe_no_sync(net, dist.enabled and not last_micro):
                    with autocast(dev, dtype):
                        logits = net(pixel_values=normalize(images, prep.mean, prep.std)).logits
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=tc.label_smoothing)
                    scaler.scale(loss / tc.grad_accum).backward()
                pos["sums"][0] += loss.item() * len(labels)
                pos["sums"][1] += int((logits.argmax(1) == labels).sum())
                pos["sums"][2] += len(labels)
                seen += len(labels)
                bar.advance(task)
                if not last_micro:
                    continue
                # optimizer step (every grad_accum micro-batches)
                if tc.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_net.parameters(), tc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                pos["step"] += 1
                if pos["step"] % tc.log_every == 0:
                    ips = seen * dist.world_size / (time.perf_counter() - t0)
                    lr = scheduler.get_last_lr()[0]
                    bar.update(task, stats=f"loss {loss.item():.4f} lr {lr:.2e} {ips:.0f} img/s")
                    tracker.log({"train/loss": loss.item(), "train/lr": lr, "train/images_per_s": ips}, pos["step"])
                if pos["step"] % tc.checkpoint_every == 0 and i + 1 < batches_per_epoch:
                    save_checkpoint(epoch, i + 1)
                if pos["step"] >= total_steps:
                    stop = True
                    break
        seconds = time.perf_counter() - t0
        seen_total += seen

        # ---- validation (rank 0), history, best/last, checkpoint, early stopping
        if dist.main:
            s = pos["sums"]
            val = basic_metrics(*logits_over(raw_net, val_loader, dev, dtype, prep.mean, prep.std)[:2])
            row = {
                "epoch": epoch + 1,
                "step": pos["step"],
                "train_loss": s[0] / max(s[2], 1),
                "train_acc": s[1] / max(s[2], 1),
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "val_top5": val["top5"],
                "lr": scheduler.get_last_lr()[0],
                "images_per_s": seen * dist.world_size / seconds,
                "seconds": seconds,
            }
            _append_history(run_dir / "history.csv", row)
            tracker.log({f"val/{k}": val[k] for k in ("loss", "acc", "top5")} | {"epoch": epoch + 1}, pos["step"])
            _log_epoch(row, tc.epochs)
            models.save(raw_net, processor, run_dir / "last")
            if val["acc"] > pos["best_acc"]:
                pos["best_acc"], pos["bad_epochs"] = val["acc"], 0
                models.save(raw_net, processor, run_dir / "best")
            else:
                pos["bad_epochs"] += 1
            save_checkpoint(epoch + 1, 0)
        if dist.enabled:
            _sync_position(pos)
        if tc.early_stopping_patience and pos["bad_epochs"] >= tc.early_stopping_patience:
            info(f"early stopping: no better val accuracy for {pos['bad_epochs']} epochs")
            break

    # ---- final metrics (under torchrun: proof that every replica ends with the same weights)
    replicas = _replica_hashes(raw_net) if dist.enabled else None
    if dist.main:
        metrics = _final_metrics(run_dir, pos, seen_total, time.perf_counter() - t_run)
        if replicas is not None:
            metrics |= {"world_size": dist.world_size, "replicas_identical": len(set(replicas)) == 1}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        tracker.summary(metrics)
        if (run_dir / "best").is_dir():
            tracker.log_model(run_dir / "best", f"{cfg.exp}-model")
        tracker.finish()
        info(f"[green]done[/]: best val acc {pos['best_acc']:.4f}; model in {run_dir / 'best'}")
    return run_dir


# ---------------------------------------------------------------- helpers


def _run_dir(cfg: DictConfig, dist: Dist, resume: str | None, name: str | None) -> tuple[Path, bool]:
    """Pick (and on rank 0 create) the run folder; every process gets the same answer."""
    exp_dir = Path(cfg.runs_dir) / cfg.exp
    if resume:
        if resume == "auto":
            found = sorted(exp_dir.glob("*/checkpoint*/meta.json"), key=lambda p: p.stat().st_mtime)
            found += sorted(exp_dir.glob("*/.checkpoint.old/meta.json"), key=lambda p: p.stat().st_mtime)
            if not found:
                raise BirdsError(f"--resume auto: no run with a checkpoint under {exp_dir}", "start a new run")
            run = max(found, key=lambda p: p.stat().st_mtime).parent.parent
        else:
            run = Path(resume)
            if checkpoint.existing(run / "checkpoint") is None:
                raise BirdsError(f"--resume {resume}: no checkpoint/ in that folder", "pass a run folder")
        return run, True
    run_name = name or time.strftime("%Y%m%d-%H%M%S")
    if dist.enabled:
        import torch.distributed as tdist

        box = [run_name]
        tdist.broadcast_object_list(box, src=0)
        run_name = box[0]
    run = exp_dir / run_name
    if dist.main:
        if run.exists():
            if name:
                raise UsageError(f"run {run} already exists", "pick another --name or --resume it")
            base, k = run, 1
            while run.exists():
                run, k = base.with_name(f"{base.name}-{k}"), k + 1
        run.mkdir(parents=True)
    if dist.enabled:
        import torch.distributed as tdist

        box = [str(run)]
        tdist.broadcast_object_list(box, src=0)
        run = Path(box[0])
    return run, False


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _schedule(sc: DictConfig, total: int):
    """Linear warmup, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = sc.warmup_steps if sc.warmup_steps is not None else int(sc.warmup_ratio * total)
    floor = sc.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if sc.name == "constant":
            return 1.0
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        if sc.name == "linear":
            return floor + (1 - floor) * (1 - t)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


class _maybe_no_sync:
    """DDP's no_sync() on accumulation micro-steps; nothing otherwise."""

    def __init__(self, net: torch.nn.Module, active: bool) -> None:
        self.ctx = net.no_sync() if active else None  # type: ignore[operator]  # DDP method, typed by Module.__getattr__

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _sync_position(pos: dict) -> None:
    """Rank 0 decides early stopping; everyone follows."""
    import torch.distributed as tdist

    box = [pos["bad_epochs"], pos["best_acc"]]
    tdist.broadcast_object_list(box, src=0)
    pos["bad_epochs"], pos["best_acc"] = box


def _replica_hashes(net: torch.nn.Module) -> list[str]:
    import torch.distributed as tdist

    h = hashlib.sha256()
    for p in net.state_dict().values():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    hashes: list[str] = [""] * tdist.get_world_size()
    tdist.all_gather_object(hashes, h.hexdigest())
    return hashes


def _append_history(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def _log_epoch(row: dict[str, Any], epochs: int) -> None:
    line = (
        f"epoch {row['epoch']}/{epochs} step {row['step']} | train loss {row['train_loss']:.4f} "
        f"acc {row['train_acc']:.4f} | val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} "
        f"top5 {row['val_top5']:.4f} | lr {row['lr']:.2e} | {row['images_per_s']:.0f} img/s | {row['seconds']:.1f}s"
    )
    from birdcli.console import err

    err.print(line, highlight=False, markup=False, soft_wrap=True)


def _final_metrics(run_dir: Path, pos: dict, seen: int, seconds: float) -> dict[str, Any]:
    rows = list(csv.DictReader((run_dir / "history.csv").open())) if (run_dir / "history.csv").exists() else []
    last = rows[-1] if rows else {}
    metrics = {
        "best_val_acc": pos["best_acc"],
        "val_acc": float(last.get("val_acc", "nan")),
        "val_top5": float(last.get("val_top5", "nan")),
        "val_loss": float(last.get("val_loss", "nan")),
        "train_loss": float(last.get("train_loss", "nan")),
        "epochs": int(last.get("epoch", 0)),
        "steps": pos["step"],
        "train_seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else 0.0,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _write_manifest(run_dir: Path, cfg: DictConfig, root: Path, dev: torch.device, dtype, dist: Dist) -> None:
    import torchvision
    import transformers

    yaml = OmegaConf.to_yaml(cfg)
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    manifest = {
        "birdcli": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "data_root": str(root),
        "data_fingerprint": layout.fingerprint(root),
        "config_sha256": hashlib.sha256(yaml.encode()).hexdigest(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
        },
        "device": str(dev),
        "device_name": device_name(dev),
        "precision": precision_name(dtype),
        "world_size": dist.world_size,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
