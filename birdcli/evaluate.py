"""`birds evaluate`: honest metrics of a model on one split, and the files to look at afterwards.

Every metric is computed over all samples at once from the stacked logits (never averaged per batch):
top-1/top-5 accuracy, mean cross-entropy, macro precision/recall/F1, per-class accuracy, the most-confused pairs and
the expected calibration error. Written to `<out>/`: metrics.json (flat keys, for `dvc metrics show`),
per_class.csv, confusion.csv (full matrix), confused_pairs.csv, misclassified.csv, confusion.png (the most-confused
classes, readable at 525 species) and reliability.png.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birdcli.console import err, info, out, progress, warn
from birdcli.errors import BirdsError, UsageError

SPLITS = ("test", "valid", "train")
ECE_BINS = 15
TOP_PAIRS = 10
PLOT_CLASSES = 25  # confusion.png shows at most this many classes: the ones most involved in mistakes


# ---------------------------------------------------------------- metrics (numpy, no torch)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are the true class, columns the predicted one."""
    flat = labels.astype(np.int64) * num_classes + preds.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over `bins` equal-width confidence bins (lo, hi], and the bins themselves."""
    n = len(confidence)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else float("nan")
        conf = float(confidence[mask].mean()) if count else float("nan")
        if count:
            ece += count / n * abs(acc - conf)
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "count": count, "accuracy": acc, "confidence": conf})
    return ece, table


@dataclass
class Metrics:
    """Everything `evaluate` reports, computed from (N, C) logits and (N,) labels."""

    summary: dict[str, float | int]  # flat, JSON-friendly
    confusion: np.ndarray  # (C, C) int counts
    support: np.ndarray  # (C,) true samples per class
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,) = per-class accuracy
    f1: np.ndarray  # (C,)
    probs: np.ndarray  # (N, C) float64 softmax
    preds: np.ndarray  # (N,)
    bins: list[dict] = field(default_factory=list)


def compute(logits: np.ndarray, labels: np.ndarray, num_classes: int | None = None, bins: int = ECE_BINS) -> Metrics:
    """All metrics over all samples. Macro averages run over the classes with at least one true sample."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n, c = logits.shape
    c = num_classes or c
    if n == 0:
        raise BirdsError("no samples to evaluate")
    logp = log_softmax(logits)
    probs = np.exp(logp)
    preds = logits.argmax(axis=1)
    k = min(5, c)
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    cm = confusion_matrix(labels, preds, c)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    confidence = probs.max(axis=1)
    correct = preds == labels
    ece, table = calibration(confidence, correct, bins)
    summary: dict[str, float | int] = {
        "top1": float(correct.mean()),
        "top5": float((topk == labels[:, None]).any(axis=1).mean()),
        "loss": float(-logp[np.arange(n), labels].mean()),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "ece": float(ece),
        "mean_confidence": float(confidence.mean()),
        "samples": int(n),
        "errors": int((~correct).sum()),
        "classes_evaluated": int(present.sum()),
    }
    return Metrics(summary, cm, support, precision, recall, f1, probs, preds, table)


def most_confused(cm: np.ndarray, names: list[str], n: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The n largest off-diagonal cells: (true species, predicted species, count, share of the true species)."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:n]
    pairs = []
    for i in flat:
        t, p = divmod(int(i), cm.shape[1])
        if off[t, p] == 0:
            break
        rate = float(off[t, p] / cm[t].sum())
        pairs.append({"true": names[t], "predicted": names[p], "count": int(off[t, p]), "rate": rate})
    return pairs


# ---------------------------------------------------------------- the stage


@dataclass
class Result:
    metrics: dict[str, Any]  # what metrics.json holds
    pairs: list[dict[str, Any]]
    out_dir: Path
    model_dir: Path


def run_of(model_dir: Path) -> Path | None:
    """The training run a model folder belongs to (runs/<exp>/<run>/best -> runs/<exp>/<run>), if any."""
    parent = Path(os.path.normpath(model_dir)).parent  # stays relative when given relative
    return parent if (parent / "config.yaml").is_file() else None


def evaluate(
    model: str | os.PathLike[str] | None = None,
    split: str = "test",
    data_root: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int = -1,
    runs_dir: str | os.PathLike[str] = "runs",
    default_data_root: str | os.PathLike[str] = "data/raw",
    track: bool = True,
) -> Result:
    """Evaluate a model folder (or run, or the latest run) on one split; write the report files."""
    from birdcli import model as models

    if split not in SPLITS:
        raise UsageError(f"--split {split}: unknown split", f"use one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be at least 1")
    model_dir = models.resolve(model, runs_dir)
    run = run_of(model_dir)
    root = Path(data_root or _run_data_root(run) or default_data_root)
    if not (root / split).is_dir():
        raise BirdsError(f"no {split}/ folder in {root}", "pass --data-root, or another --split")
    dest = Path(out_dir) if out_dir else (run / "eval" / split if run else Path("eval"))

    # ---- logits (N, C) and labels (N,) over the split's readable images of species the model knows
    from birdcli.onnx_backend import is_export

    if is_export(model_dir):  # an ONNX export folder: ONNX Runtime, NumPy and Pillow; no torch imported
        names, items, check, logits, labels, idx = _onnx_logits(model_dir, root, split, device, batch_size)
    else:
        names, items, check, logits, labels, idx = _torch_logits(
            model_dir, root, split, device, precision, batch_size, workers
        )
    unreadable = len(items) - len(labels)
    if len(labels) == 0:
        raise BirdsError(f"no readable images in {root}/{split}", "run `birds data check`")

    # ---- metrics over all samples, files
    m = compute(logits, labels, len(names))
    pairs = most_confused(m.confusion, names)
    metrics: dict[str, Any] = {
        **m.summary,
        "split": split,
        "classes_model": len(names),
        **check,
        "unreadable_images": unreadable,
    }
    files = [str(items[int(i)][0]) for i in idx]
    write_reports(dest, m, names, files, labels, metrics, pairs, split)
    if track and run is not None:
        _log_to_wandb(run, metrics, split)
    return Result(metrics, pairs, dest, model_dir)


def _torch_logits(
    model_dir: Path, root: Path, split: str, device: str, precision: str, batch_size: int, workers: int
) -> tuple[list[str], list[tuple[Path, int]], dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
    """(labels, items, label check, logits, labels, item indices) through PyTorch on `device`."""
    from birdcli import model as models
    from birdcli.data import layout

    # ---- model, and the species it knows against the ones the split holds
    from birdcli.data.dataset import samples
    from birdcli.device import pick_device, pick_precision
    from birdcli.inference import loader_for, logits_over

    dev = pick_device(device)
    dtype = pick_precision(precision, dev)
    net, processor = models.load(model_dir)
    net.to(dev)
    names = models.labels_of(net)
    prep = models.preprocess_of(processor)
    all_files = layout.split_files(root, split)
    items = samples(root, split, names)
    check = _label_check(names, layout.species_dirs(root, split), len(all_files), len(items), f"{root}/{split}")
    if not items:
        raise BirdsError(
            f"none of the {len(all_files)} images in {root}/{split} is of a species the model knows",
            "is this the dataset the model was trained on? pass --data-root",
        )

    # ---- logits over every sample, batched, with a progress bar
    loader = loader_for(items, prep.size, batch_size, _workers(workers), dev.type == "cuda")
    info(f"evaluating {model_dir} on {len(items)} {split} images ({dev})")
    if err.is_terminal:
        with progress(transient=True) as bar:
            task = bar.add_task(f"evaluate {split}", total=len(items))
            logits, labels, idx = logits_over(
                net, loader, dev, dtype, prep.mean, prep.std, on_batch=lambda n: bar.advance(task, n)
            )
    else:  # no bar where it would only leave blank lines behind (pipes, CI logs)
        logits, labels, idx = logits_over(net, loader, dev, dtype, prep.mean, prep.std)
    return names, items, check, logits.numpy(), labels.numpy(), idx.numpy()


def _onnx_logits(
    model_dir: Path, root: Path, split: str, device: str, batch_size: int
) -> tuple[list[str], list[tuple[Path, int]], dict[str, int], np.ndarray, np.ndarray, np.ndarray]:
    """The same through ONNX Runtime from an export folder, preprocessing with Pillow and NumPy."""
    from birdcli.data import layout
    from birdcli.onnx_backend import OnnxPredictor

    predictor = OnnxPredictor(model_dir, device)
    names = predictor.labels
    index = {name: i for i, name in enumerate(names)}
    all_files = layout.split_files(root, split)
    items = [(p, index[s]) for p, s in all_files if s in index]
    check = _label_check(names, layout.species_dirs(root, split), len(all_files), len(items), f"{root}/{split}")
    if not items:
        raise BirdsError(
            f"none of the {len(all_files)} images in {root}/{split} is of a species the model knows",
            "is this the dataset the model was trained on? pass --data-root",
        )
    info(f"evaluating {model_dir} on {len(items)} {split} images (ONNX Runtime)")
    logits: list[np.ndarray] = []
    idx: list[int] = []

    def run_all(advance) -> None:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            out, ok = predictor.logits_of([str(p) for p, _ in chunk])
            logits.append(out)
            idx.extend(start + i for i in ok)
            advance(len(chunk))

    if err.is_terminal:
        with progress(transient=True) as bar:
            task = bar.add_task(f"evaluate {split}", total=len(items))
            run_all(lambda n: bar.advance(task, n))
    else:  # no bar where it would only leave blank lines behind (pipes, CI logs)
        run_all(lambda n: None)
    idx_arr = np.array(idx, dtype=np.int64)
    labels = np.array([items[i][1] for i in idx], dtype=np.int64)
    return names, items, check, np.concatenate(logits), labels, idx_arr


def _run_data_root(run: Path | None) -> str | None:
    if run is None:
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    return OmegaConf.select(cfg, "data.root")


def _workers(requested: int) -> int:
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def _label_check(model: list[str], data: list[str], n_files: int, n_kept: int, where: str) -> dict[str, int]:
    """Warn, clearly, when the model and the split disagree on the species; return the counts for metrics.json."""
    unknown = sorted(set(data) - set(model))  # in the data, not in the model: their images are left out
    absent = sorted(set(model) - set(data))  # in the model, no images here: predictions may still go there
    left_out = n_files - n_kept
    if unknown:
        warn(
            f"{len(unknown)} species in {where} are unknown to the model (e.g. {', '.join(unknown[:3])}); "
            f"left out {left_out} of {n_files} images"
        )
    if absent:
        warn(f"{len(absent)} of the model's {len(model)} species have no images in {where} (e.g. {absent[0]})")
    return {"species_unknown_to_model": len(unknown), "species_missing_in_data": len(absent), "left_out": left_out}


def write_reports(
    dest: Path,
    m: Metrics,
    names: list[str],
    files: list[str],
    labels: np.ndarray,
    metrics: dict[str, Any],
    pairs: list[dict[str, Any]],
    split: str,
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    off = m.confusion.copy()
    np.fill_diagonal(off, 0)
    with (dest / "per_class.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["species", "support", "correct", "accuracy", "precision", "recall", "f1", "predicted",
                    "most_confused_with", "confused_count"])  # fmt: skip
        for c, name in enumerate(names):
            worst = int(off[c].argmax())
            w.writerow([
                name, int(m.support[c]), int(m.confusion[c, c]),
                f"{m.recall[c]:.6f}" if m.support[c] else "", f"{m.precision[c]:.6f}", f"{m.recall[c]:.6f}",
                f"{m.f1[c]:.6f}", int(m.confusion[:, c].sum()),
                names[worst] if off[c, worst] else "", int(off[c, worst]),
            ])  # fmt: skip

    with (dest / "confusion.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for c, name in enumerate(names):
            w.writerow([name, *m.confusion[c].tolist()])

    with (dest / "confused_pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true", "predicted", "count", "rate"])
        for p in pairs:
            w.writerow([p["true"], p["predicted"], p["count"], f"{p['rate']:.6f}"])

    wrong = np.flatnonzero(m.preds != labels)
    wrong = wrong[np.argsort(-m.probs[wrong, m.preds[wrong]], kind="stable")]  # most confident mistakes first
    with (dest / "misclassified.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "true", "predicted", "confidence", "true_probability"])
        for i in wrong:
            w.writerow([files[i], names[labels[i]], names[m.preds[i]], f"{m.probs[i, m.preds[i]]:.6f}",
                        f"{m.probs[i, labels[i]]:.6f}"])  # fmt: skip

    plot_confusion(m.confusion, names, dest / "confusion.png", split)
    plot_reliability(m.bins, m.summary["ece"], dest / "reliability.png", split)


# ---------------------------------------------------------------- plots (matplotlib, imported here only)


def confusion_view(cm: np.ndarray, names: list[str], n: int = PLOT_CLASSES) -> tuple[np.ndarray, list[int]]:
    """The classes to draw and their block of counts: all when few, else the classes of the largest off-diagonal
    cells, pair by pair (so each big confusion shows with both ends, next to each other), until there are n.

    With a subset, the block gets one more column: how many of each class went to a class not drawn.
    """
    c = len(names)
    if c <= n:
        idx = list(range(c))
    else:
        off = cm.copy()
        np.fill_diagonal(off, 0)
        chosen: dict[int, None] = {}  # insertion-ordered set
        for flat in np.argsort(-off, axis=None, kind="stable"):
            t, p = divmod(int(flat), c)
            if off[t, p] == 0 or len(chosen) >= n:
                break
            chosen.setdefault(t)
            if len(chosen) < n:
                chosen.setdefault(p)
        involvement = off.sum(axis=0) + off.sum(axis=1)
        for i in np.argsort(-involvement, kind="stable"):  # few mistakes: fill up with the classes involved most
            if len(chosen) >= n:
                break
            chosen.setdefault(int(i))
        idx = list(chosen)
    block = cm[np.ix_(idx, idx)]
    if len(idx) < c:
        block = np.concatenate([block, cm[idx].sum(axis=1, keepdims=True) - block.sum(axis=1, keepdims=True)], axis=1)
    return block, idx


def plot_confusion(cm: np.ndarray, names: list[str], path: Path, split: str, n: int = PLOT_CLASSES) -> None:
    from matplotlib.figure import Figure

    counts, idx = confusion_view(cm, names, n)
    k = len(idx)
    rates = counts / np.maximum(cm[idx].sum(axis=1, keepdims=True), 1)  # share of each true class
    side = max(6.0, 0.34 * k + 3.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=110, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [names[i] if len(names[i]) <= 32 else names[i][:30] + "…" for i in idx]
    xlabels = labels + (["(any other class)"] if counts.shape[1] > k else [])
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for (r, c), count in np.ndenumerate(counts):
            if count:
                ax.text(c, r, str(count), ha="center", va="center", fontsize=6,
                        color="white" if rates[r, c] > 0.5 else "black")  # fmt: skip
    what = f"all {k} classes" if k == len(names) else f"the {k} most-confused of {len(names)} classes"
    ax.set_title(f"confusion on {split}: {what} (row-normalised, counts in cells)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.7, label="share of the true class")
    fig.savefig(path)


def plot_reliability(bins: list[dict], ece: float, path: Path, split: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 7), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = bins[0]["hi"] - bins[0]["lo"]
    mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
    used = [b["count"] > 0 for b in bins]
    acc = [b["accuracy"] if u else 0.0 for b, u in zip(bins, used, strict=True)]
    conf = [b["confidence"] if u else 0.0 for b, u in zip(bins, used, strict=True)]
    top.bar(mids, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap = [c - a if u else 0.0 for a, c, u in zip(acc, conf, used, strict=True)]
    top.bar(mids, gap, bottom=acc, width=width, facecolor="none", edgecolor="tab:red", hatch="//",
            label="gap to mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"reliability on {split}: ECE {ece:.4f}")
    bottom.bar(mids, [b["count"] for b in bins], width=width, color="gray", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max softmax probability)")
    bottom.set_ylabel("samples")
    fig.savefig(path)


# ---------------------------------------------------------------- tracking and terminal


def _log_to_wandb(run: Path, metrics: dict[str, Any], split: str) -> None:
    """Add the metrics to the W&B run that trained the model, when it was tracked and tracking is on."""
    from omegaconf import OmegaConf

    from birdcli import tracking

    cfg = OmegaConf.load(run / "config.yaml")
    w = OmegaConf.select(cfg, "tracking.wandb")
    if w is None or w.mode == "disabled":
        return
    meta = run / "checkpoint" / "meta.json"
    if not meta.is_file():
        meta = run / ".checkpoint.old" / "meta.json"
    wandb_id = json.loads(meta.read_text()).get("wandb_id") if meta.is_file() else None
    if not wandb_id:
        info(f"{run} has no W&B run id; not logging to W&B")
        return
    scalars = {f"eval/{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    try:
        tracker = tracking.start(
            w.mode, w.project, w.entity, run.name, run, OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            [cfg.exp, *w.tags], run_id=wandb_id, log_model=False,
        )  # fmt: skip
        tracker.log(scalars)
        tracker.summary(scalars)
        tracker.finish()
        if tracker.run_id:
            info(f"logged to W&B run {tracker.run_id} ({w.mode})")
    except Exception as e:  # tracking must never cost the user their evaluation
        warn(f"could not log to W&B: {type(e).__name__}: {e}")


def print_summary(result: Result) -> None:
    from rich.table import Table
    from rich.text import Text

    m = result.metrics
    table = Table(title=f"{m['split']}: {m['samples']} images, {m['classes_evaluated']} species", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in [
        ("top1", "top-1 accuracy"), ("top5", "top-5 accuracy"), ("loss", "loss (cross-entropy)"),
        ("precision_macro", "macro precision"), ("recall_macro", "macro recall"), ("f1_macro", "macro F1"),
        ("ece", "calibration error (ECE)"),
    ]:  # fmt: skip
        table.add_row(label, f"{m[key]:.4f}")
    if m["left_out"]:
        table.add_row("left out (unknown species)", str(m["left_out"]))
    if m["unreadable_images"]:
        table.add_row("unreadable images", str(m["unreadable_images"]))
    out.print(table)
    if result.pairs:
        pairs = Table(title="most confused (true -> predicted)", show_edge=False)
        pairs.add_column("true")
        pairs.add_column("predicted")
        pairs.add_column("count", justify="right")
        pairs.add_column("of true", justify="right")
        for p in result.pairs[:5]:
            pairs.add_row(Text(p["true"]), Text(p["predicted"]), str(p["count"]), f"{p['rate']:.0%}")
        out.print(pairs)
    out.print(Text(f"reports in {result.out_dir}/"), highlight=False)
